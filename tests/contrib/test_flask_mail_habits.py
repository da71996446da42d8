"""Flask-Mail's argument shapes through the Flask extension reach the same recipients,
sender and Date that Flask-Mail itself would use (review findings F10, F11).

Driven through the outbox (the same validation and record building as production, no
Redis) and the real ``flask_mail.Message``, so a change in Flask-Mail's shapes shows here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flask_mail
import pytest
from flask import Flask

from mailworker.contrib.flask import MailWorker
from mailworker.message import InvalidMessageError
from mailworker.testing import Outbox, record_messages

TWO = ("alice@example.com", "bob@example.com")


@pytest.fixture
def mw() -> Iterator[MailWorker]:
    app = Flask("habits")
    app.config.update(MAIL_SERVER="127.0.0.1", MAIL_PORT=2525,
                      MAIL_DEFAULT_SENDER=("Shop", "shop@example.com"))
    ext = MailWorker(app)
    with app.app_context():
        yield ext


def sent(call: Any) -> Outbox:
    with record_messages() as outbox:
        call()
    assert len(outbox) == 1
    return outbox


def test_review_f10_tuple_of_recipients_reaches_every_address(mw: MailWorker) -> None:
    # Flask-Mail sends a tuple of addresses to each of them; so must mw.send.
    assert sorted(flask_mail.Message("s", recipients=TWO, body="x",
                                     sender="shop@example.com").send_to) == sorted(TWO)
    for call in (lambda: mw.send(subject="s", body="x", recipients=TWO),
                 lambda: mw.send(flask_mail.Message("s", recipients=TWO, body="x")),
                 lambda: mw.send(subject="s", text="x", to=TWO)):
        msg = sent(call)[0]
        assert msg.recipients == TWO
        assert msg.message["To"] == "alice@example.com, bob@example.com"
    msg = sent(lambda: mw.send(subject="s", body="x", to="a@example.com",
                               cc=("carol@example.com", "dan@example.com")))[0]
    assert msg.recipients == ("a@example.com", "carol@example.com", "dan@example.com")


def test_review_f10_a_bare_pair_as_recipients_is_refused_with_the_fix(mw: MailWorker) -> None:
    with record_messages() as outbox, pytest.raises(InvalidMessageError) as err:
        mw.send(subject="s", body="x", recipients=("Bob", "bob@example.com"))
    assert "to" in str(err.value) and "[('Bob', 'bob@example.com')]" in str(err.value)
    assert len(outbox) == 0


def test_review_f10_two_addresses_as_a_sender_pair_is_refused(mw: MailWorker) -> None:
    with record_messages() as outbox, pytest.raises(InvalidMessageError) as err:
        mw.send(subject="s", body="x", recipients=["b@example.com"], sender=TWO)
    assert "sender" in str(err.value) and "two addresses" in str(err.value)
    assert len(outbox) == 0


def test_review_f11_send_message_with_flask_mail_keywords(mw: MailWorker) -> None:
    msg = sent(lambda: mw.send_message(subject="Hi", recipients=["b@example.com"],
                                       body="x"))[0]
    assert (msg.recipients, msg.message["Subject"]) == (("b@example.com",), "Hi")
    assert msg.message["From"] == "Shop <shop@example.com>"
    # Flask-Mail's Message takes the subject first, positionally.
    msg = sent(lambda: mw.send_message("Hello", recipients=["b@example.com"], body="x"))[0]
    assert msg.message["Subject"] == "Hello"
    with pytest.raises(TypeError, match="subject twice"):
        mw.send_message("Hello", subject="Hi", recipients=["b@example.com"])


def test_review_f11_message_date_list_sender_and_tuple_of_pairs(mw: MailWorker) -> None:
    msg = sent(lambda: mw.send(flask_mail.Message(
        "Hi", recipients=["b@example.com"], body="x", date=1_700_000_000)))[0]
    assert msg.message["Date"].datetime.timestamp() == 1_700_000_000
    msg = sent(lambda: mw.send(flask_mail.Message(
        "Hi", recipients=["b@example.com"], body="x", sender=["Ann", "ann@example.com"])))[0]
    assert (msg.sender, msg.message["From"]) == ("ann@example.com", "Ann <ann@example.com>")
    msg = sent(lambda: mw.send(subject="Hi", body="x", sender=["Ann", "ann@example.com"],
                               recipients=(("Bob", "b@example.com"),
                                           ("Cy", "c@example.com"))))[0]
    assert msg.recipients == ("b@example.com", "c@example.com")
    assert msg.message["To"] == "Bob <b@example.com>, Cy <c@example.com>"
    assert msg.message["From"] == "Ann <ann@example.com>"
    # Flask-Mail's reply_to is one address, a pair included.
    msg = sent(lambda: mw.send(flask_mail.Message(
        "Hi", recipients=["b@example.com"], body="x",
        reply_to=("Help", "help@example.com"))))[0]
    assert msg.message["Reply-To"] == "Help <help@example.com>"
