"""How one attempt's result changes a record: pure, so plain values suffice."""

from __future__ import annotations

import random
import smtplib

import pytest

from mailworker.outcome import (
    Step,
    apply_expiry,
    apply_hold,
    apply_result,
    defer_behind,
    hold_until,
    pause_until,
    requeue,
    uncertain_spent,
)
from mailworker.policy import Action, Backoff, Policy, Scope
from mailworker.record import Attempt, MessageState, RcptState, RecipientState, Record
from mailworker.smtp import Envelope, RecipientResult, SendResult
from mailworker.smtp.errors import (
    DeliveryUncertain,
    Stage,
    annotate,
    attach_partial,
    failure_of,
)

NOW = 1_000_000.0
POLICY = Policy(backoff=Backoff(initial=60, factor=2, maximum=3600, jitter=0),
                relay_backoff=Backoff(initial=30, factor=2, maximum=600, jitter=0))


def record(*rcpts: str, attempts: int = 0) -> Record:
    return Record(id="m1", queue="transactional", relay="default", sender="a@example.com",
                  recipients=[RecipientState(r) for r in rcpts], created_at=NOW - 10,
                  expires_at=NOW + 86400, size=10, attempts=attempts)


def result(rec: Record, *replies: tuple[str, int, str, Stage]) -> SendResult:
    env = Envelope(rec.sender, tuple(r.address for r in rec.open_recipients), b"x")
    return SendResult(env, tuple(RecipientResult(a, c, t, t.split()[0] if "." in t else None, s)
                                 for a, c, t, s in replies), 1)


def apply(rec: Record, res: SendResult | BaseException, *, interrupted: bool = False,
          relay_failures: int = 1, policy: Policy = POLICY, now: float = NOW) -> Step:
    return apply_result(rec, res, policy=policy, now=now, started_at=now - 1, relay="default",
                        rng=random.Random(1), interrupted=interrupted,
                        relay_failures=relay_failures)


def test_all_accepted_is_delivered() -> None:
    rec = record("b@x.org", "c@x.org")
    step = apply(rec, result(rec, ("b@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT),
                             ("c@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    assert step.state is MessageState.DELIVERED
    assert rec.attempts == 0 and len(rec.history) == 1
    assert all(r.state is RcptState.DELIVERED for r in rec.recipients)


def test_partial_refusal_defers_4xx_fails_5xx_keeps_delivered() -> None:
    rec = record("ok@x.org", "bad@x.org", "grey@x.org")
    step = apply(rec, result(rec, ("ok@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT),
                             ("bad@x.org", 550, "5.1.1 no such user", Stage.RCPT),
                             ("grey@x.org", 451, "4.7.1 greylisted", Stage.RCPT)))
    assert step.state is MessageState.DEFERRED
    assert rec.next_attempt_at == NOW + 60
    assert [r.state for r in rec.recipients] == [RcptState.DELIVERED, RcptState.FAILED,
                                                 RcptState.DEFERRED]
    assert [r.address for r in rec.open_recipients] == ["grey@x.org"]
    # The retry only sees the greylisted recipient; it then succeeds, the message is dead
    # because one recipient failed, and the reason names it.
    step = apply(rec, result(rec, ("grey@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    assert step.state is MessageState.DEAD
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
    assert step.state is MessageState.DEAD
    assert rec.history[-1].error == {"class": "SMTPDataError", "code": 554,
                                     "enhanced_code": "5.7.1", "stage": "after-dot",
                                     "text": "554 5.7.1 spam"}


def test_lost_reply_after_dot_is_retried_and_flagged() -> None:
    rec = record("a@x.org")
    step = apply(rec, annotate(DeliveryUncertain("no reply"), Stage.AFTER_DOT))
    assert step.state is MessageState.DEFERRED
    assert rec.possible_duplicate and rec.recipients[0].possible_duplicate


def test_relay_level_failure_spends_no_attempt() -> None:
    rec = record("a@x.org", attempts=3)
    step = apply(rec, annotate(smtplib.SMTPServerDisconnected("gone"), Stage.MAIL))
    assert step.relay_decision is not None
    assert rec.attempts == 3 and rec.recipients[0].attempts == 0


def test_retries_exhausted_dead_letters() -> None:
    rec = record("a@x.org", attempts=19)
    exc = annotate(smtplib.SMTPSenderRefused(451, b"4.3.0 later", "a@example.com"), Stage.MAIL)
    step = apply(rec, exc)
    assert step.state is MessageState.DEAD
    assert "retries exhausted" in (rec.recipients[0].reason or "")


def test_interrupted_claim_flags_accepted_recipients() -> None:
    rec = record("a@x.org")
    apply(rec, result(rec, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)), interrupted=True)
    assert rec.state is MessageState.DELIVERED and rec.recipients[0].possible_duplicate


def test_too_many_recipients_with_nothing_accepted_backs_off() -> None:
    rec = record("a@x.org")
    step = apply(rec, result(rec, ("a@x.org", 452, "4.5.3 too many recipients", Stage.RCPT)))
    assert step.state is MessageState.DEFERRED and rec.next_attempt_at == NOW + 60
    assert rec.attempts == 1 and rec.recipients[0].attempts == 1
    assert rec.history[-1].decision is not None
    assert rec.history[-1].decision["rule"] == "too-many-recipients"


def test_too_many_recipients_after_an_acceptance_splits_at_once() -> None:
    rec = record("a@x.org", "b@x.org")
    step = apply(rec, result(rec, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT),
                             ("b@x.org", 452, "4.5.3 too many recipients", Stage.RCPT)))
    assert step.state is MessageState.QUEUED and rec.attempts == 0
    assert rec.recipient("b@x.org").state is RcptState.PENDING


def test_expiry_hold_and_requeue() -> None:
    rec = record("a@x.org")
    assert hold_until(rec, NOW, NOW + 30, "paused").state is MessageState.DEFERRED
    assert rec.next_attempt_at == NOW + 30 and rec.attempts == 0
    assert requeue(rec, NOW).state is MessageState.QUEUED
    step = apply_expiry(rec, NOW)
    assert step.state is MessageState.DEAD and "lifetime exceeded" in (rec.dead_reason or "")


def test_failure_after_a_split_keeps_the_recipients_already_delivered() -> None:
    rec = record("a@x.org", "b@x.org")
    exc = annotate(smtplib.SMTPSenderRefused(421, b"4.3.2 closing", "a@example.com"),
                   Stage.MAIL)
    attach_partial(exc, result(rec, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    apply(rec, exc)
    assert rec.recipient("a@x.org").state is RcptState.DELIVERED
    assert rec.recipient("b@x.org").state is RcptState.DEFERRED
    assert [r.address for r in rec.open_recipients] == ["b@x.org"]


def test_421_at_rcpt_backs_off_the_relay() -> None:
    rec = record("a@x.org", attempts=2)
    exc = annotate(smtplib.SMTPRecipientsRefused({"a@x.org": (421, b"4.7.0 slow down")}),
                   Stage.RCPT)
    step = apply(rec, exc, relay_failures=3)
    d = step.relay_decision
    assert d is not None and (d.action, d.scope, d.rule) == (
        Action.RETRY, Scope.RELAY, "service-unavailable")
    assert d.relay_pause == d.delay == 120  # relay_backoff at the relay's 3rd failure
    assert rec.attempts == 2 and rec.recipients[0].attempts == 0  # no attempt spent
    assert step.state is MessageState.DEFERRED and rec.next_attempt_at == NOW + 120


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
    assert step.state is MessageState.DEFERRED
    assert sum(r.state is RcptState.DELIVERED for r in rec.recipients) == 666


# --- decisions recorded, and the uncertain budget ----------------------------------------

def test_the_decision_is_recorded_with_the_attempt() -> None:
    rec = record("a@x.org")
    apply(rec, annotate(smtplib.SMTPDataError(451, b"4.3.0 later"), Stage.DATA))
    d = rec.history[-1].decision
    assert d is not None and (d["action"], d["scope"], d["rule"], d["delay"]) == (
        "retry", "message", "message-4xx", 60)
    assert d["uncertain_spent"] == 0 and d["counts_as_attempt"] is True
    assert Record.from_json(rec.to_json()).history[-1].decision == d  # stored as JSON
    delivered = record("a@x.org")
    apply(delivered, result(delivered, ("a@x.org", 250, "2.0.0 OK", Stage.AFTER_DOT)))
    assert delivered.history[-1].decision is None


def lost() -> BaseException:
    return annotate(DeliveryUncertain("no reply after the final dot"), Stage.AFTER_DOT)


def test_uncertain_budget_dead_letters_as_may_have_been_delivered() -> None:
    rec = record("a@x.org")
    step = apply(rec, lost())
    assert step.state is MessageState.DEFERRED and uncertain_spent(rec) == 1
    step = apply(rec, lost(), now=NOW + 120)
    assert step.state is MessageState.DEAD and rec.attempts == 2
    assert rec.recipients[0].reason is not None
    assert rec.recipients[0].reason.startswith("may have been delivered: ")
    assert "may have been delivered" in (rec.dead_reason or "")
    assert rec.possible_duplicate


def test_an_interruption_spends_the_uncertain_budget_too() -> None:
    rec = record("a@x.org")
    step = apply(rec, lost(), interrupted=True)  # a dead worker's send, then a lost reply
    assert step.state is MessageState.DEAD
    assert rec.history[-1].decision is not None
    assert rec.history[-1].decision["uncertain_spent"] == 2


def test_an_operator_retry_gives_the_budget_back() -> None:
    rec = record("a@x.org")
    apply(rec, lost())
    rec.history.append(Attempt(number=2, started_at=NOW, finished_at=NOW,
                               outcome="operator_retry", relay="default"))
    assert uncertain_spent(rec) == 0
    assert apply(rec, lost(), now=NOW + 1).state is MessageState.DEFERRED


def test_failures_before_the_dot_spend_no_uncertain_budget() -> None:
    rec = record("a@x.org")
    for n in range(3):
        apply(rec, annotate(smtplib.SMTPServerDisconnected("gone"), Stage.DATA), now=NOW + n)
    assert uncertain_spent(rec) == 0 and rec.state is MessageState.DEFERRED


# --- holds and relay pauses, applied as decided ---------------------------------------------

def test_holds_apply_the_policy_delay_without_an_attempt() -> None:
    rec = record("a@x.org", attempts=1)
    step = apply_hold(rec, NOW, POLICY.hold("relay paused: bad password", 42))
    assert (step.state, step.score, rec.attempts) == (MessageState.DEFERRED, NOW + 42, 1)
    assert rec.last_error == "relay paused: bad password"
    late = record("a@x.org")
    assert apply_hold(late, NOW, POLICY.hold("x", 10 * 86400)).state is MessageState.DEAD


def test_a_relay_pause_holds_the_rest_of_the_chunk() -> None:
    pause = POLICY.decide(failure_of(annotate(ConnectionRefusedError(), Stage.CONNECT)))
    until = pause_until(NOW, pause)
    assert until == NOW + 30
    rec = record("a@x.org")
    step = apply(rec, annotate(smtplib.SMTPDataError(451, b"4.3.0 later"), Stage.DATA))
    early = record("b@x.org")
    early_step = apply(early, annotate(smtplib.SMTPDataError(451, b"x"), Stage.DATA))
    assert defer_behind(rec, step, NOW + 600).score == NOW + 600 == rec.next_attempt_at
    assert defer_behind(early, early_step, NOW + 10).score == NOW + 60  # already later
