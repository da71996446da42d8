"""Receivers for mailworker's signals: they run in the worker (`manage.py mailworker worker`)."""

from typing import Any

from django.dispatch import receiver

from mailshop.orders.models import Order
from mailworker.contrib.django.signals import message_delivered, message_failed


@receiver(message_delivered)
def confirmation_delivered(sender: None, record: Any, **kwargs: Any) -> None:
    order_id = record.metadata.get("order_id")
    if order_id is not None:
        Order.objects.filter(pk=order_id).update(mail_state="delivered")


@receiver(message_failed)
def confirmation_failed(sender: None, record: Any, **kwargs: Any) -> None:
    order_id = record.metadata.get("order_id")
    if order_id is not None:
        Order.objects.filter(pk=order_id).update(mail_state="failed")
