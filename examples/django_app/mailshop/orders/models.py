from django.db import models


class Order(models.Model):
    email = models.CharField(max_length=254)
    item = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    #: mailworker's id for the confirmation, to ask mailworker.status() about it.
    mailworker_id = models.CharField(max_length=32, blank=True)
    #: Set by the signal receivers in the worker: "", "delivered" or "failed".
    mail_state = models.CharField(max_length=20, blank=True)
