"""The in-process outbox: real builder and policy, no Redis, no worker, no SMTP server.

The runtime points at a Redis port nothing listens on, so any test that reached Redis
would fail with QueueUnavailable.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

import mailworker
from mailworker import api
from mailworker.config import ConfigError, Settings
from mailworker.hooks import hooks
from mailworker.message import InvalidMessageError
from mailworker.relay import parse_relay
from mailworker.runtime import configure, reset_runtime
from mailworker.store import MessageState, Record
from mailworker.testing import Fault, Outbox, record_messages
from mailworker.testing.polling import free_port


@pytest.fixture
def outbox() -> Iterator[Outbox]:
    configure(Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: no Redis used
        relays={"default": parse_relay("default", "smtp://127.0.0.1:2525")},
        default_sender="App <app@example.com>",
        retry={"backoff": {"initial": 60, "factor": 2, "maximum": 600, "jitter": 0},
               "max_attempts": 3},
    ))
    try:
        with record_messages() as box:
            yield box
    finally:
        reset_runtime()


def test_send_is_delivered_at_once_with_envelope_and_parsed_message(outbox: Outbox) -> None:
    mid = mailworker.send(to="Zoë <zoe@example.com>", cc="cc@example.com",
                          bcc="hidden@example.com", subject="Grüße", text="Hallo\n",
                          html="<p>Hallo</p>", metadata={"order": 7})

    assert len(outbox) == 1
    sent = outbox[0]
    assert sent.id == mid
    assert sent.sender == "app@example.com"
    assert set(sent.recipients) == {"zoe@example.com", "cc@example.com", "hidden@example.com"}
    assert sent.subject == "Grüße"
    assert sent.message["To"] == "Zoë <zoe@example.com>"
    assert "Bcc" not in sent.message and b"hidden@" not in sent.data
    assert sent.message.get_body(("plain",)).get_content() == "Hallo\n"
    assert sent.metadata == {"order": 7}
    status = mailworker.status(mid)  # answered by the outbox
    assert status is not None and status["state"] == "delivered"
    assert {r["address"]: r["state"] for r in status["recipients"]} == {
        "zoe@example.com": "delivered", "cc@example.com": "delivered",
        "hidden@example.com": "delivered"}


def test_bad_input_and_unknown_relay_fail_as_in_production(outbox: Outbox) -> None:
    with pytest.raises(InvalidMessageError):
        mailworker.send_many([{"to": "ok@example.com", "text": "x"},
                              {"to": "not an address", "text": "x"}])
    with pytest.raises(ConfigError, match="unknown relay 'nope'"):
        mailworker.send(to="ok@example.com", text="x", relay="nope")
    assert len(outbox) == 0 and outbox.ids() == []


def test_refused_recipient_is_dead_lettered_by_the_policy_and_hooks_fire(
        outbox: Outbox) -> None:
    outbox.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    fired: list[tuple[str, str]] = []

    def seen(event: str) -> object:
        def hook(record: Record) -> None:
            fired.append((event, record.id))
        return hook

    hook_fns = {event: seen(event) for event in ("delivered", "failed", "dead_lettered")}
    for event, fn in hook_fns.items():
        hooks.connect(event, fn)  # type: ignore[arg-type]
    try:
        good = mailworker.send(to="good@example.com", text="x")
        mixed = mailworker.send(to=["good@example.com", "bad@example.com"], text="x")
    finally:
        for event, fn in hook_fns.items():
            hooks.disconnect(event, fn)  # type: ignore[arg-type]

    assert [m.recipients for m in outbox] == [("good@example.com",), ("good@example.com",)]
    rec = outbox.record(mixed)
    assert rec is not None and rec.state is MessageState.DEAD
    assert {r.address: r.state.value for r in rec.recipients} == {
        "good@example.com": "delivered", "bad@example.com": "failed"}
    assert "550 5.1.1 No such user" in (rec.dead_reason or "")
    assert fired == [("delivered", good), ("failed", mixed), ("dead_lettered", mixed)]
    assert outbox.ids(MessageState.DEAD) == [mixed]


def test_greylisting_defers_then_drain_delivers_like_the_scheduler(outbox: Outbox) -> None:
    outbox.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted", times=1))
    mid = mailworker.send(to="grey@example.com", text="x")

    rec = outbox.record(mid)
    assert rec is not None and rec.state is MessageState.DEFERRED and len(outbox) == 0
    assert rec.next_attempt_at is not None
    assert rec.next_attempt_at - outbox.clock() == pytest.approx(60, abs=1)  # the policy's

    assert outbox.advance(30) == 0  # not due yet
    assert outbox.drain() == 1
    assert rec.state is MessageState.DELIVERED and len(rec.history) == 2
    assert [m.recipients for m in outbox] == [("grey@example.com",)]


def test_a_relay_that_always_defers_ends_in_dead_letters_after_max_attempts(
        outbox: Outbox) -> None:
    outbox.add_fault(Fault.reply("RCPT", 450, "4.2.1 Mailbox busy"))
    mid = mailworker.send(to="a@example.com", text="x")
    outbox.drain()
    rec = outbox.record(mid)
    assert rec is not None and rec.state is MessageState.DEAD
    assert len(rec.history) == 3 and len(outbox) == 0  # max_attempts=3 in this policy


def test_delayed_mail_waits_for_its_time(outbox: Outbox) -> None:
    mid = mailworker.send(to="later@example.com", text="x", delay=timedelta(minutes=5))
    assert len(outbox) == 0 and outbox.ids(MessageState.DEFERRED) == [mid]
    outbox.advance(240)
    assert len(outbox) == 0
    outbox.advance(61)
    assert [m.id for m in outbox] == [mid]


def test_idempotency_key_sends_once(outbox: Outbox) -> None:
    first = mailworker.send(to="a@example.com", text="x", idempotency_key="order-1")
    again = mailworker.send(to="a@example.com", text="x", idempotency_key="order-1")
    assert first == again and len(outbox) == 1


def test_data_refusal_fails_the_message(outbox: Outbox) -> None:
    outbox.add_fault(Fault.reply("DOT", 554, "5.7.1 Spam detected"))
    mid = mailworker.send(to="a@example.com", text="x")
    status = outbox.status(mid)
    assert status is not None and status["state"] == "dead" and len(outbox) == 0


def test_only_reply_faults_apply(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="SMTPTestServer"):
        outbox.add_fault(Fault.disconnect("RCPT"))
    with pytest.raises(ValueError, match="SMTPTestServer"):
        outbox.add_fault(Fault.reply("EHLO", 554, "no"))


def test_nested_outboxes_and_restore(outbox: Outbox) -> None:
    with record_messages() as inner:
        mailworker.send(to="inner@example.com", text="x")
    mailworker.send(to="outer@example.com", text="x")
    assert [m.recipients for m in inner] == [("inner@example.com",)]
    assert [m.recipients for m in outbox] == [("outer@example.com",)]
    outbox.clear()
    assert len(outbox) == 0 and outbox.ids() == []


def test_no_outbox_after_the_block() -> None:
    with record_messages():
        assert api.outbox is not None
    assert api.outbox is None


def test_review_f8_hooks_and_status_see_the_stored_json_not_the_callers_objects(
        outbox: Outbox) -> None:
    seen: list[dict[str, object]] = []

    def on_delivered(rec: Record) -> None:
        seen.append(rec.metadata)

    hooks.connect("delivered", on_delivered)
    try:
        meta: dict[str, object] = {"order": (1, 2), "tags": ["a"]}
        mid = mailworker.send(to="b@example.com", subject="s", text="t", metadata=meta)
        tags = meta["tags"]
        assert isinstance(tags, list)
        tags.append("changed after send")
    finally:
        hooks.disconnect("delivered", on_delivered)
    # As a worker's hook gets it: read back from JSON, as it was at send().
    assert seen == [{"order": [1, 2], "tags": ["a"]}]
    rec = outbox.record(mid)
    assert rec is not None and rec.metadata == {"order": [1, 2], "tags": ["a"]}
    assert outbox[0].metadata == {"order": [1, 2], "tags": ["a"]}
