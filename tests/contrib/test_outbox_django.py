"""A Django project's own tests, written the way its authors would: the test client, the
example shop's views and mailworker's outbox. No Redis (``MAILWORKER["REDIS_URL"]`` is a
closed port), no worker: the confirmation is delivered in-process, and mailworker's
signals reach the project's receivers in the test. (Models are imported inside the
tests: Django is set up by the ``django_db`` fixture, as pytest-django would do.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core import mail
from django.test import Client, TestCase, override_settings

from mailworker.testing import Fault, Outbox, record_messages
from mailworker.testing.polling import free_port
from tests.contrib.test_django import django_db  # noqa: F401  (Django set up once)

MAILWORKER = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
              "RELAYS": {"default": "smtp://mail.example.test:587"}}


@pytest.fixture
def shop_settings(django_db: Path) -> Iterator[None]:  # noqa: F811
    with override_settings(EMAIL_BACKEND="mailworker.contrib.django.EmailBackend",
                           MAILWORKER=MAILWORKER):
        yield


def test_order_confirmation_is_delivered_and_signals_update_the_order(
        shop_settings: None, mailworker_outbox: Outbox) -> None:
    from mailshop.orders.mail import LOGO_PNG
    from mailshop.orders.models import Order

    client = Client()
    resp = client.post("/orders/", {"email": "zoe@example.com", "item": "a teapot"})

    assert resp.status_code == 201, resp.content
    order = Order.objects.get(pk=resp.json()["order"])
    (sent,) = mailworker_outbox
    assert sent.id == order.mailworker_id
    assert sent.recipients == ("zoe@example.com",) and sent.sender == "shop@example.com"
    assert sent.subject == f"Order #{order.pk} confirmed"
    assert sent.metadata == {"order_id": order.pk}
    files = {p.get_filename(): p.get_content() for p in sent.message.walk() if p.get_filename()}
    assert files["logo.png"] == LOGO_PNG and files[f"invoice-{order.pk}.pdf"].startswith(b"%PDF")
    # message_delivered ran the project's receiver, in this process.
    order.refresh_from_db()
    assert order.mail_state == "delivered"
    status = client.get(f"/orders/{order.pk}/").json()
    assert status["mailworker"]["state"] == "delivered"


def test_refused_address_marks_the_order_failed(shop_settings: None,
                                                mailworker_outbox: Outbox) -> None:
    from mailshop.orders.models import Order

    mailworker_outbox.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user"))
    resp = Client().post("/orders/", {"email": "gone@example.com"})
    order = Order.objects.get(pk=resp.json()["order"])
    assert len(mailworker_outbox) == 0
    assert mailworker_outbox.status(order.mailworker_id)["state"] == "dead"  # type: ignore[index]
    order.refresh_from_db()
    assert order.mail_state == "failed"


def test_rolled_back_order_sends_nothing(shop_settings: None,
                                         mailworker_outbox: Outbox) -> None:
    resp = Client().post("/orders/declined/", {"email": "zoe@example.com"})
    assert resp.status_code == 402
    assert len(mailworker_outbox) == 0 and mailworker_outbox.ids() == []


def test_test_runner_locmem_backend_keeps_filling_mail_outbox(django_db: Path) -> None:  # noqa: F811
    # Django's test runner swaps in locmem; mail then never reaches mailworker.
    with override_settings(EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend"), \
            record_messages() as outbox:
        mail.outbox = []
        mail.send_mail("Hi", "Body", "shop@example.com", ["a@example.com"])
        assert [m.subject for m in mail.outbox] == ["Hi"]
        assert len(outbox) == 0


@pytest.mark.usefixtures("django_db")
@override_settings(EMAIL_BACKEND="mailworker.contrib.django.EmailBackend", MAILWORKER=MAILWORKER)
class OrderMailTestCase(TestCase):
    """Inside Django's TestCase the transaction never commits: capture on-commit callbacks."""

    def test_confirmation(self) -> None:
        with record_messages() as outbox, self.captureOnCommitCallbacks(execute=True):
            resp = self.client.post("/orders/", {"email": "bob@example.com"})
        self.assertEqual(resp.status_code, 201)
        self.assertEqual([m.recipients for m in outbox], [("bob@example.com",)])

    def test_without_capturing_nothing_is_sent(self) -> None:
        with record_messages() as outbox:
            self.client.post("/orders/", {"email": "bob@example.com"})
        self.assertEqual(len(outbox), 0)  # queued on commit, which never comes here
