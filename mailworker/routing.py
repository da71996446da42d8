"""Checks of the routing arguments of ``send()``: times, delay, relay, queue, key, metadata.

The message itself is checked by :mod:`mailworker.message`; these are the values that go
into the record beside it. Every one is checked at enqueue, because a bad one stored in
Redis would fail later in a worker, where nobody can fix it: a NaN expiry used to be
written as ``null`` and crash every delivery pass that held it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from mailworker.config import MAX_DURATION
from mailworker.errors import shown
from mailworker.message import InvalidMessageError

__all__ = ["MAX_KEY", "When", "check_metadata", "check_name", "delay_until", "epoch",
           "idempotency_key"]

When = datetime | timedelta | float | int | None
#: Epoch seconds below this (September 2001) are not a date anyone schedules mail for:
#: ``send_at=60`` means "in a minute", which is ``delay=60``.
_EPOCH_FLOOR = 1e9
MAX_KEY = 256  # idempotency keys: UTF-8 octets
_MAX_DEPTH = 32
_INT64 = 2**63


def _number(value: object, field: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessageError(field, f"expected {what}, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidMessageError(field, f"{shown(value)} is not a finite number")
    return number


def epoch(value: When, now: float, field: str) -> float | None:
    """Epoch seconds of a ``send_at``/``expires_at`` value: an aware datetime, epoch
    seconds, or a timedelta from now. None stays None."""
    if value is None:
        return None
    what = "an aware datetime, epoch seconds or a timedelta"
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidMessageError(
                field, "a naive datetime is ambiguous; use an aware one, e.g. "
                "datetime.now(timezone.utc) + timedelta(hours=1)")
        try:
            when = value.timestamp()
        except (OverflowError, ValueError):
            raise InvalidMessageError(field, f"{shown(value)} is out of range") from None
    elif isinstance(value, timedelta):
        when = now + value.total_seconds()
    else:
        when = _number(value, field, what)
        if when < _EPOCH_FLOOR:
            hint = ("for 'send in N seconds' pass delay=N (or delay=timedelta(...))"
                    if field == "send_at" else "for 'expire in N seconds' pass "
                    f"{field}=timedelta(seconds=N)")
            raise InvalidMessageError(
                field, f"{shown(value)} is read as epoch seconds, i.e. a date in "
                f"{1970 + int(when // 31_557_600)}; {hint}")
    if when > now + MAX_DURATION:
        raise InvalidMessageError(
            field, f"{shown(value)} is more than 10 years ahead (milliseconds instead of "
            "seconds?); pass an aware datetime or epoch seconds")
    return when


def delay_until(delay: timedelta | float | None, now: float) -> float | None:
    """Epoch seconds of ``delay=`` (seconds or a timedelta from now)."""
    if delay is None:
        return None
    if isinstance(delay, timedelta):
        seconds = delay.total_seconds()
    else:
        seconds = _number(delay, "delay", "seconds or a timedelta")
    if not 0 <= seconds <= MAX_DURATION:
        raise InvalidMessageError(
            "delay", f"{shown(delay)} is not from 0 seconds to 10 years")
    return now + seconds


def check_name(value: object, field: str) -> str | None:
    """A relay or queue name: None (the default) or a non-empty string."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 200:
        raise InvalidMessageError(
            field, f"expected the name of a configured {field} or None for the default, "
            f"got {shown(value)}")
    return value


def idempotency_key(value: object) -> str | None:
    """A caller's idempotency key: a non-empty string of at most 256 UTF-8 octets."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidMessageError(
            "idempotency_key", f"expected a non-empty string such as 'signup-42', got "
            f"{shown(value)}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidMessageError("idempotency_key", "is not valid Unicode") from None
    if size > MAX_KEY:
        raise InvalidMessageError(
            "idempotency_key", f"is {size:,} octets, over {MAX_KEY}; hash a long key first")
    return value


def check_metadata(value: object) -> dict[str, Any]:
    """A copy of ``metadata=`` as a dict, after checking it is plain, finite JSON."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidMessageError(
            "metadata", f"expected a dict such as {{'order_id': 42}}, got {type(value).__name__}")
    _json(value, "metadata", 0)
    return dict(value)


def _json(value: object, path: str, depth: int) -> None:
    """Raise unless *value* is JSON that reads back as it was written.

    orjson writes NaN and infinities as ``null`` and refuses big ints, sets and objects
    with a TypeError that names no field; this names the field.
    """
    if depth > _MAX_DEPTH:
        raise InvalidMessageError(path, f"nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessageError(path, "is not valid Unicode (a lone surrogate?)") from None
    elif isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise InvalidMessageError(path, "integer out of the 64-bit range; store it as text")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMessageError(path, f"{value} is not a finite number; JSON has no "
                                      "NaN or infinity")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidMessageError(path, f"key {shown(key)} is not a string")
            _json(item, f"{path}[{key if len(key) <= 40 else shown(key, 40)}]", depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _json(item, f"{path}[{i}]", depth + 1)
    else:
        raise InvalidMessageError(
            path, f"{type(value).__name__} is not JSON; use str, int, float, bool, None, "
            "lists and dicts (e.g. str(decimal), list(a_set))")
