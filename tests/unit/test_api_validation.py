"""send()/send_many()/send_message()/status(): every caller value checked at enqueue.

The store is fakeredis and wake-ups are collected in a list: these tests are about what
is accepted and what is refused (and how the refusal reads), not about Redis. The real
Redis failures are in test_api_redis.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import fakeredis
import pytest

import mailworker
from mailworker import runtime
from mailworker.config import Settings
from mailworker.message import Attachment
from mailworker.outcome import apply_result, hold_until
from mailworker.policy import Backoff, Policy
from mailworker.relay import parse_relay
from mailworker.smtp import Envelope, RecipientResult, SendResult
from mailworker.smtp.errors import Stage
from mailworker.store import MessageState

GOOD: dict[str, Any] = {"to": "a@example.com", "subject": "s", "text": "t"}


@pytest.fixture
def published() -> Iterator[list[tuple[list[str], str]]]:
    """A runtime on fakeredis with one relay and a default sender; wake-ups are listed."""
    sent: list[tuple[list[str], str]] = []
    settings = Settings(relays={"default": parse_relay("default", "smtp://127.0.0.1:2525")},
                        default_sender="app@example.com", max_message_size=100_000,
                        max_recipients=50)
    runtime.configure(settings, redis_client=fakeredis.FakeRedis(),
                      publisher=lambda ids, queue: sent.append((list(ids), queue)))
    yield sent
    runtime.reset_runtime()


def stored_ids() -> list[bytes]:
    rt = runtime.get_runtime()
    return list(rt.redis.scan_iter(f"{rt.store.prefix}:m:*"))


def refused(field: str, **kw: Any) -> mailworker.InvalidMessageError:
    """send(**kw) raises InvalidMessageError naming *field*, and stores nothing."""
    before = stored_ids()
    with pytest.raises(mailworker.InvalidMessageError) as info:
        mailworker.send(**{**GOOD, **kw})
    assert info.value.field == field, str(info.value)
    assert stored_ids() == before
    return info.value


# --- S2-03: non-finite and out-of-range times ------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300,
                                   timedelta.max, 10**400, True])
@pytest.mark.parametrize("field", ["expires_at", "send_at", "delay"])
def test_s2_03_non_finite_or_huge_times_refused(published: list[Any], field: str,
                                                value: Any) -> None:
    err = refused(field, **{field: value})
    assert len(str(err)) < 400


def test_s2_03_nan_in_metadata_refused(published: list[Any]) -> None:
    err = refused("metadata[score]", metadata={"score": float("nan")})
    assert "finite" in err.reason
    refused("metadata[a][0][b]", metadata={"a": [{"b": float("inf")}]})


def test_s2_03_a_batch_with_one_nan_queues_nothing(published: list[Any]) -> None:
    batch = [GOOD] * 5 + [{**GOOD, "expires_at": float("nan")}] + [GOOD] * 4
    with pytest.raises(mailworker.InvalidMessageError) as info:
        mailworker.send_many(batch)
    assert "item 5 of the batch" in "".join(getattr(info.value, "__notes__", []))
    assert stored_ids() == [] and published == []


def test_stored_times_are_finite_and_status_reads_them(published: list[Any]) -> None:
    far = datetime.now(UTC) + timedelta(days=3000)
    mid = mailworker.send(**GOOD, send_at=far, expires_at=far + timedelta(days=1))
    st = mailworker.status(mid)
    assert st is not None and st["state"] == "deferred"
    assert st["send_at"] == pytest.approx(far.timestamp())
    datetime.fromtimestamp(st["expires_at"], UTC)  # in range: what 'mailworker status' does


# --- send_at / delay (issue 10) ---------------------------------------------------------------

def test_send_at_small_number_points_to_delay(published: list[Any]) -> None:
    err = refused("send_at", send_at=60)
    assert "delay=60" in err.reason.replace("delay=N", "delay=60") and "1970" in err.reason


def test_delay_sends_later(published: list[Any]) -> None:
    before = time.time()
    mid = mailworker.send(**GOOD, delay=60)
    st = mailworker.status(mid)
    assert st is not None and st["state"] == "deferred"
    assert before + 60 <= st["next_attempt_at"] <= time.time() + 60
    mid = mailworker.send(**GOOD, delay=timedelta(minutes=2))
    st = mailworker.status(mid)
    assert st is not None and st["next_attempt_at"] >= before + 120
    assert published == []  # nothing due now: no wake-up


def test_delay_zero_sends_now_and_delay_with_send_at_refused(published: list[Any]) -> None:
    mailworker.send(**GOOD, delay=0)
    assert len(published) == 1
    refused("delay", delay=-1)
    with pytest.raises(mailworker.InvalidMessageError, match="not both"):
        mailworker.send(**GOOD, delay=5, send_at=time.time() + 5)


def test_send_at_takes_aware_datetime_or_epoch_and_refuses_naive(published: list[Any]) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    for value in (soon, soon.timestamp()):
        st = mailworker.status(mailworker.send(**GOOD, send_at=value))
        assert st is not None and st["send_at"] == pytest.approx(soon.timestamp())
    err = refused("send_at", send_at=datetime.now() + timedelta(hours=1))
    assert "naive" in err.reason


def test_expires_at_small_number_hints_timedelta(published: list[Any]) -> None:
    err = refused("expires_at", expires_at=3600)
    assert "timedelta" in err.reason


# --- S2-14: wrong types name the field ---------------------------------------------------

@pytest.mark.parametrize(("field", "kw"), [
    ("headers", {"headers": [("X-A", "v")]}),
    ("headers", {"headers": "X-A: v"}),
    ("relay", {"relay": 5}),
    ("relay", {"relay": ""}),
    ("queue", {"queue": ["bulk"]}),
    ("idempotency_key", {"idempotency_key": 123}),
    ("idempotency_key", {"idempotency_key": b"k"}),
    ("idempotency_key", {"idempotency_key": "k" * 300}),
    ("metadata", {"metadata": "str"}),
    ("metadata", {"metadata": {1: "x"}}),
    ("metadata[s]", {"metadata": {"s": {1, 2}}}),
    ("metadata[d]", {"metadata": {"d": Decimal("1.5")}}),
    ("metadata[big]", {"metadata": {"big": 2**70}}),
    ("metadata[u]", {"metadata": {"u": "\ud800"}}),
    ("send_at", {"send_at": True}),
    ("send_at", {"send_at": "tomorrow"}),
    ("to", {"to": {"a@example.com": 1}}),
    ("to", {"to": b"a@example.com"}),
    ("attachments[0].content_id", {"attachments": [Attachment("a.png", b"x", inline=True,
                                                              content_id=5)]}),  # type: ignore[arg-type]
    ("attachments", {"attachments": b"raw bytes"}),
    ("message_id", {"message_id": "no-at-sign"}),
    ("message_id", {"message_id": 5}),
    ("date", {"date": float("nan")}),
])
def test_s2_14_wrong_types_are_invalid_message_errors(published: list[Any], field: str,
                                                      kw: dict[str, Any]) -> None:
    refused(field, **kw)


def test_s2_14_batch_items_of_the_wrong_type(published: list[Any]) -> None:
    for item in (None, "a@example.com", 5):
        with pytest.raises(mailworker.InvalidMessageError) as info:
            mailworker.send_many([GOOD, item])  # type: ignore[list-item]
        assert info.value.field == "message"
        assert "item 1 of the batch" in "".join(info.value.__notes__)
    with pytest.raises(mailworker.InvalidMessageError):
        mailworker.send_many(GOOD)  # type: ignore[arg-type]
    with pytest.raises(mailworker.InvalidMessageError) as info:
        mailworker.send_message("From: a@example.com\r\n\r\nx")  # type: ignore[arg-type]
    assert info.value.field == "message" and "message_from_bytes" in info.value.reason


def test_unknown_keys_name_the_right_argument(published: list[Any]) -> None:
    with pytest.raises(mailworker.InvalidMessageError) as info:
        mailworker.send_many([{"recipients": ["a@example.com"], "body": "t"}])
    assert info.value.field == "recipients" and "did you mean to=" in info.value.reason
    with pytest.raises(mailworker.InvalidMessageError, match="did you mean subject="):
        mailworker.send_many([{**GOOD, "subjet": "x"}])


def test_unknown_relay_or_queue_is_still_a_config_error(published: list[Any]) -> None:
    with pytest.raises(mailworker.ConfigError, match="unknown relay 'nope'"):
        mailworker.send(**GOOD, relay="nope")
    with pytest.raises(mailworker.ConfigError, match="unknown queue"):
        mailworker.send(**GOOD, queue="nope")


# --- S2-15: metadata and keys count; recipient cap ------------------------------------------

def test_s2_15_metadata_counts_toward_max_message_size(published: list[Any]) -> None:
    err = refused("size", metadata={"blob": "a" * 120_000})
    assert "metadata" in err.reason and len(str(err)) < 400
    mailworker.send(**GOOD, metadata={"order_id": 42})  # small metadata is fine


def test_s2_15_idempotency_key_counts_and_is_capped(published: list[Any]) -> None:
    refused("idempotency_key", idempotency_key="k" * 5_000_000)
    big = "x" * 99_000
    refused("size", text=big, idempotency_key="k" * 256)


def test_s2_15_max_recipients(published: list[Any]) -> None:
    many = [f"u{i}@example.com" for i in range(51)]
    err = refused("recipients", to=many)
    assert "MAILWORKER_MAX_RECIPIENTS" in err.reason and "51" in err.reason
    mailworker.send(**{**GOOD, "to": many[:50]})


def test_default_max_recipients_is_1000() -> None:
    assert Settings().max_recipients == 1000


# --- issue 10: message_id=, missing sender, huge values in errors ------------------------

def test_message_id_on_send(published: list[Any]) -> None:
    mid = mailworker.send(**GOOD, message_id="<order-42@shop.example>")
    st = mailworker.status(mid)
    assert st is not None and st["message_id"] == "<order-42@shop.example>"
    rt = runtime.get_runtime()
    raw = rt.redis.hget(rt.store.key("m", mid), "raw")
    assert raw is not None and b"\r\nMessage-ID: <order-42@shop.example>\r\n" in raw


def test_reserved_header_hint_for_message_id_is_true(published: list[Any]) -> None:
    err = refused("headers[Message-ID]", headers={"Message-ID": "<x@y.example>"})
    assert "message_id=" in err.reason
    mailworker.send(**GOOD, message_id="<x@y.example>")  # what the hint says works


def test_missing_sender_is_invalid_message_error_with_hint(published: list[Any]) -> None:
    rt = runtime.get_runtime()
    runtime.configure(rt.settings.with_(default_sender=None), redis_client=rt.redis)
    err = refused("sender")
    assert "MAILWORKER_DEFAULT_SENDER" in err.reason and "sender=" in err.reason


def test_swapped_attachment_arguments_give_a_short_error(published: list[Any]) -> None:
    pdf = b"%PDF-1.4\n" + bytes(random.Random(1).randrange(256) for _ in range(30_000))
    err = refused("attachments[0].mimetype",
                  attachments=[Attachment("invoice.pdf", "application/pdf", pdf)])  # type: ignore[arg-type]
    assert len(str(err)) < 400 and "swapped" in str(err)


def test_huge_values_are_never_echoed_whole(published: list[Any]) -> None:
    huge = "x" * 30_000
    for kw in ({"to": huge}, {"headers": {"X-A": 5}}, {"relay": huge},
               {"attachments": [("a.bin", b"x", huge)]}, {"message_id": huge},
               {"idempotency_key": [huge]}):
        with pytest.raises(mailworker.MailworkerError) as info:
            mailworker.send(**{**GOOD, **kw})
        assert len(str(info.value)) < 600, kw


# --- status (issue 10): one attempt count and the reason ------------------------------------

def _attempt(rec_id: str, replies: list[tuple[str, int, str]]) -> None:
    """Fold one SMTP attempt into the stored record, as a worker would."""
    rt = runtime.get_runtime()
    rec = rt.store.get(rec_id)
    assert rec is not None
    env = Envelope(rec.sender, tuple(r.address for r in rec.open_recipients), b"x")
    res = SendResult(env, tuple(RecipientResult(a, c, t, None, Stage.RCPT if c >= 400 else
                                                Stage.AFTER_DOT) for a, c, t in replies), 1)
    policy = Policy(backoff=Backoff(initial=60, jitter=0))
    apply_result(rec, res, policy=policy, now=time.time(), started_at=time.time(),
                 relay="default")
    _save(rec)


def _save(rec: Any) -> None:
    rt = runtime.get_runtime()
    rt.redis.hset(rt.store.key("m", rec.id), "doc", rec.to_json())


def test_status_one_attempt_count_for_a_delivered_message(published: list[Any]) -> None:
    mid = mailworker.send(**GOOD)
    _attempt(mid, [("a@example.com", 250, "2.0.0 OK")])
    st = mailworker.status(mid)
    assert st is not None and st["state"] == MessageState.DELIVERED
    assert st["attempts"] == 1 == st["recipients"][0]["attempts"]
    assert st["failed_attempts"] == 0 and st["reason"] is None
    assert "attempt_count" not in st


def test_status_gives_the_deferral_reason(published: list[Any]) -> None:
    mid = mailworker.send(**GOOD)
    _attempt(mid, [("a@example.com", 451, "4.7.1 greylisted, try later")])
    st = mailworker.status(mid)
    assert st is not None and st["state"] == "deferred" and st["attempts"] == 1
    assert st["reason"] == "a@example.com: 451 4.7.1 greylisted, try later"
    # A hold without an attempt (relay paused) says why, from last_error.
    rec = runtime.get_runtime().store.get(mid)
    assert rec is not None
    hold_until(rec, time.time() + 1, time.time() + 60, "relay 'default' paused: 530 auth")
    _save(rec)
    st = mailworker.status(mid)
    assert st is not None and st["reason"] == "relay 'default' paused: 530 auth"
    assert st["attempts"] == 1


def test_status_refuses_a_non_string_id(published: list[Any]) -> None:
    with pytest.raises(mailworker.InvalidMessageError):
        mailworker.status(None)  # type: ignore[arg-type]
    assert mailworker.status("0" * 32) is None


@pytest.mark.parametrize("to", ["a@example.com\r\n", ["a@example.com\n"],
                                ["a@example.com\u2028"], "b@example.com, a@example.com\u2029"])
def test_s2_14_line_breaks_at_the_end_of_an_address_are_refused(published: list[Any],
                                                                  to: Any) -> None:
    err = refused("to[0]" if "b@" not in str(to) else "to[1]", to=to)
    assert "line break" in err.reason


def test_s2_15_oversized_text_refused_before_encoding(published: list[Any]) -> None:
    err = refused("size", text="é" * 2_000_000, html="<p>" + "x" * 1_000_000)
    assert err.reason.startswith("message is at least 2.9 MB")
