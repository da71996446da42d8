"""Backoff delays and duration parsing: the pure arithmetic behind "retry later".

Kept apart from :mod:`mailworker.policy` so that config, the store and the pool can use
:func:`parse_duration` and :class:`Backoff` without importing the retry table.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Backoff", "parse_duration"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = r"(\d+(?:\.\d+)?)\s*([smhd])"
_DURATION_RE = re.compile(rf"^\s*(?:{_PART}\s*)+$")
_DURATION_HELP = ("use seconds (e.g. 90) or a number with a unit s, m, h or d "
                  "(e.g. '90s', '15m', '24h', '7d', '1h30m')")

# One process-wide generator for callers that do not inject their own; tests always do.
_RANDOM = random.Random()


def parse_duration(value: str | int | float) -> float:
    """Seconds from a config duration: a number, or ``"90s"``, ``"15m"``, ``"24h"``, ``"7d"``.

    Units may be combined (``"1h30m"``); a bare number in a string (``"90"``) is seconds.
    Raises ``ValueError`` for negative, non-finite or unreadable values, and for booleans,
    which TOML would otherwise let through as 1 and 0.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION_RE.match(text):
                raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(_PART, text))
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration; {_DURATION_HELP}")
    return seconds


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with proportional jitter, pure given an injected ``rng``.

    The delay after the *n*-th failed attempt is ``initial * factor**(n-1)``, capped at
    ``maximum``, then spread uniformly over +-``jitter`` of itself so that messages that
    failed together (a relay outage) do not all come back together. ``maximum`` stays a
    hard cap: at the cap the jitter only shortens. For a fixed random draw the delay never
    decreases as attempts grow, which keeps retries from bunching up.
    """

    initial: float = 60.0
    factor: float = 2.0
    maximum: float = 3600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name, ok, want in (
            ("initial", self.initial > 0, "a positive number of seconds"),
            ("factor", self.factor >= 1, "a number >= 1"),
            ("maximum", self.maximum >= self.initial, f"at least initial ({self.initial:g})"),
            ("jitter", 0 <= self.jitter <= 1, "a fraction from 0 to 1 (0.2 means +-20%)"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not math.isfinite(value) or not ok:
                raise ValueError(f"backoff {name}={value!r} is not {want}")

    @classmethod
    def from_config(cls, table: Mapping[str, Any], where: str = "backoff") -> Backoff:
        """Build from ``{initial = "1m", factor = 2, maximum = "1h", jitter = 0.2}``.

        ``initial`` and ``maximum`` take durations (see :func:`parse_duration`); errors
        name *where* and the bad key.
        """
        if not isinstance(table, Mapping):
            raise ValueError(f"{where} must be a table like {{ initial = \"1m\", factor = 2 }}")
        kwargs: dict[str, float] = {}
        for key, value in table.items():
            if key in ("initial", "maximum"):
                try:
                    kwargs[key] = parse_duration(value)
                except ValueError as exc:
                    raise ValueError(f"{where}.{key}: {exc}") from None
            elif key in ("factor", "jitter"):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{where}.{key}={value!r} is not a number")
                kwargs[key] = float(value)
            else:
                raise ValueError(
                    f"{where}: unknown key {key!r}; allowed: initial, factor, maximum, jitter")
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc.args[0].removeprefix('backoff ')}") from None

    def base(self, attempt: int) -> float:
        """The delay before jitter after failed attempt *attempt* (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt must be 1 or more, got {attempt}")
        try:
            value = self.initial * self.factor ** (attempt - 1)
        except OverflowError:
            return self.maximum
        return min(self.maximum, value)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt *attempt* (1-based), jittered with *rng*."""
        base = self.base(attempt)
        low = base * (1 - self.jitter)
        high = min(self.maximum, base * (1 + self.jitter))
        u = (rng or _RANDOM).random()
        # Weighted sum rather than low + (high - low) * u: each term grows with base, so
        # rounding cannot make a later attempt's delay smaller for the same draw.
        return min(high, max(low, (1 - u) * low + u * high))
