"""Relay state shared by the whole fleet: pauses, consecutive failures, and the fleet-wide
connection slots and rate budget.

Delivery decides (through the policy) when a relay is paused or has failed; this module
only keeps those facts in Redis, where every worker sees them, and reads them back for
``mailworker stats``. The keys are ``pause:<relay>``, ``relayfail:<relay>``,
``slots:<relay>`` and ``bucket:<relay>`` (see :mod:`mailworker.store.keys`).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from mailworker.store.keys import Keys
from mailworker.store.scripts import Scripts, to_str

__all__ = ["RELAY_FAILURES_QUIET", "RelayState"]

#: Consecutive failures are forgotten after this long without one (seconds).
RELAY_FAILURES_QUIET = 3600


class RelayState:
    """Pauses, failure counts and fleet limits of relays, for one key prefix."""

    def __init__(self, client: redis.Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = client
        self.keys = keys
        self._scripts = scripts

    # -- pauses --
    def pause(self, relay: str, seconds: float, reason: str) -> None:
        """Hold all mail for *relay* for *seconds* (fleet-wide: every worker sees it)."""
        self.redis.set(self.keys.pause(relay), reason, px=max(1, int(seconds * 1000)))

    def paused(self, relay: str) -> tuple[str, float] | None:
        """(reason, seconds left) while the relay is paused, else None."""
        pipe = self.redis.pipeline(transaction=False)
        key = self.keys.pause(relay)
        pipe.get(key)
        pipe.pttl(key)
        reason, ttl = pipe.execute()
        if reason is None or ttl is None or ttl < 0:
            return None
        return to_str(reason), ttl / 1000.0

    def resume(self, relay: str) -> None:
        self.redis.delete(self.keys.pause(relay))

    # -- consecutive failures --
    def failed(self, relay: str) -> int:
        """Count a host-level failure; returns the consecutive failures so far (forgotten
        after :data:`RELAY_FAILURES_QUIET` seconds without one)."""
        key = self.keys.relay_failures(relay)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, RELAY_FAILURES_QUIET)
        return int(pipe.execute()[0])

    def failures(self, relay: str) -> int:
        """The consecutive host-level failures counted so far (0: none lately)."""
        return int(self.redis.get(self.keys.relay_failures(relay)) or 0)

    def succeeded(self, relay: str) -> None:
        self.redis.delete(self.keys.relay_failures(relay))

    # -- fleet-wide limits --
    def acquire(self, relay: str, token: str, *, max_connections: int | None,
                rate: float | None, wanted: int, hold_seconds: float) -> tuple[int, float]:
        """Ask for a connection slot and up to *wanted* messages of rate budget.

        Returns (messages granted, seconds to wait when none were). The slot is held
        until :meth:`release` or *hold_seconds* (a dead worker's slot expires).
        """
        burst = max(1.0, rate or 0.0)
        granted, wait = self._scripts.call(
            "fleet", [self.keys.slots(relay), self.keys.bucket(relay)],
            [token, time.time(), hold_seconds, max_connections or 0, rate or 0, burst, wanted])
        return int(granted), float(to_str(wait))

    def release(self, relay: str, token: str) -> None:
        self.redis.zrem(self.keys.slots(relay), token)

    def renew_slot(self, relay: str, token: str, hold_seconds: float) -> None:
        """Keep a slot we still hold for *hold_seconds* more (the heartbeat, while the batch
        that took it runs); a slot already expired and reclaimed is not taken back."""
        self.redis.zadd(self.keys.slots(relay), {token: time.time() + hold_seconds}, xx=True)

    # -- reading, for the CLI --
    def states(self) -> dict[str, dict[str, Any]]:
        """Every relay Redis knows of, with its counters and any pause.

        ``{relay: {"counters": {...}, "paused": {"reason": str, "seconds_left": float} | None}}``,
        found by SCAN over the ``stats`` and ``pause`` key families, so an operator sees
        relays that only the workers (not the calling shell) have configured. Read in one
        pipeline after the scans; for the CLI, not the delivery path.
        """
        names: dict[str, set[str]] = {"stats": set(), "pause": set()}
        for family, found in names.items():
            head = self.keys.head(family)
            for key in self.redis.scan_iter(match=self.keys.scan_pattern(family), count=1000):
                found.add(to_str(key)[len(head):])
        relays = sorted(names["stats"] | names["pause"])
        pipe = self.redis.pipeline(transaction=False)
        for name in relays:
            pipe.hgetall(self.keys.stats(name))
            pipe.get(self.keys.pause(name))
            pipe.pttl(self.keys.pause(name))
        replies = pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(relays):
            counters, reason, ttl = replies[3 * i:3 * i + 3]
            paused = None
            if reason is not None and ttl is not None and int(ttl) > 0:
                paused = {"reason": to_str(reason), "seconds_left": int(ttl) / 1000.0}
            out[name] = {"counters": {to_str(k): int(v) for k, v in (counters or {}).items()},
                         "paused": paused}
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Counters per relay (``stats:<relay>``)."""
        return {name: state["counters"] for name, state in self.states().items()
                if state["counters"]}
