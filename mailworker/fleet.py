"""The fleet-wide concurrency window and adaptive rate of each relay, kept in Redis.

Postfix's queue manager adapts a per-destination concurrency window: it starts small,
grows with every window's worth of successful deliveries ("positive feedback"), shrinks
when connections fail ("negative feedback"), and declares a site dead only when a whole
cohort of connection attempts failed. mailworker does the same for the whole fleet, in
Redis, so that a relay that accepts two connections from a client gets two, however
many worker processes there are, with nothing configured but its DSN:

* every worker opens a connection to a relay only while it holds one of the relay's
  window slots (:class:`FleetSlots`, the pool's :class:`~mailworker.smtp.pool.Slots`);
  a slot lives ``lease_seconds`` and is renewed by the heartbeat for as long as its
  pooled connection stays open, so a slot keeps its connection across batches, and a
  killed worker's slots come back on their own;
* the window starts at :data:`INITIAL_WINDOW`, grows by one per window's worth of
  accepted transactions while every slot is in use, and shrinks to the slots still held
  on a "too many connections" signal (a failed connection attempt: 421 at greeting,
  refused, reset), after which it does not grow for :data:`REGROW_AFTER` seconds; its
  ceiling is ``fleet_max_connections``, else ``max_connections`` x
  :data:`ASSUMED_WORKERS`;
* "slow down" replies (policy action ``slow_down``) cut the relay's fleet rate to 0.7 x
  what it was; the rate creeps back up by 5% of the cut-from rate per second while
  replies are good; ``fleet_rate`` is its ceiling.

Store scripts: ``store/window.lua`` (take a slot), ``store/feedback.lua`` (fold a chunk's
outcome into the window and rate), ``store/ratelimit.lua`` (the token bucket at the rate
in force). Every change of the window's whole size or of the rate is one structured log
event (``relay.window``, ``relay.rate``).
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Sequence

import structlog

from mailworker.leases import HeldLeases, heartbeat
from mailworker.relay import Relay
from mailworker.smtp import PoolManager
from mailworker.store import Store
from mailworker.store.relays import Admission, Feedback, feedback_of
from mailworker.store.scripts import Rider

__all__ = ["ASSUMED_WORKERS", "INITIAL_WINDOW", "RATE_FLOOR", "REGROW_AFTER", "SLOT_WAIT",
           "FleetSlots", "Window", "ceiling_of", "install"]

log = structlog.get_logger("mailworker.fleet")

#: Connections a relay gets fleet-wide before anything is learned (Postfix:
#: ``initial_destination_concurrency``, 5; many providers allow only 2 per client).
INITIAL_WINDOW = 2.0
#: Worker processes assumed when no ``fleet_max_connections`` caps the window: the ceiling
#: is ``max_connections`` x this (Postfix: ``default_destination_concurrency_limit``, 20).
ASSUMED_WORKERS = 4
#: Seconds without growth after a "too many connections" signal, so a relay at its limit
#: sees one refused connection per this long, not one per window's worth of messages.
REGROW_AFTER = 60.0
#: The least rate (messages per second) "slow down" replies can cut a relay to.
RATE_FLOOR = 1.0
#: Seconds a new connection waits for a slot of a full window before the batch is held
#: (at most a twentieth of the slot's lifetime). The window grows within milliseconds of
#: its holders' first accepted transactions: at a fleet's start, a batch that found the
#: initial window full got a slot a moment later, but was held ~0.5 s and claimed and
#: committed a second time. Bounded, so a relay really at its limit costs a batch no more.
SLOT_WAIT = 0.25


def _notch(rate: float) -> int:
    """Which notch a rate is at: steps of a tenth of its order of magnitude (..., 9, 10,
    20, ..., 90, 100, 200...), so the creep back up logs a line per notch, not per chunk."""
    unit = 10 ** math.floor(math.log10(max(rate, 1.0)))
    return int(rate // unit * unit)


def ceiling_of(relay: Relay) -> int:
    """The most connections the window may grow to for *relay*."""
    return relay.fleet_max_connections or relay.max_connections * ASSUMED_WORKERS


class Window:
    """The delivery layer's side of one store: feedback and rate for relays, with logs."""

    def __init__(self, store: Store, probe_interval: float = 30.0) -> None:
        self.store, self.probe_interval = store, probe_interval

    def feedback(self, relay: Relay, kind: str, accepted: int = 0) -> Feedback:
        """Fold one chunk's outcome into the relay's window and rate; log what changed."""
        fb = self.store.relays.feedback(
            relay.name, kind, accepted=accepted, ceiling=ceiling_of(relay),
            initial=INITIAL_WINDOW, regrow_after=REGROW_AFTER, rate_ceiling=relay.fleet_rate,
            rate_floor=RATE_FLOOR, probe_interval=self.probe_interval)
        self._log(relay, kind, fb)
        return fb

    def feedback_rider(self, relay: Relay, kind: str, accepted: int = 0) -> Rider:
        """:meth:`feedback` riding in another round trip (the chunk's commit): the window
        and rate learn it after the outcomes are saved, at no round trip of its own."""
        call = self.store.relays.feedback_call(
            relay.name, kind, accepted=accepted, ceiling=ceiling_of(relay),
            initial=INITIAL_WINDOW, regrow_after=REGROW_AFTER, rate_ceiling=relay.fleet_rate,
            rate_floor=RATE_FLOOR, probe_interval=self.probe_interval)
        return [call], lambda results: self._log(relay, kind, feedback_of(results[0]))

    def admit(self, relay: Relay, wanted: int, riders: Sequence[Rider] = ()) -> Admission:
        """The relay's pause, or up to *wanted* messages of its fleet rate, in one round
        trip with *riders* (see :meth:`RelayState.admit`)."""
        return self.store.relays.admit(relay.name, wanted, relay.fleet_rate, riders)

    def _log(self, relay: Relay, kind: str, fb: Feedback) -> None:
        if math.floor(fb.old_size) != math.floor(fb.size):
            log.info("relay.window", relay=relay.name, old=math.floor(fb.old_size),
                     new=math.floor(fb.size), signal=kind, streak=fb.streak,
                     cohort_failed=fb.cohort_failed)
        if fb.old_rate != fb.rate and (kind == "slow" or fb.rate is None
                                       or fb.old_rate is None
                                       or _notch(fb.rate) != _notch(fb.old_rate)):
            log.info("relay.rate", relay=relay.name, signal=kind,
                     old=None if fb.old_rate is None else round(fb.old_rate, 2),
                     new=None if fb.rate is None else round(fb.rate, 2),
                     ceiling=relay.fleet_rate)

    def take_rate(self, relay: Relay, wanted: int) -> tuple[int, float, float | None]:
        """Up to *wanted* messages of the relay's fleet rate: (granted, wait, rate)."""
        return self.store.relays.take_rate(relay.name, wanted, relay.fleet_rate)


class FleetSlots:
    """Window slots for the pools' new connections (:class:`~mailworker.smtp.pool.Slots`).

    One per process and store. Taking a slot is one Redis round trip per *new connection*
    (a batch on a kept connection pays none); the heartbeat first closes the pools' idle
    connections past ``idle_timeout`` (giving their slots back), then renews the slots of
    the connections still open, in one round trip.
    """

    def __init__(self, store: Store, pools: PoolManager, hold_seconds: float,
                 probe_interval: float = 30.0) -> None:
        self.store, self.pools, self.hold = store, pools, hold_seconds
        self.probe_interval = probe_interval
        self._held: dict[str, str] = {}  # token -> relay name
        self._lock = threading.Lock()
        self._beat: HeldLeases | None = None
        self._pid = 0

    def take(self, relay: Relay) -> str | None:
        with self._lock:
            if self._pid and self._pid != os.getpid():  # a forked child: the parent's slots
                self._held.clear()
                self._beat, self._pid = None, 0
        token = uuid.uuid4().hex
        if not self._take_waiting(relay, token):
            return None
        with self._lock:
            self._held[token] = relay.name
        self._ensure_heartbeat()
        return token

    def _take_waiting(self, relay: Relay, token: str) -> bool:
        """Take a slot; while every slot of the window is in use, poll for one for up to
        :data:`SLOT_WAIT` seconds (the batch's leases stay renewed by the heartbeat
        meanwhile). Every poll is the same atomic take, so the window's size is never
        exceeded. A dead relay (slots free, none granted before the probe) is not waited on.
        """
        deadline = time.monotonic() + min(SLOT_WAIT, self.hold / 20)
        pause = 0.005
        while True:
            taken, used, size = self.store.relays.take_slot(
                relay.name, token, ceiling=ceiling_of(relay), initial=INITIAL_WINDOW,
                hold_seconds=self.hold, probe_interval=self.probe_interval)
            if taken:
                return True
            left = deadline - time.monotonic()
            if used < math.floor(size) or left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.04)

    def give_back(self, relay: Relay, token: str) -> None:
        with self._lock:
            self._held.pop(token, None)
        self.store.relays.release(relay.name, token)

    def held(self) -> int:
        """Slots this process holds (for tests)."""
        with self._lock:
            return len(self._held)

    def renew(self) -> None:
        """Reap idle connections (their slots go back), then renew the rest's slots."""
        self.pools.reap()
        with self._lock:
            pairs = [(name, token) for token, name in self._held.items()]
        self.store.relays.renew_slots(pairs, self.hold)

    def _ensure_heartbeat(self) -> None:
        # Registered once per process (and again in a forked child: see take()).
        with self._lock:
            if self._beat is not None:
                return
            self._pid = os.getpid()
            beat = self._beat = HeldLeases(self.store, [], self.hold, 0.0)
        beat.also_renew(self.renew)
        heartbeat.register(beat)

    def close(self) -> None:
        """Stop renewing (the slots lapse within ``hold_seconds`` unless given back)."""
        with self._lock:
            beat, self._beat = self._beat, None
        if beat is not None:
            heartbeat.unregister(beat)


_installed: weakref.WeakKeyDictionary[PoolManager, FleetSlots] = weakref.WeakKeyDictionary()
_installed_lock = threading.Lock()


def install(store: Store, pools: PoolManager, hold_seconds: float,
            probe_interval: float) -> FleetSlots:
    """The :class:`FleetSlots` of *pools*, made and installed once per (pools, store).

    A ``Deliverer`` is made per task; its pools' slots must outlive it (a kept connection
    keeps its slot, renewed by one heartbeat registration per process, not one per task).
    Installing for another store closes the previous one (its slots lapse on their own).
    """
    with _installed_lock:
        slots = _installed.get(pools)
        if (slots is not None and slots.store is store and slots.hold == hold_seconds
                and slots.probe_interval == probe_interval):
            return slots
        if slots is not None:
            slots.close()
        slots = _installed[pools] = FleetSlots(store, pools, hold_seconds, probe_interval)
    pools.use_slots(slots)
    return slots
