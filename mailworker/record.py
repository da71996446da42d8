"""The message record: envelope, per-recipient state and the history of every attempt.

A record is plain data, stored as one JSON document beside the raw MIME bytes. It is the
truth about a message (docs/architecture.md); a broker message only says "look at id X".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, TypeVar

import orjson

__all__ = ["Attempt", "MessageState", "RcptState", "RecipientState", "Record", "Reply",
           "invalid_reason"]

#: History entries that record an operator's action, not a delivery attempt.
_NOT_ATTEMPTS = frozenset({"operator_retry"})


def _dumps(value: Any) -> str:
    # orjson (a dependency) is about 4x faster than json on records; output is the same.
    # What only json writes (a lone surrogate, an integer past 64 bits: a document of an
    # earlier version, read back by _loads's json fallback) is written by json, as before.
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)


def _loads(raw: str | bytes) -> Any:
    """orjson's parse (about 3x faster on records, the same values); a document only the
    standard library reads (NaN, Infinity, integers past 64 bits: hand-edited, or
    another version's) is read as before, so invalid_reason names what is wrong with it."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


class MessageState(StrEnum):
    """Where a message is. ``delivered`` and ``dead`` are final."""

    QUEUED = "queued"        # waiting for a worker (a wake-up is, or will be, on the broker)
    SENDING = "sending"      # a worker holds the lease
    DEFERRED = "deferred"    # waiting in the deferred set until next_attempt_at
    DELIVERED = "delivered"  # every recipient delivered
    DEAD = "dead"            # ended with at least one recipient undelivered: in the dead-letter set

    @property
    def final(self) -> bool:
        return self in (MessageState.DELIVERED, MessageState.DEAD)


class RcptState(StrEnum):
    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"

    @property
    def open(self) -> bool:
        """Still to be sent to: a retry sends only to these."""
        return self in (RcptState.PENDING, RcptState.DEFERRED)


@dataclass
class Reply:
    """The last word from a server about one recipient (or the whole message)."""

    code: int | None
    text: str
    enhanced_code: str | None = None
    stage: str | None = None


_T = TypeVar("_T")
_FIELDS: dict[type, frozenset[str]] = {}


def _build(cls: type[_T], d: dict[str, Any]) -> _T:
    """``cls(**d)``, keeping keys *cls* does not know aside in ``_extra``."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    if d.keys() <= names:
        return cls(**d)
    obj = cls(**{k: v for k, v in d.items() if k in names})
    object.__setattr__(obj, "_extra", {k: v for k, v in d.items() if k not in names})
    return obj


def _plain(obj: Any) -> dict[str, Any]:
    d = dict(obj.__dict__)
    extra = d.pop("_extra", None)
    return {**extra, **d} if extra else d


@dataclass
class RecipientState:
    address: str
    state: RcptState = RcptState.PENDING
    attempts: int = 0
    reply: Reply | None = None
    updated_at: float | None = None
    possible_duplicate: bool = False
    reason: str | None = None


@dataclass
class Attempt:
    """One delivery attempt, kept forever with the record (dead letters show it all)."""

    number: int
    started_at: float
    finished_at: float
    outcome: str
    relay: str
    task_id: str | None = None
    worker: str | None = None
    error: dict[str, Any] | None = None
    replies: list[dict[str, Any]] = field(default_factory=list)
    decision: dict[str, Any] | None = None


@dataclass
class Record:
    id: str
    queue: str
    relay: str
    sender: str
    recipients: list[RecipientState]
    created_at: float
    expires_at: float
    size: int
    message_id: str | None = None
    state: MessageState = MessageState.QUEUED
    attempts: int = 0
    next_attempt_at: float | None = None
    send_at: float | None = None
    possible_duplicate: bool = False
    idempotency_key: str | None = None
    updated_at: float | None = None
    last_error: str | None = None
    dead_reason: str | None = None
    dead_at: float | None = None
    sending_since: float | None = None
    history: list[Attempt] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    # A message split by routing rules (one record per relay): the ids of all its parts,
    # in order, this one included; empty for a message that was not split.
    parts: list[str] = field(default_factory=list)

    @property
    def open_recipients(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state.open]

    def recipient(self, address: str) -> RecipientState:
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(address)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON; hand-written because ``dataclasses.asdict`` deep-copies
        every field and was the largest cost of saving a record (measured: 62 vs 14 us)."""
        d = _plain(self)
        d["state"] = self.state.value
        d["recipients"] = [
            {**_plain(r), "state": r.state.value,
             "reply": _plain(r.reply) if r.reply else None}
            for r in self.recipients
        ]
        d["history"] = [_plain(a) for a in self.history]
        return d

    def to_json(self) -> str:
        return _dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: str | bytes) -> Record:
        """Parse a stored record. Fields this version does not know (written by a newer
        one during a rolling deploy) are kept and written back unchanged, never an error."""
        d = _loads(raw)
        d["state"] = MessageState(d["state"])
        d["recipients"] = [
            _build(RecipientState, {
                **r,
                "state": RcptState(r["state"]),
                "reply": _build(Reply, r["reply"]) if r.get("reply") else None,
            })
            for r in d["recipients"]
        ]
        d["history"] = [_build(Attempt, a) for a in d.get("history", [])]
        return _build(cls, d)

    @property
    def attempts_made(self) -> int:
        """Delivery attempts made: history entries, without operator actions (a DLQ retry).

        ``attempts`` itself counts the *failed* attempts the retry policy numbers its
        backoff by, so it stays 0 for mail delivered at the first try.
        """
        return sum(1 for a in self.history if a.outcome not in _NOT_ATTEMPTS)

    def reason(self) -> str | None:
        """Why the message is not delivered yet (or is dead), in one line; None if it is
        delivered or has not been tried."""
        if self.state is MessageState.DEAD:
            return self.dead_reason
        if self.state is MessageState.DELIVERED:
            return None
        last = self.history[-1] if self.history else None
        # A hold without an attempt (relay paused, unknown relay) updates the record after
        # the last attempt, and only last_error says why.
        if last is None or (self.updated_at or 0) > last.finished_at:
            return self.last_error
        if last.error:
            return str(last.error.get("text") or self.last_error)
        waiting = [r for r in self.open_recipients if r.reply]
        replies = "; ".join(
            f"{r.address}: " + " ".join(str(x) for x in (r.reply.code, r.reply.text) if x)
            for r in waiting[:3] if r.reply)
        more = f" (+{len(waiting) - 3} more)" if len(waiting) > 3 else ""
        return (replies + more) or self.last_error

    def summary(self) -> dict[str, Any]:
        """What ``mailworker.status()`` returns: state per recipient, no message body.

        ``attempts`` is the number of delivery attempts made (what a recipient's own
        ``attempts`` also counts); ``failed_attempts`` the policy's failure count;
        ``reason`` why the message waits or died.
        """
        d = self.to_dict()
        d.pop("history")
        d["failed_attempts"] = self.attempts
        d["attempts"] = self.attempts_made
        d["reason"] = self.reason()
        return d


def _finite(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value))


def _count(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def invalid_reason(rec: Record) -> str | None:
    """Why a stored record cannot be delivered as it is, or None.

    Checked before any SMTP, field by field for everything the delivery path reads, so
    that one bad record (written by another version, edited by hand) is set aside
    instead of failing every batch it is in, before or after its mail was sent.
    """
    for name in ("created_at", "expires_at"):
        if not _finite(getattr(rec, name)):
            return f"{name} is {getattr(rec, name)!r}, not a finite time"
    for name in ("next_attempt_at", "send_at", "updated_at", "dead_at", "sending_since"):
        value = getattr(rec, name)
        if value is not None and not _finite(value):
            return f"{name} is {value!r}, not a finite time or null"
    for name in ("id", "queue", "relay", "sender"):
        if not isinstance(getattr(rec, name), str):
            return f"{name} is {type(getattr(rec, name)).__name__}, not a string"
    if not _count(rec.attempts) or not _count(rec.size):
        return "attempts and size must be whole numbers"
    if not isinstance(rec.history, list) or not isinstance(rec.metadata, dict):
        return "history must be a list and metadata an object"
    if not isinstance(rec.recipients, list) or not rec.recipients:
        return "no recipient list"
    for r in rec.recipients:
        if not isinstance(r.address, str) or not _count(r.attempts):
            return f"recipient {r.address!r}: address must be a string, attempts a count"
        if r.reply is not None and not (r.reply.code is None or _count(r.reply.code)):
            return f"recipient {r.address!r}: reply code {r.reply.code!r} is not a number"
    return None
