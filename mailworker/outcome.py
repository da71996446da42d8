"""Apply one attempt's result to a record: per-recipient states, history, next step.

Pure (no I/O): given a record, what the SMTP layer returned or raised, the policy and the
clock, it updates the record in place and says where it goes next. The delivery loop
(``mailworker.delivery``) does the talking and the saving; this module does the deciding,
which is why it can be tested with plain values.
"""

from __future__ import annotations

import random
import smtplib
from dataclasses import dataclass
from typing import Any

from mailworker.policy import Action, AttemptState, Decision, Policy, Scope
from mailworker.record import Attempt, MessageState, RcptState, Record, Reply
from mailworker.smtp import SendResult
from mailworker.smtp.errors import Failure, Stage, failure_of

__all__ = ["Step", "apply_expiry", "apply_hold", "apply_result", "defer_behind", "hold_until",
           "mark_interrupted", "pause_until", "requeue", "uncertain_spent"]

#: History entries that record an operator's action; the uncertain budget starts again
#: after one (an operator who retries a "may have been delivered" letter means it).
_OPERATOR = frozenset({"operator_retry"})


@dataclass
class Step:
    """Where a record goes after an attempt, and what to count."""

    state: MessageState
    score: float                       # due time (deferred), watchdog (queued) or dead time
    counters: dict[str, int]
    relay_decision: Decision | None = None  # set when the relay itself must back off / pause


def uncertain_spent(record: Record) -> int:
    """Uncertain attempts (lost replies after the dot, interrupted sends) since the last
    operator retry, as recorded in each attempt's decision."""
    spent = 0
    for attempt in reversed(record.history):
        if attempt.outcome in _OPERATOR:
            break
        if attempt.decision:
            spent += int(attempt.decision.get("uncertain_spent", 0) or 0)
    return spent


def slowed_down(record: Record) -> int:
    """The record's latest attempts in a row that were held for a "slow down" reply."""
    held = 0
    for attempt in reversed(record.history):
        if not attempt.decision or attempt.decision.get("action") != Action.SLOW_DOWN.value:
            break
        held += 1
    return held


class _Attempt:
    """The bookkeeping of one attempt while its result is folded into the record."""

    def __init__(self, record: Record, policy: Policy, now: float, state: AttemptState,
                 rng: random.Random | None) -> None:
        self.record, self.policy, self.now, self.state, self.rng = record, policy, now, state, rng
        self.counters: dict[str, int] = {}
        self.replies: list[dict[str, Any]] = []
        self.decisions: list[Decision] = []
        self.relay_decision: Decision | None = None
        self.counted = False
        self.retry_now = False
        # Per-recipient lookups by address: linear in recipients per attempt, not quadratic.
        self.by_address = {r.address: r for r in record.recipients}

    def decide(self, failure: Failure) -> Decision:
        d = self.policy.decide(failure, self.state, self.rng)
        self.decisions.append(d)
        return d

    def count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def settle(self, address: str, code: int | None, text: str, enhanced: str | None,
               stage: Stage | None, decision: Decision | None) -> None:
        """One recipient's outcome: delivered (*decision* None) or the policy's decision."""
        self.replies.append({"recipient": address, "code": code, "enhanced_code": enhanced,
                             "text": text, "stage": stage.value if stage else None})
        rs = self.by_address[address]
        rs.reply = Reply(code, text, enhanced, stage.value if stage else None)
        rs.updated_at = self.now
        if decision is None:
            rs.state = RcptState.DELIVERED
            rs.attempts += 1
            self.count("delivered")
            return
        if decision.scope is Scope.RELAY and (
                self.relay_decision is None
                or decision.relay_pause > self.relay_decision.relay_pause):
            self.relay_decision = decision
        if decision.counts_as_attempt:
            rs.attempts += 1
            self.counted = True
        rs.reason = decision.reason
        if decision.possible_duplicate:
            rs.possible_duplicate = True
        if decision.action is Action.FAIL:
            rs.state = RcptState.FAILED
            self.count("failed")
        elif decision.action is Action.RETRY_NOW:
            rs.state = RcptState.PENDING
            self.retry_now = True
        else:
            rs.state = RcptState.DEFERRED

    def settle_result(self, result: SendResult, only: set[str] | None = None) -> bool:
        """Per-recipient outcomes of a transaction; True when anyone was refused."""
        refused = False
        relay = self.record.relay
        for rr in result.recipients:
            if only is not None and rr.recipient not in only:
                continue
            if rr.accepted:
                self.settle(rr.recipient, rr.code, rr.text, rr.enhanced_code, rr.stage, None)
            elif only is None:
                refused = True
                d = self.decide(Failure.reply(rr.code, rr.text, rr.stage, relay,
                                              rr.enhanced_code))
                self.settle(rr.recipient, rr.code, rr.text, rr.enhanced_code, rr.stage, d)
        return refused

    def next_decision(self) -> Decision | None:
        """The decision that sets when the message goes next: the earliest of those that
        defer someone, else the first (a failure); None when all were delivered."""
        deferring = [d for d in self.decisions if d.action in _DEFERS]
        if deferring:
            return min(deferring, key=lambda d: d.delay)
        return self.decisions[0] if self.decisions else None


_DEFERS = (Action.RETRY, Action.PAUSE_RELAY, Action.SLOW_DOWN)


def _delivered_in(result: SendResult | None) -> int:
    return len(result.accepted) if result is not None else 0


def apply_result(
    record: Record,
    result: SendResult | BaseException,
    *,
    policy: Policy,
    now: float,
    started_at: float,
    relay: str,
    relay_failures: int = 1,
    cohort_failed: bool | None = None,
    task_id: str | None = None,
    worker: str | None = None,
    interrupted: bool = False,
    rng: random.Random | None = None,
) -> Step:
    """Fold *result* into *record* and decide its next state.

    *relay_failures* is the relay's consecutive failures counting this attempt's, should it
    fail at host level (the policy grows the relay's pause with it); *cohort_failed* whether
    that failure completes a failed cohort (see ``AttemptState``). *interrupted*: an
    earlier holder died while sending this record, so whatever it sent is unknown; every
    open recipient is flagged as a possible duplicate, and the interruption spends the
    uncertain budget like a lost reply.
    """
    if interrupted:
        mark_interrupted(record)
    failure = None if isinstance(result, SendResult) else failure_of(result)
    partial = result if isinstance(result, SendResult) else failure.partial if failure else None
    uncertain = uncertain_spent(record) + int(interrupted)
    state = AttemptState(
        attempt=record.attempts + 1, uncertain=uncertain, relay_failures=max(1, relay_failures),
        age=now - record.created_at, lifetime=record.expires_at - record.created_at,
        delivered=_delivered_in(partial), cohort_failed=cohort_failed,
        slowed=slowed_down(record))
    att = _Attempt(record, policy, now, state, rng)
    open_addrs = {r.address for r in record.open_recipients}
    error_info: dict[str, Any] | None = None
    outcome = "delivered"
    if isinstance(result, SendResult):
        if att.settle_result(result):
            outcome = "partial"
    else:
        assert failure is not None
        # An earlier transaction of a 452 split may have been accepted before the failure:
        # those recipients are delivered, and the failure applies to the others only.
        if failure.partial is not None:
            att.settle_result(failure.partial, only=open_addrs)
            open_addrs = {r.address for r in record.open_recipients}
        if isinstance(result, smtplib.SMTPRecipientsRefused) and result.recipients:
            outcome = "refused"
            for addr, (code, msg) in result.recipients.items():
                if addr in open_addrs:
                    refusal = Failure.reply(code, msg, Stage.RCPT, relay)
                    att.settle(addr, refusal.code, refusal.text, refusal.enhanced_code,
                               Stage.RCPT, att.decide(refusal))
        else:
            d = att.decide(failure)
            error_info = failure.as_dict()
            record.last_error = failure.summary
            outcome = d.action.value
            for addr in [r.address for r in record.recipients if r.address in open_addrs]:
                att.settle(addr, failure.code, failure.text, failure.enhanced_code,
                           failure.stage, d)

    if att.counted:
        record.attempts = state.attempt
    decision = att.next_decision()
    if record.open_recipients and not att.retry_now and (
            decision is None or decision.action not in _DEFERS):
        # Open recipients no reply decided (defensive: the SMTP layer answers for every
        # recipient); the policy says when they go again.
        decision = policy.unsettled(state, rng)
    spent = int(interrupted) + int(any(d.uncertain for d in att.decisions))
    record.history.append(Attempt(
        number=len(record.history) + 1, started_at=started_at, finished_at=now,
        outcome=outcome, relay=relay, task_id=task_id, worker=worker, error=error_info,
        replies=att.replies,
        decision=None if decision is None and not spent else {
            **(decision.as_dict() if decision else {}), "uncertain_spent": spent},
    ))
    att.counters["attempts"] = 1
    delay = decision.delay if decision is not None and decision.action in _DEFERS else None
    step = _next_state(record, now, delay, att.retry_now, att.counters)
    step.relay_decision = att.relay_decision
    return step


def mark_interrupted(record: Record) -> None:
    """An earlier worker died mid-send: any open recipient may already have a copy."""
    for r in record.open_recipients:
        r.possible_duplicate = True


def _next_state(record: Record, now: float, delay: float | None, retry_now: bool,
                counters: dict[str, int]) -> Step:
    record.updated_at = now
    record.sending_since = None
    if any(r.possible_duplicate for r in record.recipients):
        record.possible_duplicate = True
    if not record.open_recipients:
        failed = [r for r in record.recipients if r.state is RcptState.FAILED]
        if failed:
            record.state = MessageState.DEAD
            record.dead_at = now
            record.dead_reason = "; ".join(
                f"{r.address}: "
                + (f"{r.reply.code or ''} {r.reply.text}".strip() if r.reply else "failed")
                + (f" ({r.reason})" if r.reason else "")
                for r in failed
            )
            record.next_attempt_at = None
            counters["dead"] = 1
            return Step(MessageState.DEAD, now, counters)
        record.state = MessageState.DELIVERED
        record.next_attempt_at = None
        return Step(MessageState.DELIVERED, now, counters)
    if retry_now:
        record.state = MessageState.QUEUED
        record.next_attempt_at = now
        return Step(MessageState.QUEUED, now, counters)
    assert delay is not None, "open recipients need a deferring decision"
    due = now + delay
    if due > record.expires_at:
        return apply_expiry(record, now, counters)
    record.state = MessageState.DEFERRED
    record.next_attempt_at = due
    for r in record.open_recipients:
        r.state = RcptState.DEFERRED
    counters["deferred"] = counters.get("deferred", 0) + 1
    return Step(MessageState.DEFERRED, due, counters)


def apply_expiry(record: Record, now: float, counters: dict[str, int] | None = None) -> Step:
    """The message is past its lifetime: every open recipient fails, the record is dead."""
    counters = counters if counters is not None else {}
    for r in record.open_recipients:
        r.state = RcptState.FAILED
        r.reason = "lifetime exceeded" + (f" (last reply: {r.reply.text})" if r.reply else "")
        r.updated_at = now
        counters["failed"] = counters.get("failed", 0) + 1
    return _next_state(record, now, None, False, counters)


def requeue(record: Record, now: float) -> Step:
    """Queue again at once, untouched: nothing was sent, so nothing is counted."""
    record.state = MessageState.QUEUED
    record.next_attempt_at = now
    record.updated_at = now
    record.sending_since = None
    return Step(MessageState.QUEUED, now, {})


def apply_hold(record: Record, now: float, decision: Decision) -> Step:
    """Hold the record for ``decision.delay`` without an attempt (relay paused, unknown
    relay, fleet limit)."""
    return hold_until(record, now, now + decision.delay, decision.reason)


def hold_until(record: Record, now: float, until: float, reason: str) -> Step:
    """Move the record to *until* without an attempt (behind a relay pause); past its
    lifetime it is dead-lettered now instead."""
    if until > record.expires_at:
        record.last_error = reason
        return apply_expiry(record, now)
    record.state = MessageState.DEFERRED
    record.next_attempt_at = until
    record.last_error = reason
    record.updated_at = now
    record.sending_since = None
    return Step(MessageState.DEFERRED, until, {})


def pause_until(now: float, decision: Decision) -> float:
    """When a relay paused by *decision* at *now* may be tried again."""
    return now + decision.relay_pause


def defer_behind(record: Record, step: Step, until: float) -> Step:
    """A deferred record of a chunk whose relay was paused waits for the pause to end
    (unless that is past its lifetime: then it keeps its own due time)."""
    if step.state is MessageState.DEFERRED and record.next_attempt_at is not None:
        due = max(record.next_attempt_at, until)
        if due <= record.expires_at:
            record.next_attempt_at = step.score = due
    return step
