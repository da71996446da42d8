"""Two ways an order can end, and what that means for its confirmation email."""

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

import mailworker
from mailshop.orders.mail import confirmation
from mailshop.orders.models import Order
from mailworker.contrib.django import configure_runtime


class PaymentDeclinedError(Exception):
    pass


def _order_and_mail(request: HttpRequest, *, decline: bool) -> JsonResponse:
    email = request.POST.get("email", "")
    item = request.POST.get("item", "a teapot")
    try:
        with transaction.atomic():
            order = Order.objects.create(email=email, item=item)
            msg = confirmation(order)
            # Checked now (a bad address raises InvalidMessageError here and rolls the
            # order back); written to the queue only when this block commits.
            msg.send()
            order.mailworker_id = msg.mailworker_id
            order.save(update_fields=["mailworker_id"])
            if decline:
                raise PaymentDeclinedError(order.pk)
    except mailworker.InvalidMessageError as exc:
        return JsonResponse({"error": str(exc), "field": exc.field}, status=400)
    except PaymentDeclinedError:
        # The transaction rolled back: no order, and its confirmation was never queued.
        return JsonResponse({"error": "payment declined; no order, no email"}, status=402)
    return JsonResponse({"order": order.pk, "mailworker_id": order.mailworker_id}, status=201)


@csrf_exempt  # a JSON API for curl and the tests; a real form would keep CSRF protection
@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    return _order_and_mail(request, decline=False)


@csrf_exempt
@require_POST
def place_order_declined(request: HttpRequest) -> JsonResponse:
    return _order_and_mail(request, decline=True)


@require_GET
def order_status(request: HttpRequest, pk: int) -> JsonResponse:
    order = Order.objects.filter(pk=pk).first()
    if order is None:
        return JsonResponse({"error": "no such order"}, status=404)
    configure_runtime()  # before calling mailworker directly rather than through send()
    status = mailworker.status(order.mailworker_id) if order.mailworker_id else None
    return JsonResponse({
        "order": order.pk,
        "mail_state": order.mail_state,
        "mailworker": status and {
            "state": status["state"],
            "recipients": [{"address": r["address"], "state": r["state"]}
                           for r in status["recipients"]],
        },
    })
