"""Relay state shared by the whole fleet: pauses, consecutive failures, and the fleet-wide
connection slots and rate budget.

Delivery decides (through the policy) when a relay is paused or has failed; this module
only keeps those facts in Redis, where every worker sees them, and reads them back for
``mailworker stats``. The keys are ``pause:<relay>``, ``relayfail:<relay>``,
``slots:<relay>``, ``window:<relay>`` and ``bucket:<relay>`` (see
:mod:`mailworker.store.keys`). The window and rate scripts (window.lua, feedback.lua,
ratelimit.lua) are the fleet's concurrency window and adaptive rate; mailworker.fleet
says when to call them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from mailworker.store.keys import Keys
from mailworker.store.scripts import Call, Rider, Scripts, to_str

__all__ = ["RELAY_FAILURES_QUIET", "Admission", "Feedback", "RelayState"]

#: Consecutive failures are forgotten after this long without one (seconds).
RELAY_FAILURES_QUIET = 3600


@dataclass(frozen=True)
class Feedback:
    """What :meth:`RelayState.feedback` did: window sizes before and after, the streak of
    failed connection attempts, whether that streak is a whole failed cohort, and the
    learned rate before and after (None: no rate learned)."""

    old_size: float
    size: float
    streak: int
    cohort_failed: bool
    old_rate: float | None
    rate: float | None


@dataclass(frozen=True)
class Admission:
    """What :meth:`RelayState.admit` found: the relay's pause (reason, seconds left) or
    None; else the messages granted by its rate, the wait when none were, the rate in
    force (None: none)."""

    paused: tuple[str, float] | None
    granted: int = 0
    wait: float = 0.0
    rate: float | None = None


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

    # -- the fleet-wide window and rate (window.lua, feedback.lua, ratelimit.lua) --
    def take_slot(self, relay: str, token: str, *, ceiling: int, initial: float,
                  hold_seconds: float, probe_interval: float = 30.0
                  ) -> tuple[bool, int, float]:
        """Take one of the relay's window slots for a new connection, if one is free.

        Returns (taken, slots in use, window size). The slot lives *hold_seconds* unless
        renewed (:meth:`renew_slots`), so a killed worker's slots come back on their own.
        A dead relay grants one slot (the probe) per *probe_interval*.
        """
        taken, used, size = self._scripts.call(
            "window", [self.keys.slots(relay), self.keys.window(relay)],
            [token, time.time(), hold_seconds, ceiling, initial, probe_interval])
        return bool(int(taken)), int(used), float(to_str(size))

    def release(self, relay: str, token: str) -> None:
        self.redis.zrem(self.keys.slots(relay), token)

    def renew_slot(self, relay: str, token: str, hold_seconds: float) -> None:
        """Keep a slot we still hold for *hold_seconds* more; a slot already expired and
        reclaimed is not taken back."""
        self.renew_slots([(relay, token)], hold_seconds)

    def renew_slots(self, held: list[tuple[str, str]], hold_seconds: float) -> None:
        """:meth:`renew_slot` for many (relay, token) pairs in one round trip."""
        if not held:
            return
        until = time.time() + hold_seconds
        pipe = self.redis.pipeline(transaction=False)
        for relay, token in held:
            pipe.zadd(self.keys.slots(relay), {token: until}, xx=True)
        pipe.execute()

    def feedback(self, relay: str, kind: str, *, accepted: int = 0, ceiling: int,
                 initial: float, regrow_after: float, rate_ceiling: float | None,
                 rate_floor: float, probe_interval: float = 30.0) -> Feedback:
        """Fold what a chunk told us into the relay's window and rate (see feedback.lua):
        *kind* is "ok" (*accepted* transactions went through), "fail" (a connection
        attempt failed at host level) or "slow" (a "slow down" reply)."""
        call = self.feedback_call(relay, kind, accepted=accepted, ceiling=ceiling,
                                  initial=initial, regrow_after=regrow_after,
                                  rate_ceiling=rate_ceiling, rate_floor=rate_floor,
                                  probe_interval=probe_interval)
        return feedback_of(self._scripts.run([call])[0])

    def feedback_call(self, relay: str, kind: str, *, accepted: int = 0, ceiling: int,
                      initial: float, regrow_after: float, rate_ceiling: float | None,
                      rate_floor: float, probe_interval: float = 30.0) -> Call:
        """:meth:`feedback` as a script call, to ride in another round trip (a commit's);
        read its result with :func:`feedback_of`."""
        return (self._scripts["feedback"],
                [self.keys.slots(relay), self.keys.window(relay),
                 self.keys.relay_failures(relay)],
                [kind, time.time(), accepted, ceiling, initial, regrow_after,
                 rate_ceiling or 0, rate_floor, probe_interval])

    def admit(self, relay: str, wanted: int, ceiling: float | None,
              riders: Sequence[Rider] = ()) -> Admission:
        """The relay's pause, or up to *wanted* messages of its rate budget (see
        :meth:`take_rate`), in one round trip with *riders* (the first window's "sending"
        marks): a delivery pass's one round trip between its claim and its first MAIL
        FROM."""
        call: Call = (self._scripts["ratelimit"],
                      [self.keys.bucket(relay), self.keys.window(relay),
                       self.keys.pause(relay)], [time.time(), ceiling or 0, wanted])
        granted, wait, rate = self._scripts.run_with([call], riders)[0]
        if int(granted) < 0:
            return Admission((to_str(rate), float(to_str(wait))))
        return Admission(None, int(granted), float(to_str(wait)),
                         float(to_str(rate)) or None)

    def take_rate(self, relay: str, wanted: int, ceiling: float | None
                  ) -> tuple[int, float, float | None]:
        """Up to *wanted* messages of the relay's rate budget (the learned rate, capped by
        *ceiling*): (granted, seconds to wait when none were, rate in force or None)."""
        granted, wait, rate = self._scripts.call(
            "ratelimit", [self.keys.bucket(relay), self.keys.window(relay)],
            [time.time(), ceiling or 0, wanted])
        return int(granted), float(to_str(wait)), float(to_str(rate)) or None

    # -- health, for relay groups --
    def health(self, relays: list[str]) -> dict[str, str | None]:
        """Why each relay should be skipped by a relay group now, or None (healthy).

        "paused" while its pause key lives; "dead" while a whole cohort of its connection
        attempts failed and its next probe is not due yet (once it is due the relay is
        healthy again, so the group's next batch carries the probe). One round trip for
        all of them.
        """
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for name in relays:
            pipe.pttl(self.keys.pause(name))
            pipe.hmget(self.keys.window(name), "dead", "probe_at")
        replies = pipe.execute()
        out: dict[str, str | None] = {}
        for i, name in enumerate(relays):
            ttl, (dead, probe_at) = replies[2 * i:2 * i + 2]
            if ttl is not None and int(ttl) > 0:
                out[name] = "paused"
            elif dead is not None and to_str(dead) == "1" and \
                    now < float(to_str(probe_at or b"0")):
                out[name] = "dead"
            else:
                out[name] = None
        return out

    # -- reading, for the CLI --
    def states(self) -> dict[str, dict[str, Any]]:
        """Every relay Redis knows of, with its counters, window, rate and any pause.

        ``{relay: {"counters": {...}, "paused": {"reason": str, "seconds_left": float} |
        None, "window": float | None, "slots_in_use": int, "rate": float | None}}``
        (``window`` None: never used since the last hour; ``rate`` None: none learned),
        found by SCAN over the ``stats``, ``pause`` and ``window`` key families, so an
        operator sees relays that only the workers (not the calling shell) have
        configured. Read in one pipeline after the scans; for the CLI, not the delivery path.
        """
        names: dict[str, set[str]] = {"stats": set(), "pause": set(), "window": set()}
        for family, found in names.items():
            head = self.keys.head(family)
            for key in self.redis.scan_iter(match=self.keys.scan_pattern(family), count=1000):
                found.add(to_str(key)[len(head):])
        relays = sorted(set().union(*names.values()))
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for name in relays:
            pipe.hgetall(self.keys.stats(name))
            pipe.get(self.keys.pause(name))
            pipe.pttl(self.keys.pause(name))
            pipe.hmget(self.keys.window(name), "size", "rate")
            pipe.zcount(self.keys.slots(name), now, "+inf")
        replies = pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(relays):
            counters, reason, ttl, (size, rate), in_use = replies[5 * i:5 * i + 5]
            paused = None
            if reason is not None and ttl is not None and int(ttl) > 0:
                paused = {"reason": to_str(reason), "seconds_left": int(ttl) / 1000.0}
            out[name] = {"counters": {to_str(k): int(v) for k, v in (counters or {}).items()},
                         "paused": paused,
                         "window": None if size is None else float(to_str(size)),
                         "slots_in_use": int(in_use),
                         "rate": None if rate is None else float(to_str(rate))}
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Counters per relay (``stats:<relay>``)."""
        return {name: state["counters"] for name, state in self.states().items()
                if state["counters"]}


def feedback_of(result: list[Any]) -> Feedback:
    """The :class:`Feedback` in feedback.lua's reply."""
    old, new, streak, failed, old_rate, new_rate = result
    return Feedback(float(to_str(old)), float(to_str(new)), int(streak), bool(int(failed)),
                    float(to_str(old_rate)) or None, float(to_str(new_rate)) or None)
