"""The enqueue API: validate, write the record, publish a wake-up. Nothing talks SMTP here.

``send()`` returns once the record is in Redis and a wake-up is on the broker. If the
publish fails after the record is written, the mail is not lost: the record sits in the
in-flight set and the sweeper wakes it (:mod:`mailworker.publish`); send() logs it and
returns the id. If Redis refuses, nothing is written (a batch is one atomic script) and
the caller gets :class:`~mailworker.errors.QueueUnavailable` (an ``OSError``), or
:class:`~mailworker.errors.QueueFull` when Redis is out of memory. If Redis's answer is
lost (a timeout, a reset mid-call), the batch may have been written:
:class:`~mailworker.errors.QueueUncertain` (a ``QueueUnavailable``) says so, and an
``idempotency_key`` makes the retry safe.
"""

from __future__ import annotations

import difflib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from email.message import Message
from typing import Any, TypeVar

import orjson
import redis
import structlog

from mailworker.config import Settings, redact_url
from mailworker.errors import QueueFull, QueueUnavailable, QueueUncertain, shown
from mailworker.message import (
    Attachment,
    BuiltMessage,
    InvalidMessageError,
    build_message,
    from_email_message,
)
from mailworker.publish import Publisher, wake
from mailworker.record import MessageState, RecipientState, Record
from mailworker.routing import MAX_KEY, When, check_metadata, check_name, delay_until, epoch
from mailworker.routing import idempotency_key as check_key
from mailworker.routing_rules import split
from mailworker.runtime import get_runtime

__all__ = ["enqueue_prepared", "prepare_many", "send", "send_many", "send_message", "status"]

log = structlog.get_logger("mailworker.api")
Prepared = tuple[Record, bytes]
T = TypeVar("T")

_ROUTING = ("relay", "queue", "idempotency_key", "send_at", "delay", "expires_at", "metadata")
_BUILD = ("to", "sender", "subject", "text", "html", "cc", "bcc", "reply_to", "attachments",
          "headers", "message_id", "date", "sender_header")
_MESSAGE = ("message", "sender", "recipients")
# Habits from other mail APIs (Flask-Mail, Django, smtplib) and what send() calls them.
_RENAMED = {"recipients": "to", "body": "text", "html_body": "html", "from_email": "sender",
            "from_addr": "sender", "extra_headers": "headers", "reply_to_addresses": "reply_to",
            "html_message": "html"}


def _unknown_key(key: object, allowed: Sequence[str]) -> InvalidMessageError:
    name = key if isinstance(key, str) else shown(key)
    better = _RENAMED.get(name)
    if "message" in allowed and name in ("to", "cc", "bcc"):
        better = "recipients"  # a ready-made message: the envelope, if not its headers
    if better is None:
        close = difflib.get_close_matches(name, allowed, n=1)
        better = close[0] if close else None
    hint = f"; did you mean {better}=?" if better else ""
    return InvalidMessageError(
        name, f"not an argument here{hint} (allowed: {', '.join(allowed)})")


def _when_from(value: datetime | float | None) -> float | None:
    """``date=`` as epoch seconds; a naive datetime is refused like in send_at."""
    if isinstance(value, datetime):
        return epoch(value, time.time(), "date")
    return value


def _record(built: BuiltMessage, settings: Settings, *, relay: str | None, queue: str | None,
            idempotency_key: str | None, send_at: When, delay: timedelta | float | None,
            expires_at: When, metadata: Mapping[str, Any] | None, now: float) -> Record:
    relay_name = settings.target(check_name(relay, "relay"))  # ConfigError if unknown
    q = settings.queue(check_name(queue, "queue"))
    key = check_key(idempotency_key)
    meta = check_metadata(metadata)
    if send_at is not None and delay is not None:
        raise InvalidMessageError("delay", "pass send_at= (a time) or delay= (a wait), not both")
    start = epoch(send_at, now, "send_at") if delay is None else delay_until(delay, now)
    expiry = epoch(expires_at, now, "expires_at")
    if expiry is None:
        expiry = max(now, start or now) + settings.lifetime(q.name)
    if expiry <= now:
        raise InvalidMessageError("expires_at", "is in the past; the message would never be sent")
    if start is not None and expiry <= start:
        raise InvalidMessageError("expires_at",
                                  "is not after send_at; the message would never be sent")
    if len(built.recipients) > settings.max_recipients:
        raise InvalidMessageError(
            "recipients", f"{len(built.recipients):,} recipients, over the limit of "
            f"{settings.max_recipients:,} per message (MAILWORKER_MAX_RECIPIENTS); split them "
            "over several messages with send_many()")
    # Metadata and the key are stored and loaded with the record: they count, or a "1 MiB"
    # limit would let a 50 MB record in.
    extra = (len(orjson.dumps(meta)) if meta else 0) + len((key or "").encode("utf-8"))
    if built.size + extra > settings.max_message_size:
        raise InvalidMessageError(
            "size", f"message {built.size:,} bytes + metadata and idempotency_key "
            f"{extra:,} bytes is over the {settings.max_message_size:,}-byte limit "
            "(MAILWORKER_MAX_MESSAGE_SIZE); keep metadata to small values such as ids")
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
        idempotency_key=key,
        metadata=meta,
    )


#: Errors raised while opening the connection, before any command of the call was written.
_CONNECTING = ("connecting to", "Timeout connecting")


def _certain(exc: redis.RedisError) -> bool:
    """Whether Redis certainly did not run the call that raised *exc*.

    A reply that is an error (read-only replica, NOSCRIPT, loading, auth) means the call
    was refused; so does a failure to connect. A timeout or a connection lost once the
    request was on its way is not known either way: the script may have run.
    """
    if isinstance(exc, (redis.ResponseError, redis.exceptions.BusyLoadingError,
                        redis.exceptions.AuthenticationError,
                        redis.exceptions.AuthorizationError)):
        return True
    return isinstance(exc, redis.ConnectionError) and any(
        marker in str(exc) for marker in _CONNECTING)


def _store_call(settings: Settings, doing: str, call: Callable[[], T], *,
                writes: bool = True) -> T:
    """Run a store call; turn any Redis failure into QueueUnavailable / QueueFull, or
    QueueUncertain when a call that *writes* may have taken effect all the same."""
    try:
        return call()
    except redis.RedisError as exc:
        where = redact_url(settings.redis_url)
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
            raise QueueFull(
                f"Redis at {where} is out of memory and refused to {doing} ({text}); nothing "
                "was queued. Workers free memory as they deliver; or give Redis more "
                "maxmemory, or lower retention") from exc
        if not writes or _certain(exc):
            raise QueueUnavailable(
                f"cannot {doing}: Redis at {where} refused or did not answer ({text}); "
                "nothing was changed. Check that Redis is up (MAILWORKER_REDIS_URL)") from exc
        raise QueueUncertain(
            f"cannot {doing}: Redis at {where} did not answer in time or dropped the "
            f"connection ({text}) after the request was sent, so it may have been done: "
            "mail may have been queued and then will be delivered. Retry only with an "
            "idempotency_key= (a repeat with the same key sends nothing more); check that "
            "Redis is up (MAILWORKER_REDIS_URL)") from exc


# The test hook, set only by mailworker.testing's outbox (record_messages(), the
# mailworker_outbox pytest fixture): while it is set, accepted records are handed to it
# (delivered in-process, no Redis, no broker) and status() reads them back from it.
# Always None in production.
outbox: Any = None


def _enqueue(items: list[tuple[Record, bytes]], publish: Publisher | None = None) -> list[str]:
    if any(len(rec.parts) == 1 for rec, _ in items):  # split by the routing rules
        items, first = _split(items, get_runtime().settings)
        ids = _enqueue_records(items, publish)
        return [ids[i] for i in first]
    return _enqueue_records(items, publish)


def _enqueue_records(items: list[tuple[Record, bytes]], publish: Publisher | None = None
                     ) -> list[str]:
    if outbox is not None:
        return list(outbox.accept(items))
    rt = get_runtime()
    s = rt.settings
    now = time.time()
    ids = _store_call(s, "queue the mail",
                      lambda: rt.store.enqueue_many(items, watchdog=now + s.stuck_after))
    # Accepted is accepted: the records are durable and in the in-flight set, so a wake-up
    # that fails to publish is logged and the sweeper wakes them (mailworker.publish).
    wake(publish or rt.publisher,
         [(mid, rec.queue, rec.relay) for (rec, _raw), mid in zip(items, ids, strict=True)
          if mid == rec.id and rec.state is MessageState.QUEUED],  # new, and due now
         s.batch_size)
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
    delay: timedelta | float | None = None,
    expires_at: When = None,
    metadata: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    date: datetime | float | None = None,
    sender_header: str | None = None,
) -> str:
    """Accept one message for delivery and return its id.

    ``send_at`` is when to send (an aware datetime or epoch seconds); ``delay`` is how
    long to wait (seconds or a timedelta): ``delay=60`` sends in a minute. ``sender`` is
    the From author and envelope sender; ``sender_header`` an optional Sender field.

    Raises :class:`~mailworker.message.InvalidMessageError` (bad address, CR/LF in a
    header, over the size limit, a wrong type: the field is named) or
    :class:`~mailworker.config.ConfigError` (unknown relay or queue) before anything is
    queued, and :class:`~mailworker.errors.QueueUnavailable` (an ``OSError``) when Redis
    cannot take it (:class:`~mailworker.errors.QueueUncertain` when its answer was lost and
    the mail may have been queued). The same *idempotency_key* twice returns the first
    message's id and sends once: pass one to make retrying after an error safe.
    """
    return send_many([dict(
        to=to, sender=sender, subject=subject, text=text, html=html, cc=cc, bcc=bcc,
        reply_to=reply_to, attachments=attachments, headers=headers, relay=relay, queue=queue,
        idempotency_key=idempotency_key, send_at=send_at, delay=delay, expires_at=expires_at,
        metadata=metadata, message_id=message_id, date=date, sender_header=sender_header,
    )])[0]


def send_message(
    message: Message,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    relay: str | None = None,
    queue: str | None = None,
    idempotency_key: str | None = None,
    send_at: When = None,
    delay: timedelta | float | None = None,
    expires_at: When = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Accept a ready-made :class:`email.message.EmailMessage` (Bcc is stripped)."""
    return send_many([dict(message=message, sender=sender, recipients=recipients, relay=relay,
                           queue=queue, idempotency_key=idempotency_key, send_at=send_at,
                           delay=delay, expires_at=expires_at, metadata=metadata)])[0]


def _prepare(item: object, s: Settings, now: float) -> Prepared:
    if isinstance(item, Message):
        args: dict[str, Any] = {"message": item}
    elif isinstance(item, Mapping):
        args = dict(item)
    else:
        raise InvalidMessageError(
            "message", "each item is a dict of send() arguments or an email.message.Message, "
            f"got {type(item).__name__}")
    allowed = (*(_MESSAGE if "message" in args else _BUILD), *_ROUTING)
    for key in args:
        if key not in allowed:
            raise _unknown_key(key, allowed)
    routing = {k: args.pop(k, None) for k in _ROUTING}
    if "message" in args:
        built = from_email_message(args["message"], sender=args.get("sender"),
                                   recipients=args.get("recipients"),
                                   max_size=s.max_message_size)
    else:
        if not args.get("sender"):
            args["sender"] = s.default_sender
            if not args["sender"]:
                raise InvalidMessageError(
                    "sender", "required: pass sender='Shop <shop@example.com>', or configure a "
                    "default sender (MAILWORKER_DEFAULT_SENDER in the environment, "
                    "default_sender in the config file, MAILWORKER['DEFAULT_SENDER'] in "
                    "Django settings, MAILWORKER_DEFAULT_SENDER in Flask's app.config)")
        args["date"] = _when_from(args.get("date"))
        built = build_message(max_size=s.max_message_size, **args)
    return _routed(built, s, now, routing)


def _part_key(key: str | None, relay: str) -> str | None:
    """The idempotency key of a split message's later part: derived from the caller's,
    so a retry with the same key finds every part (the split is the same each time)."""
    if key is None:
        return None
    derived = f"{key}#{relay}"
    if len(derived.encode("utf-8")) > MAX_KEY:
        derived = "route:" + hashlib.sha256(derived.encode("utf-8")).hexdigest()
    return derived


def _routed(built: BuiltMessage, s: Settings, now: float, routing: dict[str, Any]
            ) -> Prepared:
    """The message's record, its relay chosen by the routing rules unless relay= names
    one (mailworker.routing_rules). A message whose recipients the rules send to several
    relays is marked (``parts == [its id]``) and split at enqueue (:func:`_split`): a
    prepared item stays one per message, as framework integrations count them."""
    if routing["relay"] is not None or not s.routes:
        return _record(built, s, now=now, **routing), built.data
    groups = split(s.routes, s.default_relay, sender=built.sender,
                   recipients=built.recipients,
                   queue=s.queue(check_name(routing["queue"], "queue")).name,
                   metadata=check_metadata(routing["metadata"]))
    rec = _record(built, s, now=now, **{**routing, "relay": next(iter(groups))})
    if len(groups) > 1:
        rec.parts = [rec.id]
    return rec, built.data


def _split(items: list[Prepared], s: Settings) -> tuple[list[Prepared], list[int]]:
    """Records marked by :func:`_routed` as one record per relay; with, per item, the
    index of its first part (whose id send() returns).

    The parts share the bytes (every header as written) and each lists the ids of all
    parts (``Record.parts``), so ``status()`` of any shows every recipient's relay.
    """
    out: list[Prepared] = []
    first: list[int] = []
    for rec, raw in items:
        first.append(len(out))
        if len(rec.parts) != 1:
            out.append((rec, raw))
            continue
        groups = split(s.routes, s.default_relay, sender=rec.sender,
                       recipients=[r.address for r in rec.recipients], queue=rec.queue,
                       metadata=rec.metadata)
        parts = []
        for n, (relay, rcpts) in enumerate(groups.items()):
            part = rec if n == 0 else Record.from_json(rec.to_json())
            if n:
                part.id = uuid.uuid4().hex
                part.idempotency_key = _part_key(rec.idempotency_key, relay)
            part.relay = relay
            part.recipients = [RecipientState(a) for a in rcpts]
            parts.append(part)
        for part in parts:
            part.parts = [p.id for p in parts]
            out.append((part, raw))
    return out, first


def prepare_many(messages: Iterable[Mapping[str, Any] | Message]) -> list[Prepared]:
    """Validate and build records without queuing them (see :func:`enqueue_prepared`).

    Framework integrations use the pair to raise bad input inside the request but queue
    only after the database transaction commits. Each item is a mapping of :func:`send`
    keyword arguments (or ``message=`` an ``email.message.Message`` with optional
    ``sender``/``recipients`` and routing keys), or a bare ``Message``.
    """
    s = get_runtime().settings
    now = time.time()
    if isinstance(messages, str | bytes | Mapping | Message) or not isinstance(messages,
                                                                                Iterable):
        raise InvalidMessageError(
            "messages", f"expected a list of dicts or messages, got {type(messages).__name__}")
    items: list[Prepared] = []
    for i, item in enumerate(messages):
        try:
            items.append(_prepare(item, s, now))
        except ValueError as exc:  # InvalidMessageError, ConfigError
            exc.add_note(f"(item {i} of the batch; nothing in the batch was queued)")
            raise
    return items


def enqueue_prepared(items: Sequence[Prepared]) -> list[str]:
    """Queue records made by :func:`prepare_many`; returns their ids.

    All or none: raises :class:`~mailworker.errors.QueueUnavailable` (or ``QueueFull``)
    with nothing queued when Redis refuses, :class:`~mailworker.errors.QueueUncertain`
    when its answer was lost (then all or none may have been queued).
    """
    return _enqueue(list(items)) if items else []


def send_many(messages: Iterable[Mapping[str, Any] | Message]) -> list[str]:
    """Accept many messages in one Redis round trip and few broker publishes.

    Every item is validated before any is queued: one bad item raises and queues none,
    so a caller never has to work out which part of a batch went out. Redis writes the
    batch in one atomic script: a Redis refusal, :class:`~mailworker.errors.QueueFull`
    included, also leaves nothing queued; after a lost answer
    (:class:`~mailworker.errors.QueueUncertain`) the whole batch may have been queued.
    """
    return enqueue_prepared(prepare_many(messages))


def status(message_id: str) -> dict[str, Any] | None:
    """What became of a message: its state, attempts made, the reason it is waiting or
    dead, and per recipient: state, last reply, attempts.

    Returns None for an unknown id (or one whose record passed its retention); raises
    :class:`~mailworker.errors.QueueUnavailable` when Redis cannot be read.
    """
    if not isinstance(message_id, str) or not message_id:
        raise InvalidMessageError("message_id", f"expected the id send() returned, got "
                                  f"{shown(message_id)}")
    if outbox is not None:
        return outbox.status(message_id)  # type: ignore[no-any-return]
    rt = get_runtime()
    rec = _store_call(rt.settings, "read the message status", lambda: rt.store.get(message_id),
                      writes=False)
    if rec is None:
        return None
    out = rec.summary()
    if len(rec.parts) > 1:
        # Split by the routing rules: every part, each recipient with its relay and state.
        found = _store_call(rt.settings, "read the message status",
                            lambda: rt.store.get_many(rec.parts), writes=False)
        out["parts"] = [part_summary(p) for p in found if p is not None]
    return out


def part_summary(rec: Record) -> dict[str, Any]:
    """One part of a split message, for ``status()`` of any of its parts."""
    return {"id": rec.id, "relay": rec.relay, "state": rec.state.value,
            "recipients": [{"address": r.address, "state": r.state.value, "relay": rec.relay}
                           for r in rec.recipients]}
