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

from mailworker.policy import Action, Decision, Policy, Scope
from mailworker.record import Attempt, MessageState, RcptState, Record, Reply
from mailworker.smtp import SendResult
from mailworker.smtp.errors import (
    Stage,
    enhanced_code_of,
    error_code,
    error_enhanced_code,
    error_stage,
    error_text,
)

__all__ = ["Step", "apply_expiry", "apply_relay_hold", "apply_result", "mark_interrupted",
           "requeue"]


@dataclass
class Step:
    """Where a record goes after an attempt, and what to count."""

    state: MessageState
    score: float                       # due time (deferred), watchdog (queued) or dead time
    counters: dict[str, int]
    relay_decision: Decision | None = None  # set when the relay itself must back off / pause


def _reply_dict(rcpt: str | None, code: int | None, text: str, enhanced: str | None,
                stage: str | None) -> dict[str, Any]:
    return {"recipient": rcpt, "code": code, "enhanced_code": enhanced, "text": text,
            "stage": stage}


class _Attempt:
    """The bookkeeping of one attempt while its result is folded into the record."""

    def __init__(self, record: Record, policy: Policy, now: float,
                 rng: random.Random | None) -> None:
        self.record, self.policy, self.now, self.rng = record, policy, now, rng
        self.age = now - record.created_at
        self.lifetime = record.expires_at - record.created_at
        self.number = record.attempts + 1
        self.counters: dict[str, int] = {}
        self.replies: list[dict[str, Any]] = []
        self.delays: list[float] = []
        self.retry_now: list[str] = []
        self.relay_decision: Decision | None = None
        self.counted = False
        # Per-recipient lookups by address: linear in recipients per attempt, not quadratic.
        self.by_address = {r.address: r for r in record.recipients}

    def decide(self, **kw: Any) -> Decision:
        return self.policy.decide(attempt=self.number, age=self.age, lifetime=self.lifetime,
                                  rng=self.rng, **kw)

    def count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def settle(self, address: str, code: int | None, text: str, enhanced: str | None,
               stage: Stage | None, decision: Decision | None) -> None:
        """One recipient's outcome: delivered (*decision* None) or the policy's decision."""
        self.replies.append(_reply_dict(address, code, text, enhanced,
                                        stage.value if stage else None))
        rs = self.by_address[address]
        rs.reply = Reply(code, text, enhanced, stage.value if stage else None)
        rs.updated_at = self.now
        if decision is None:
            rs.state = RcptState.DELIVERED
            rs.attempts += 1
            self.count("delivered")
            return
        if decision.scope is Scope.RELAY:
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
            self.retry_now.append(address)
        else:
            rs.state = RcptState.DEFERRED
            self.delays.append(decision.delay)

    def settle_result(self, result: SendResult, only: set[str] | None = None) -> bool:
        """Per-recipient outcomes of a transaction; True when anyone was refused."""
        refused = False
        for rr in result.recipients:
            if only is not None and rr.recipient not in only:
                continue
            if rr.accepted:
                self.settle(rr.recipient, rr.code, rr.text, rr.enhanced_code, rr.stage, None)
            elif only is None:
                refused = True
                d = self.decide(code=rr.code, enhanced_code=rr.enhanced_code, stage=rr.stage)
                self.settle(rr.recipient, rr.code, rr.text, rr.enhanced_code, rr.stage, d)
        return refused


def apply_result(
    record: Record,
    result: SendResult | BaseException,
    *,
    policy: Policy,
    now: float,
    started_at: float,
    relay: str,
    task_id: str | None = None,
    worker: str | None = None,
    interrupted: bool = False,
    rng: random.Random | None = None,
) -> Step:
    """Fold *result* into *record* and decide its next state.

    *interrupted*: an earlier holder died while sending this record, so whatever it
    sent is unknown; every open recipient is flagged as a possible duplicate.
    """
    if interrupted:
        mark_interrupted(record)
    att = _Attempt(record, policy, now, rng)
    open_addrs = {r.address for r in record.open_recipients}
    error_info: dict[str, Any] | None = None
    outcome = "delivered"
    if isinstance(result, SendResult):
        if att.settle_result(result):
            outcome = "partial"
    else:
        # An earlier transaction of a 452 split may have been accepted before the failure:
        # those recipients are delivered, and the failure applies to the others only.
        partial = getattr(result, "result", None)
        if isinstance(partial, SendResult):
            att.settle_result(partial, only=open_addrs)
            open_addrs = {r.address for r in record.open_recipients}
        if isinstance(result, smtplib.SMTPRecipientsRefused) and result.recipients:
            outcome = "refused"
            for addr, (code, msg) in result.recipients.items():
                if addr not in open_addrs:
                    continue
                text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
                enh = enhanced_code_of(text)
                d = att.decide(code=code, enhanced_code=enh, stage=Stage.RCPT)
                att.settle(addr, code, text, enh, Stage.RCPT, d)
        else:
            d = att.decide(error=result)
            ecode, enh, stage = error_code(result), error_enhanced_code(result), error_stage(result)
            text = error_text(result)
            error_info = {"class": type(result).__name__, "code": ecode, "enhanced_code": enh,
                          "stage": stage.value if stage else None, "text": text}
            record.last_error = text
            outcome = d.action.value
            for addr in [r.address for r in record.recipients if r.address in open_addrs]:
                att.settle(addr, ecode, text, enh, stage, d)

    if att.retry_now and not att.counters.get("delivered"):
        # "Too many recipients" on a transaction that took nobody: retrying at once would
        # loop, so it backs off and counts like any temporary failure.
        for addr in att.retry_now:
            rs = att.by_address[addr]
            rs.state, rs.attempts = RcptState.DEFERRED, rs.attempts + 1
        att.counted, att.retry_now = True, []
        att.delays.append(policy.backoff.delay(att.number, rng))
    if att.counted:
        record.attempts = att.number
    record.history.append(Attempt(
        number=len(record.history) + 1, started_at=started_at, finished_at=now,
        outcome=outcome, relay=relay, task_id=task_id, worker=worker, error=error_info,
        replies=att.replies,
    ))
    att.counters["attempts"] = 1
    step = _next_state(record, now, att.delays, bool(att.retry_now), att.counters)
    step.relay_decision = att.relay_decision
    return step


def mark_interrupted(record: Record) -> None:
    """An earlier worker died mid-send: any open recipient may already have a copy."""
    for r in record.open_recipients:
        r.possible_duplicate = True


def _next_state(record: Record, now: float, delays: list[float], retry_now: bool,
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
    due = now + (min(delays) if delays else 60.0)
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
    return _next_state(record, now, [], False, counters)


def requeue(record: Record, now: float) -> Step:
    """Queue again at once, untouched: nothing was sent, so nothing is counted."""
    record.state = MessageState.QUEUED
    record.next_attempt_at = now
    record.updated_at = now
    record.sending_since = None
    return Step(MessageState.QUEUED, now, {})


def apply_relay_hold(record: Record, now: float, until: float, reason: str) -> Step:
    """The relay is paused: move the record to *until* without an attempt."""
    if until > record.expires_at:
        record.last_error = reason
        return apply_expiry(record, now)
    record.state = MessageState.DEFERRED
    record.next_attempt_at = until
    record.last_error = reason
    record.updated_at = now
    record.sending_since = None
    return Step(MessageState.DEFERRED, until, {})
