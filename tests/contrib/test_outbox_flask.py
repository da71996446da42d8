"""A Flask app's own tests, written the way its authors would: the app factory, the test
client and mailworker's outbox. No Redis (the app's Redis URL is a closed port), no worker.
"""

from __future__ import annotations

import unittest

from flask import Flask
from flaskshop import LOGO_PNG, create_app, terms_pdf

from mailworker.testing import Outbox, record_messages
from mailworker.testing.polling import free_port


def make_app() -> Flask:
    return create_app({"TESTING": True,
                       "MAILWORKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                       "MAILWORKER_RELAYS": {"default": "smtp://mail.example.test:587"}})


def test_signup_sends_the_welcome_mail(mailworker_outbox: Outbox) -> None:
    client = make_app().test_client()

    resp = client.post("/welcome", json={"email": "zoe@example.com", "name": "Zoë",
                                         "source": "ad"})

    assert resp.status_code == 202
    (sent,) = mailworker_outbox
    assert sent.id == resp.get_json()["id"]
    assert sent.recipients == ("zoe@example.com",)
    assert sent.sender == "shop@example.com"
    msg = sent.message
    assert msg["Subject"] == "Welcome, Zoë!" and msg["X-Signup-Source"] == "ad"
    assert msg.get_body(("plain",)).get_content() == "Hello Zoë, thanks for signing up.\n"
    parts = {p.get_filename(): p.get_content() for p in msg.walk() if p.get_filename()}
    assert parts == {"terms.pdf": terms_pdf(), "logo.png": LOGO_PNG}
    assert sent.metadata == {"kind": "welcome"}
    # The app's status endpoint reads the outbox's record, as it would read Redis.
    status = client.get(f"/messages/{sent.id}").get_json()
    assert status == {"state": "delivered", "recipients": {"zoe@example.com": "delivered"}}


def test_bad_address_is_a_400_and_sends_nothing(mailworker_outbox: Outbox) -> None:
    resp = make_app().test_client().post("/welcome", json={"email": "not an address"})
    assert resp.status_code == 400 and resp.get_json()["field"] == "to[0]"
    assert len(mailworker_outbox) == 0


class WelcomeMailTest(unittest.TestCase):
    """The same with unittest and Flask-Mail's ``record_messages()`` habit."""

    def test_welcome(self) -> None:
        client = make_app().test_client()
        with record_messages() as outbox:
            client.post("/welcome", json={"email": "bob@example.com", "name": "Bob"})
        self.assertEqual(len(outbox), 1)
        self.assertEqual(outbox[0].subject, "Welcome, Bob!")
