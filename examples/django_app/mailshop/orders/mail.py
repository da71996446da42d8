"""The order confirmation: text and HTML, an invoice attachment and an inline logo."""

import base64
from email.mime.image import MIMEImage

from django.core.mail import EmailMultiAlternatives

from mailshop.orders.models import Order

#: A 2x2 PNG, shown in the HTML through its Content-ID (cid:logo).
LOGO_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAE0lEQVR4nGO4oGglF3WCAYiBLAAhwATXZ7K42wAAAABJRU5ErkJggg=="
)


def invoice_pdf(order: Order) -> bytes:
    """A stand-in invoice; the binary comment line is what real PDFs start with."""
    return (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
            + f"% invoice for order {order.pk}: {order.item}\n".encode()
            + bytes(range(256)) + b"\n%%EOF\n")


def confirmation(order: Order) -> EmailMultiAlternatives:
    msg = EmailMultiAlternatives(
        subject=f"Order #{order.pk} confirmed",
        body=f"Thank you! Your order #{order.pk} ({order.item}) is on its way.\n",
        to=[order.email],
        reply_to=["Mail Shop support <support@example.com>"],
        headers={"X-Order-Id": str(order.pk)},
    )
    msg.attach_alternative(
        f'<p><img src="cid:logo" alt="Mail Shop"></p>'
        f"<p>Thank you! Your order <b>#{order.pk}</b> ({order.item}) is on its way.</p>",
        "text/html",
    )
    msg.attach(f"invoice-{order.pk}.pdf", invoice_pdf(order), "application/pdf")
    logo = MIMEImage(LOGO_PNG, "png")
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    msg.attach(logo)
    # mailworker options ride on the message as attributes (see docs/django.md).
    msg.mailworker_idempotency_key = f"order-{order.pk}-confirmation"
    msg.mailworker_metadata = {"order_id": order.pk}
    return msg
