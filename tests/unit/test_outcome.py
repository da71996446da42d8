"""How one attempt's result changes a record: pure, so plain values suffice."""

from __future__ import annotations

import random
import smtplib

import pytest

from mailworker.outcome import apply_expiry, apply_relay_hold, apply_result, requeue
from mailworker.policy import Backoff, Policy
from mailworker.smtp import Envelope, RecipientResult, SendResult
from mailworker.smtp.errors import DeliveryUncertain, Stage, annotate
from mailworker.store import MessageState, RcptState, RecipientState, Record

NOW = 1_000_000.0
POLICY = Policy(backoff=Backoff(initial=60, factor=2, maximum=3600, jitter=0))


def record(*rcpts: str, attempts: int = 0) -> Record:
    return Record(id="m1", queue="transactional", relay="default", sender="a@example.com",
                  recipients=[RecipientState(r) for r in rcpts], created_at=NOW - 10,
                  expires_at=NOW + 86400, size=10, attempts=attempts)


def result(rec: Record, *replies: tuple[str, int, str, Stage]) -> SendResult:
    env = Envelope(rec.sender, tuple(r.address for r in rec.open_recipients), b"x")
    return SendResult(env, tuple(RecipientResult(a, c, t, t.split()[0] if "." in t else None, s)
                                 for a, c, t, s in replies), 1)


def apply(rec: Record, res: SendResult | BaseException, **kw: object) -> object:
    return apply_result(rec, res, policy=POLICY, now=NOW, started_at=NOW - 1, relay="default",
                        rng=random.Random(1), **kw)  # type: ignore[arg-type]


def test_all_accepted_is_delivered() -> None:
    rec = record("b@x.org", "c@x.org")
    step = apply(rec, result(rec, ("b@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT),
                             ("c@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    assert step.state is MessageState.DELIVERED  # type: ignore[attr-defined]
    assert rec.attempts == 0 and len(rec.history) == 1
    assert all(r.state is RcptState.DELIVERED for r in rec.recipients)


def test_partial_refusal_defers_4xx_fails_5xx_keeps_delivered() -> None:
    rec = record("ok@x.org", "bad@x.org", "grey@x.org")
    step = apply(rec, result(rec, ("ok@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT),
                             ("bad@x.org", 550, "5.1.1 no such user", Stage.RCPT),
                             ("grey@x.org", 451, "4.7.1 greylisted", Stage.RCPT)))
    assert step.state is MessageState.DEFERRED  # type: ignore[attr-defined]
    assert rec.next_attempt_at == NOW + 60
    assert [r.state for r in rec.recipients] == [RcptState.DELIVERED, RcptState.FAILED,
                                                 RcptState.DEFERRED]
    assert [r.address for r in rec.open_recipients] == ["grey@x.org"]
    # The retry only sees the greylisted recipient; it then succeeds, the message is dead
    # because one recipient failed, and the reason names it.
    step = apply(rec, result(rec, ("grey@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    assert step.state is MessageState.DEAD  # type: ignore[attr-defined]
    assert rec.dead_reason is not None and rec.dead_reason.startswith("bad@x.org: 550 5.1.1")


def test_all_refused_exception_is_decided_per_recipient() -> None:
    rec = record("a@x.org", "b@x.org")
    exc = annotate(smtplib.SMTPRecipientsRefused({"a@x.org": (550, b"5.1.1 gone"),
                                                  "b@x.org": (452, b"4.2.2 over quota")}),
                   Stage.RCPT)
    apply(rec, exc)
    assert [r.state for r in rec.recipients] == [RcptState.FAILED, RcptState.DEFERRED]


def test_message_level_5xx_fails_everyone_open() -> None:
    rec = record("a@x.org", "b@x.org")
    exc = annotate(smtplib.SMTPDataError(554, b"5.7.1 spam"), Stage.AFTER_DOT)
    step = apply(rec, exc)
    assert step.state is MessageState.DEAD  # type: ignore[attr-defined]
    assert rec.history[-1].error == {"class": "SMTPDataError", "code": 554,
                                     "enhanced_code": "5.7.1", "stage": "after-dot",
                                     "text": "554 5.7.1 spam"}


def test_lost_reply_after_dot_is_retried_and_flagged() -> None:
    rec = record("a@x.org")
    step = apply(rec, annotate(DeliveryUncertain("no reply"), Stage.AFTER_DOT))
    assert step.state is MessageState.DEFERRED  # type: ignore[attr-defined]
    assert rec.possible_duplicate and rec.recipients[0].possible_duplicate


def test_relay_level_failure_spends_no_attempt() -> None:
    rec = record("a@x.org", attempts=3)
    step = apply(rec, annotate(smtplib.SMTPServerDisconnected("gone"), Stage.MAIL))
    assert step.relay_decision is not None  # type: ignore[attr-defined]
    assert rec.attempts == 3 and rec.recipients[0].attempts == 0


def test_retries_exhausted_dead_letters() -> None:
    rec = record("a@x.org", attempts=19)
    exc = annotate(smtplib.SMTPSenderRefused(451, b"4.3.0 later", "a@example.com"), Stage.MAIL)
    step = apply(rec, exc)
    assert step.state is MessageState.DEAD  # type: ignore[attr-defined]
    assert "retries exhausted" in (rec.recipients[0].reason or "")


def test_interrupted_claim_flags_accepted_recipients() -> None:
    rec = record("a@x.org")
    apply(rec, result(rec, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)), interrupted=True)
    assert rec.state is MessageState.DELIVERED and rec.recipients[0].possible_duplicate


def test_too_many_recipients_with_nothing_accepted_backs_off() -> None:
    rec = record("a@x.org")
    step = apply(rec, result(rec, ("a@x.org", 452, "4.5.3 too many recipients", Stage.RCPT)))
    assert step.state is MessageState.DEFERRED  # type: ignore[attr-defined]


def test_expiry_hold_and_requeue() -> None:
    rec = record("a@x.org")
    assert apply_relay_hold(rec, NOW, NOW + 30, "paused").state is MessageState.DEFERRED
    assert rec.next_attempt_at == NOW + 30 and rec.attempts == 0
    assert requeue(rec, NOW).state is MessageState.QUEUED
    step = apply_expiry(rec, NOW)
    assert step.state is MessageState.DEAD and "lifetime exceeded" in (rec.dead_reason or "")


def test_failure_after_a_split_keeps_the_recipients_already_delivered() -> None:
    rec = record("a@x.org", "b@x.org")
    exc = annotate(smtplib.SMTPSenderRefused(421, b"4.3.2 closing", "a@example.com"),
                   Stage.MAIL)
    exc.result = result(rec, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT))  # type: ignore[attr-defined]
    apply(rec, exc)
    assert rec.recipient("a@x.org").state is RcptState.DELIVERED
    assert rec.recipient("b@x.org").state is RcptState.DEFERRED
    assert [r.address for r in rec.open_recipients] == ["b@x.org"]


def test_421_at_rcpt_backs_off_the_relay() -> None:
    rec = record("a@x.org")
    exc = annotate(smtplib.SMTPRecipientsRefused({"a@x.org": (421, b"4.7.0 slow down")}),
                   Stage.RCPT)
    step = apply(rec, exc)
    assert step.relay_decision is not None  # type: ignore[attr-defined]


def test_too_many_recipients_backoff_counts_attempts() -> None:
    rec = record("a@x.org")
    for n in (1, 2, 3):
        apply(rec, result(rec, ("a@x.org", 452, "4.5.3 too many recipients", Stage.RCPT)))
        assert rec.attempts == n


def test_interruption_flag_survives_a_deferral() -> None:
    rec = record("a@x.org")
    apply(rec, result(rec, ("a@x.org", 451, "4.7.1 later", Stage.RCPT)), interrupted=True)
    assert rec.recipients[0].possible_duplicate
    apply(rec, result(rec, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    assert rec.state is MessageState.DELIVERED and rec.possible_duplicate


def test_s2_15_attempt_cost_is_linear_in_recipients(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-recipient lookup was a linear scan per recipient (quadratic per attempt: a
    # 1,000-recipient message cost a million comparisons). It is now an index built once:
    # no scan is made at all, whatever the outcome mix.
    calls = {"n": 0}
    original = Record.recipient

    def counting(self: Record, address: str) -> RecipientState:
        calls["n"] += 1
        return original(self, address)

    monkeypatch.setattr(Record, "recipient", counting)
    rcpts = [f"u{i}@x.org" for i in range(1000)]
    rec = record(*rcpts)
    replies = [(a, 250 if i % 3 else 451, "2.0.0 OK" if i % 3 else "4.2.0 later",
                Stage.AFTER_DOT if i % 3 else Stage.RCPT) for i, a in enumerate(rcpts)]
    step = apply(rec, result(rec, *replies))
    assert calls["n"] == 0
    assert step.state is MessageState.DEFERRED  # type: ignore[attr-defined]
    assert sum(r.state is RcptState.DELIVERED for r in rec.recipients) == 666
