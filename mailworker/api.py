"""The enqueue API: validate, write the record, publish a wake-up. Nothing talks SMTP here.

``send()`` returns once the record is in Redis and a wake-up is on the broker. If the
publish fails after the record is written, the mail is not lost: the record sits in the
in-flight set and the sweeper wakes it (DESIGN.md principle 1).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from email.message import Message
from typing import Any

import structlog

from mailworker.config import Settings
from mailworker.message import Attachment, BuiltMessage, build_message, from_email_message
from mailworker.runtime import get_runtime
from mailworker.scheduler import Publisher, publish_ids
from mailworker.store import MessageState, RecipientState, Record

__all__ = ["enqueue_prepared", "prepare_many", "send", "send_many", "send_message", "status"]

log = structlog.get_logger("mailworker.api")
When = datetime | timedelta | float | int | None
Prepared = tuple[Record, bytes]


def _epoch(value: When, now: float, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{field}: use a timezone-aware datetime (e.g. datetime.now(UTC))")
        return value.timestamp()
    if isinstance(value, timedelta):
        return now + value.total_seconds()
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"{field}: expected a datetime, timedelta or epoch seconds, got {value!r}")


def _record(built: BuiltMessage, settings: Settings, *, relay: str | None, queue: str | None,
            idempotency_key: str | None, send_at: When, expires_at: When,
            metadata: Mapping[str, Any] | None, now: float) -> Record:
    relay_name = settings.relay(relay).name  # raises ConfigError naming known relays
    q = settings.queue(queue)
    start = _epoch(send_at, now, "send_at")
    expiry = _epoch(expires_at, now, "expires_at")
    if expiry is None:
        expiry = max(now, start or now) + settings.lifetime(q.name)
    if expiry <= now:
        raise ValueError("expires_at is in the past; the message would never be sent")
    if start is not None and expiry <= start:
        raise ValueError("expires_at is not after send_at; the message would never be sent")
    return Record(
        id=uuid.uuid4().hex,
        queue=q.name,
        relay=relay_name,
        sender=built.sender,
        recipients=[RecipientState(a) for a in built.recipients],
        created_at=now,
        expires_at=expiry,
        size=built.size,
        message_id=built.message_id,
        state=MessageState.DEFERRED if start and start > now else MessageState.QUEUED,
        next_attempt_at=start if start and start > now else None,
        send_at=start,
        idempotency_key=idempotency_key,
        metadata=dict(metadata or {}),
    )


def _enqueue(items: list[tuple[Record, bytes]], publish: Publisher | None = None) -> list[str]:
    rt = get_runtime()
    s = rt.settings
    now = time.time()
    ids = rt.store.enqueue_many(items, watchdog=now + s.stuck_after)
    publish = publish or publish_ids
    by_queue: dict[str, list[str]] = {}
    for (rec, _raw), mid in zip(items, ids, strict=True):
        if mid == rec.id and rec.state is MessageState.QUEUED:  # new, and due now
            by_queue.setdefault(rec.queue, []).append(mid)
    for queue, qids in by_queue.items():
        for i in range(0, len(qids), s.batch_size):
            try:
                publish(qids[i:i + s.batch_size], queue)
            except Exception as exc:
                # Accepted is accepted: the record is durable and the sweeper will wake it.
                log.warning("enqueue.publish_failed", error=f"{type(exc).__name__}: {exc}",
                            count=len(qids[i:i + s.batch_size]))
    return ids


def send(
    *,
    to: str | Sequence[str] = (),
    sender: str | None = None,
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    cc: str | Sequence[str] = (),
    bcc: str | Sequence[str] = (),
    reply_to: str | Sequence[str] | None = None,
    attachments: Sequence[Attachment | tuple[Any, ...]] = (),
    headers: Mapping[str, str] | None = None,
    relay: str | None = None,
    queue: str | None = None,
    idempotency_key: str | None = None,
    send_at: When = None,
    expires_at: When = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Accept one message for delivery and return its id.

    Raises :class:`mailworker.message.InvalidMessageError` (bad address, CR/LF in a
    header, over the size limit) or :class:`mailworker.config.ConfigError` (unknown relay
    or queue) before anything is queued. The same *idempotency_key* twice returns the
    first message's id and sends once.
    """
    return send_many([dict(
        to=to, sender=sender, subject=subject, text=text, html=html, cc=cc, bcc=bcc,
        reply_to=reply_to, attachments=attachments, headers=headers, relay=relay, queue=queue,
        idempotency_key=idempotency_key, send_at=send_at, expires_at=expires_at,
        metadata=metadata,
    )])[0]


_ROUTING = ("relay", "queue", "idempotency_key", "send_at", "expires_at", "metadata")


def send_message(
    message: Message,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    relay: str | None = None,
    queue: str | None = None,
    idempotency_key: str | None = None,
    send_at: When = None,
    expires_at: When = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Accept a ready-made :class:`email.message.EmailMessage` (Bcc is stripped)."""
    return send_many([dict(message=message, sender=sender, recipients=recipients, relay=relay,
                           queue=queue, idempotency_key=idempotency_key, send_at=send_at,
                           expires_at=expires_at, metadata=metadata)])[0]


def prepare_many(messages: Iterable[Mapping[str, Any] | Message]) -> list[Prepared]:
    """Validate and build records without queuing them (see :func:`enqueue_prepared`).

    Framework integrations use the pair to raise bad input inside the request but queue
    only after the database transaction commits. Each item is a mapping of :func:`send`
    keyword arguments (or ``message=`` an ``email.message.Message`` with optional
    ``sender``/``recipients`` and routing keys), or a bare ``Message``.
    """
    s = get_runtime().settings
    now = time.time()
    items: list[Prepared] = []
    for i, item in enumerate(messages):
        try:
            args: dict[str, Any] = {"message": item} if isinstance(item, Message) else dict(item)
            routing = {k: args.pop(k, None) for k in _ROUTING}
            if "message" in args:
                built = from_email_message(args["message"], sender=args.get("sender"),
                                           recipients=args.get("recipients"),
                                           max_size=s.max_message_size)
            else:
                if not args.get("sender"):
                    args["sender"] = s.default_sender
                    if not args["sender"]:
                        raise ValueError(
                            "sender is required: pass sender=... or set MAILWORKER_DEFAULT_SENDER")
                built = build_message(max_size=s.max_message_size, **args)
            items.append((_record(built, s, now=now, **routing), built.data))
        except (ValueError, TypeError) as exc:
            exc.add_note(f"(item {i} of the batch; nothing in the batch was queued)")
            raise
    return items


def enqueue_prepared(items: Sequence[Prepared]) -> list[str]:
    """Queue records made by :func:`prepare_many`; returns their ids."""
    return _enqueue(list(items)) if items else []


def send_many(messages: Iterable[Mapping[str, Any] | Message]) -> list[str]:
    """Accept many messages in one Redis round trip and few broker publishes.

    Every item is validated before any is queued: one bad item raises and queues none,
    so a caller never has to work out which part of a batch went out.
    """
    return enqueue_prepared(prepare_many(messages))


def status(message_id: str) -> dict[str, Any] | None:
    """What became of a message: its state and, per recipient, state, last reply, attempts.

    Returns None for an unknown id (or one whose record passed its retention).
    """
    rec = get_runtime().store.get(message_id)
    return rec.summary() if rec else None
