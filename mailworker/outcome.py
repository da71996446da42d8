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
from mailworker.smtp import SendResult
from mailworker.smtp.errors import (
    Stage,
    enhanced_code_of,
    error_code,
    error_enhanced_code,
    error_stage,
    error_text,
)
from mailworker.store.record import Attempt, MessageState, RcptState, Record, Reply

__all__ = ["Step", "apply_expiry", "apply_relay_hold", "apply_result", "requeue"]


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
    """Fold *result* into *record* and decide its next state."""
    age = now - record.created_at
    lifetime = record.expires_at - record.created_at
    attempt_no = record.attempts + 1
    counters: dict[str, int] = {}
    replies: list[dict[str, Any]] = []
    delays: list[float] = []
    retry_now = False
    relay_decision: Decision | None = None
    counted = False
    error_info: dict[str, Any] | None = None
    outcome = "delivered"

    def settle(rs_addr: str, code: int | None, text: str, enhanced: str | None,
               stage: Stage | None, decision: Decision | None) -> None:
        nonlocal retry_now, counted
        rs = record.recipient(rs_addr)
        rs.reply = Reply(code, text, enhanced, stage.value if stage else None)
        rs.updated_at = now
        if decision is None:
            rs.state = RcptState.DELIVERED
            rs.attempts += 1
            counters["delivered"] = counters.get("delivered", 0) + 1
            return
        if decision.counts_as_attempt:
            rs.attempts += 1
            counted = True
        rs.reason = decision.reason
        if decision.possible_duplicate:
            rs.possible_duplicate = True
            record.possible_duplicate = True
        if decision.action is Action.FAIL:
            rs.state = RcptState.FAILED
            counters["failed"] = counters.get("failed", 0) + 1
        elif decision.action is Action.RETRY_NOW:
            rs.state = RcptState.PENDING
            retry_now = True
        else:
            rs.state = RcptState.DEFERRED
            delays.append(decision.delay)

    open_addrs = [r.address for r in record.open_recipients]
    if isinstance(result, SendResult):
        for rr in result.recipients:
            replies.append(_reply_dict(rr.recipient, rr.code, rr.text, rr.enhanced_code,
                                       rr.stage.value))
            if rr.accepted:
                settle(rr.recipient, rr.code, rr.text, rr.enhanced_code, rr.stage, None)
            else:
                d = policy.decide(code=rr.code, enhanced_code=rr.enhanced_code, stage=rr.stage,
                                  attempt=attempt_no, age=age, lifetime=lifetime, rng=rng)
                settle(rr.recipient, rr.code, rr.text, rr.enhanced_code, rr.stage, d)
                outcome = "partial"
        if interrupted:
            for rr in result.recipients:
                if rr.accepted:
                    rs = record.recipient(rr.recipient)
                    rs.possible_duplicate = record.possible_duplicate = True
    elif isinstance(result, smtplib.SMTPRecipientsRefused) and result.recipients:
        # Every recipient refused at RCPT: each is decided by its own reply.
        outcome = "refused"
        for addr, (code, msg) in result.recipients.items():
            text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
            enh = enhanced_code_of(text)
            replies.append(_reply_dict(addr, code, text, enh, Stage.RCPT.value))
            d = policy.decide(code=code, enhanced_code=enh, stage=Stage.RCPT, attempt=attempt_no,
                              age=age, lifetime=lifetime, rng=rng)
            if addr in open_addrs:
                settle(addr, code, text, enh, Stage.RCPT, d)
    else:
        exc = result
        d = policy.decide(error=exc, attempt=attempt_no, age=age, lifetime=lifetime, rng=rng)
        ecode, enh, stage = error_code(exc), error_enhanced_code(exc), error_stage(exc)
        text = error_text(exc)
        error_info = {"class": type(exc).__name__, "code": ecode, "enhanced_code": enh,
                      "stage": stage.value if stage else None, "text": text}
        replies.append(_reply_dict(None, ecode, text, enh, stage.value if stage else None))
        record.last_error = text
        outcome = d.action.value
        if d.scope is Scope.RELAY:
            relay_decision = d
        for addr in open_addrs:
            settle(addr, ecode, text, enh, stage, d)

    if counted:
        record.attempts = attempt_no
    record.history.append(Attempt(
        number=len(record.history) + 1, started_at=started_at, finished_at=now,
        outcome=outcome, relay=relay, task_id=task_id, worker=worker, error=error_info,
        replies=replies,
    ))
    counters["attempts"] = 1
    if retry_now and not counters.get("delivered"):
        # "Too many recipients" on a transaction that took nobody: retrying at once would
        # loop, so back off like any temporary failure.
        retry_now = False
        delays.append(policy.backoff.delay(attempt_no, rng))
    step = _next_state(record, now, delays, retry_now, counters)
    step.relay_decision = relay_decision
    return step


def _next_state(record: Record, now: float, delays: list[float], retry_now: bool,
                counters: dict[str, int]) -> Step:
    record.updated_at = now
    record.sending_since = None
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
