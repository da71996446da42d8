"""Leases kept alive by a heartbeat while a worker is alive and its batch runs.

A lease is short (``lease_seconds``, 15 s by default) so that a killed worker's mail moves
again within seconds, and a process-wide heartbeat thread renews every lease a live
delivery pass holds every ``lease_seconds / 3``, however slow the relay. Whether a
message may still be *started* is decided locally before its MAIL FROM
(:meth:`HeldLeases.usable`): its lease must be known to Redis as ours, with a margin,
at the last acknowledged renewal. A lease lost or not renewed in time is detected before
the next MAIL FROM, never after, so a message that another worker claimed is never sent
by the first.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from mailworker.store import Claim, Store
from mailworker.store.scripts import Rider

__all__ = ["Heartbeat", "HeldLeases", "heartbeat"]

log = structlog.get_logger("mailworker.leases")

# Part of the lease kept in reserve: a message is not started when less than this much of
# its lease is known to be left (clock skew between us and Redis, a slow round trip).
SAFETY = 0.2


class HeldLeases:
    """The leases of one delivery pass, as far as Redis has acknowledged them."""

    def __init__(self, store: Store, claims: Sequence[Claim], lease_seconds: float,
                 acquired_at: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.lease, self.clock = store, lease_seconds, clock
        self._claims = {c.record.id: c for c in claims}
        good_for = lease_seconds * (1 - SAFETY)
        self._until = dict.fromkeys(self._claims, acquired_at + good_for)
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._also: list[Callable[[], None]] = []

    def usable(self, mid: str) -> bool:
        """May *mid*'s transaction start now? (Ours, and known to be for a while yet.)"""
        with self._lock:
            return mid not in self._lost and self.clock() < self._until.get(mid, 0.0)

    def renew(self) -> None:
        """Extend every lease still held: one round trip (the heartbeat calls this),
        and whatever else the batch holds for as long as it runs (a fleet slot)."""
        with self._lock:
            claims = [c for mid, c in self._claims.items() if mid not in self._lost]
            also = list(self._also)
        if claims:
            self._settle(claims, self.store.renew_many(claims, self.lease), self.clock())
        for renew in also:
            renew()

    def also_renew(self, renew: Callable[[], None]) -> None:
        with self._lock:
            self._also.append(renew)

    def stop_renewing(self, renew: Callable[[], None]) -> None:
        with self._lock:
            if renew in self._also:
                self._also.remove(renew)

    def mark(self, claims: Sequence[Claim]) -> list[bool]:
        """Renew and mark *claims* as being sent before their window starts."""
        sent = self.clock()
        ok = self.store.mark_sending(claims, self.lease)
        self._settle(claims, ok, sent)
        return [self.usable(c.record.id) for c in claims]

    def mark_rider(self, claims: Sequence[Claim], into: dict[str, bool]) -> Rider:
        """:meth:`mark` riding in another round trip (the batch's rate check, the previous
        chunk's commit), so that a window starting a chunk costs no round trip of its own.
        Its results (usable or not, per id) land in *into* once Redis has answered,
        which is before the caller goes on to the window's first MAIL FROM; nothing lands
        if that round trip fails, and the gate then marks the window itself."""
        sent = self.clock()
        calls, decode = self.store.mark_calls(claims, self.lease, time.time())

        def done(results: list[Any]) -> None:
            self._settle(claims, decode(results), sent)
            into.update((c.record.id, self.usable(c.record.id)) for c in claims)

        return calls, done

    def release(self, ids: Sequence[str]) -> None:
        """Stop renewing *ids* (their outcome is decided; the commit ends the lease)."""
        with self._lock:
            for mid in ids:
                self._claims.pop(mid, None)

    @property
    def lost(self) -> int:
        return len(self._lost)

    def _settle(self, claims: Sequence[Claim], ok: Sequence[bool], sent: float) -> None:
        # The lease runs from when Redis got the request, which is after *sent*.
        good_until = sent + self.lease * (1 - SAFETY)
        with self._lock:
            for claim, renewed in zip(claims, ok, strict=True):
                mid = claim.record.id
                if mid not in self._claims:  # decided and committed meanwhile: not lost
                    continue
                if renewed:
                    self._until[mid] = max(self._until.get(mid, 0.0), good_until)
                elif mid not in self._lost:
                    self._lost.add(mid)
                    log.warning("delivery.lease_lost_before_send", message_id=mid,
                                hint="another worker took it over; this one will not send it")


class Heartbeat:
    """One thread per process that renews every registered :class:`HeldLeases`.

    Registering is cheap (no thread per batch); the thread starts on first use and again
    in a forked child (threads do not survive ``fork``). A failed renewal (Redis
    unreachable) is logged and retried at the next beat; meanwhile the leases' known
    validity runs out and no new transaction starts on them.
    """

    def __init__(self) -> None:
        # id -> (leases, renewal interval, first renewal due: registration + interval)
        self._held: dict[int, tuple[HeldLeases, float, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = 0
        self._thread: threading.Thread | None = None
        # When the thread will next wake on its own (monotonic; under _lock). 0.0: not
        # asleep on a plan yet (starting, or between beats); it reads _held before it sleeps.
        self._next_wake = 0.0
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent's thread is gone and its lock may have been held mid-beat: start over.
        self._held, self._lock, self._wake = {}, threading.Lock(), threading.Event()
        self._thread, self._pid, self._next_wake = None, 0, 0.0

    def register(self, held: HeldLeases) -> None:
        """Renew *held* every ``lease / 3``, the first time ``lease / 3`` from now.

        The thread is woken only when that first renewal is due before it would wake
        anyway: with batches running it usually is not (another pass's renewal comes
        first), and a wake-up per task (an Event.set and a GIL hand-over to the thread)
        was ~5% of a prefork child's Python CPU.
        """
        interval = held.lease / 3
        first = time.monotonic() + interval
        with self._lock:
            self._held[id(held)] = (held, interval, first)
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid, self._next_wake = os.getpid(), 0.0
                self._thread = threading.Thread(target=self._run, name="mailworker-heartbeat",
                                                daemon=True)
                self._thread.start()
            wake = first < self._next_wake
            if wake:
                self._next_wake = first
        if wake:
            self._wake.set()

    def unregister(self, held: HeldLeases) -> None:
        with self._lock:
            self._held.pop(id(held), None)

    def _run(self) -> None:
        # id -> (first renewal of the registration it was planned for, next renewal due);
        # the registration is told by its *first*, as an id may be reused by another pass.
        due: dict[int, tuple[float, float]] = {}
        while True:
            self._wake.clear()  # before reading _held: a registration after this wakes us
            with self._lock:
                held = dict(self._held)
                self._next_wake = 0.0  # awake: registrations need not wake us
            now = time.monotonic()
            for key, (leases, interval, first) in held.items():
                planned = due.get(key)
                if planned is None or planned[0] != first:
                    planned = due[key] = (first, first)
                if now >= planned[1]:
                    due[key] = (first, now + interval)
                    try:
                        leases.renew()
                    except Exception as exc:  # Redis down: the leases run out on their own
                        log.warning("delivery.heartbeat_failed",
                                    error=f"{type(exc).__name__}: {exc}")
            for key in list(due):
                if key not in held:
                    del due[key]
            with self._lock:  # registered meanwhile: their first renewal counts too
                pending = [first for key, (_, _, first) in self._held.items()
                           if key not in due or due[key][0] != first]
                wake_at = min([*(at for _, at in due.values()), *pending], default=now + 60)
                self._next_wake = wake_at
            self._wake.wait(max(0.01, wake_at - time.monotonic()))


heartbeat = Heartbeat()
"""The process's heartbeat (one per process; see :class:`Heartbeat`)."""
