"""Dead letters: list, inspect, retry and purge messages that ended undelivered.

A dead letter keeps its whole history (every attempt's replies). Retrying one sends again
only to the recipients that were not delivered; delivered recipients are final.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from mailworker.publish import Publisher, wake
from mailworker.record import Attempt, MessageState, RcptState, Record
from mailworker.runtime import get_runtime
from mailworker.store import Claim

__all__ = ["DeadLetterFilter", "exception_classes", "list_dead", "purge", "retry", "show"]


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters an operation applies to; every given field must match."""

    relay: str | None = None
    code: int | None = None            # a failed recipient's (or the last error's) reply code
    exception: str | None = None       # an error class met, e.g. "SMTPRecipientsRefused"
    domain: str | None = None          # a failed recipient's domain
    older_than: float | None = None    # seconds since dead-lettered
    newer_than: float | None = None
    reason: str | None = None          # text in the dead reason, e.g. "may have been delivered"

    def matches(self, rec: Record, now: float) -> bool:
        failed = [r for r in rec.recipients if r.state is RcptState.FAILED]
        if self.relay and rec.relay != self.relay:
            return False
        if self.domain:
            want = self.domain.lower().lstrip("@")
            if not any(r.address.rsplit("@", 1)[-1].lower() == want for r in failed):
                return False
        if self.code is not None:
            codes = {r.reply.code for r in failed if r.reply}
            codes |= {a.error.get("code") for a in rec.history[-1:] if a.error}
            if self.code not in codes:
                return False
        if self.exception:
            want = self.exception.removeprefix("smtplib.")
            if want not in exception_classes(rec):
                return False
        if self.reason and self.reason.lower() not in (rec.dead_reason or "").lower():
            return False
        age = now - (rec.dead_at or rec.updated_at or rec.created_at)
        if self.older_than is not None and age < self.older_than:
            return False
        return not (self.newer_than is not None and age > self.newer_than)


#: The smtplib exception a refusal at each stage raises (or, for a refusal of some
#: recipients only, would have raised had they been alone): a recipient refused at RCPT
#: is an SMTPRecipientsRefused although the attempt as a whole succeeded for the others.
_STAGE_EXCEPTIONS = {"mail": "SMTPSenderRefused", "rcpt": "SMTPRecipientsRefused",
                     "data": "SMTPDataError", "after-dot": "SMTPDataError"}


def exception_classes(rec: Record) -> set[str]:
    """The exception class names a dead letter met: whole-attempt errors from its history,
    plus the class of each per-recipient refusal (see ``_STAGE_EXCEPTIONS``)."""
    classes = {str(a.error.get("class")) for a in rec.history if a.error}
    refusals = [(x.get("stage"), x.get("code")) for a in rec.history for x in a.replies]
    refusals += [(r.reply.stage, r.reply.code) for r in rec.recipients
                 if r.state is RcptState.FAILED and r.reply]
    for stage, code in refusals:
        if isinstance(code, int) and code >= 400 and stage in _STAGE_EXCEPTIONS:
            classes.add(_STAGE_EXCEPTIONS[stage])
    return classes


def list_dead(flt: DeadLetterFilter | None = None, limit: int = 1000) -> list[Record]:
    """Dead letters matching *flt*, oldest first."""
    store = get_runtime().store
    flt = flt or DeadLetterFilter()
    now = time.time()
    out: list[Record] = []
    ids = store.dead_ids()
    for start in range(0, len(ids), 500):
        for rec in store.get_many(ids[start:start + 500]):
            if rec is not None and rec.state is MessageState.DEAD and flt.matches(rec, now):
                out.append(rec)
                if len(out) >= limit:
                    return out
    return out


def show(message_id: str) -> Record | None:
    return get_runtime().store.get(message_id)


def _select(ids: Sequence[str] | None, flt: DeadLetterFilter | None) -> list[Record]:
    if ids:
        recs = get_runtime().store.get_many(list(ids))
        return [r for r in recs if r is not None and r.state is MessageState.DEAD]
    return list_dead(flt, limit=1_000_000)


def retry(ids: Sequence[str] | None = None, flt: DeadLetterFilter | None = None,
          dry_run: bool = False, publish: Publisher | None = None) -> list[str]:
    """Queue dead letters again for their undelivered recipients; return the ids retried.

    Wake-ups go through *publish* (default: the runtime's publisher); one that cannot be
    published is logged, never raised: the records are requeued, and the sweeper wakes
    them.

    The message gets a fresh lifetime from its queue and a fresh attempt budget; its
    history is kept, with an entry saying an operator retried it.
    """
    rt = get_runtime()
    selected = _select(ids, flt)
    if dry_run or not selected:
        return [r.id for r in selected]
    now = time.time()
    # Records set aside as unreadable or invalid go back in flight as they are (after an
    # operator fixed them, or upgraded the workers that could not read them); a worker
    # checks them again and sets them aside again if they are still bad.
    stuck = [r.id for r, q in zip(selected, rt.store.quarantined([r.id for r in selected]),
                                  strict=True) if q]
    readmitted = [mid for mid, ok in zip(
        stuck, rt.store.readmit_many(stuck, now + rt.settings.stuck_after), strict=True) if ok]
    by_id = {r.id: r for r in selected}
    selected = [r for r in selected if r.id not in set(stuck)]
    token = uuid.uuid4().hex
    claims = rt.store.claim_many([r.id for r in selected], token, 30.0,
                                 now + rt.settings.stuck_after)
    saves = []
    for claim in claims.values():
        if not isinstance(claim, Claim):  # gone, busy, or unreadable (purge those)
            continue
        if claim.record.state is not MessageState.DEAD:  # retried meanwhile: hands off
            rt.store.release_many([claim])
            continue
        rec = claim.record
        for r in rec.recipients:
            if r.state is RcptState.FAILED:
                r.state, r.attempts, r.reason = RcptState.PENDING, 0, None
        rec.state, rec.attempts, rec.next_attempt_at = MessageState.QUEUED, 0, None
        rec.expires_at = now + rt.settings.lifetime(rec.queue)
        rec.dead_reason, rec.dead_at = None, None
        rec.history.append(Attempt(number=len(rec.history) + 1, started_at=now,
                                   finished_at=now, outcome="operator_retry", relay=rec.relay))
        saves.append((claim, now + rt.settings.stuck_after, {"dlq_retried": 1}))
    ok = rt.store.commit_many(saves)
    done = [c.record for (c, _, _), saved in zip(saves, ok, strict=True) if saved]
    done += [by_id[mid] for mid in readmitted]
    # Requeued is requeued: a wake-up that fails to publish is logged, and the sweeper
    # wakes those records (they are in the in-flight set).
    wake(publish or rt.publisher, [(r.id, r.queue, r.relay) for r in done],
         rt.settings.batch_size)
    return [r.id for r in done]


def purge(ids: Sequence[str] | None = None, flt: DeadLetterFilter | None = None,
          dry_run: bool = False) -> list[str]:
    """Delete dead letters for good; return the ids purged (or that would be)."""
    selected = [r.id for r in _select(ids, flt)]
    if not dry_run:
        get_runtime().store.purge(selected)
    return selected
