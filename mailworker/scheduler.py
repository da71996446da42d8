"""The scheduler tick: promote due deferred mail, wake stuck mail, publish wake-ups.

Long waits live in Redis (docs/architecture.md), so something must look at the clock:
each tick moves due records from the deferred set to the in-flight set and publishes a
``deliver`` task per batch. The same tick sweeps: a record in flight past its watchdog
with no lease (its broker message was lost, or its worker died) is woken again. Leases
make a duplicate wake-up harmless, so the sweeper can err on the side of waking.

Any number of schedulers may run; a Redis lock (the store's) lets one tick at a time.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import structlog

from mailworker.broker import publish as publish_ids
from mailworker.config import Settings
from mailworker.publish import Publisher, wake
from mailworker.store import Store

# Publisher and publish_ids stay importable from here (their old home).
__all__ = ["Publisher", "Scheduler", "publish_ids"]

log = structlog.get_logger("mailworker.scheduler")


class Scheduler:
    """Runs :meth:`tick` every ``settings.tick_interval`` seconds while it holds the lock.

    *publish* sends the wake-ups (Celery's unless given: pass the runtime's publisher).
    """

    def __init__(self, settings: Settings, store: Store, publish: Publisher | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.publish = publish or publish_ids
        self.clock = clock
        self.identity = uuid.uuid4().hex
        self._stop = threading.Event()

    def _hold_lock(self) -> bool:
        """Take or extend the scheduler lock (the store's lock script: compare, then extend)."""
        return self.store.hold_scheduler_lock(self.identity, self.settings.tick_interval * 5)

    def tick(self, limit: int = 5000) -> int:
        """One pass; returns how many ids were woken."""
        s = self.settings
        now = self.clock()
        watchdog = now + s.stuck_after
        due = self.store.promote_due(now, limit, watchdog)
        stuck = self.store.sweep(now, limit, s.stuck_after)
        if stuck:
            log.warning("scheduler.swept", count=len(stuck))
        ids = list(dict.fromkeys([*due, *stuck]))
        if not ids:
            return 0
        routed: list[tuple[str, str, str]] = []
        gone: list[str] = []
        for mid, route in zip(ids, self.store.routes(ids), strict=True):
            if route is None:
                gone.append(mid)
            elif not route[0]:  # no readable route: a worker on the default queue decides
                routed.append((mid, s.default_queue, route[1]))
            else:
                routed.append((mid, *route))
        self.store.forget_inflight(gone)
        wake(self.publish, routed, s.batch_size)  # a failure is logged, left to the sweeper
        log.debug("scheduler.tick", promoted=len(due), swept=len(stuck))
        return len(ids)

    def run(self) -> None:
        """Tick until :meth:`stop`; survives Redis outages (logs and tries again)."""
        log.info("scheduler.started", interval=self.settings.tick_interval)
        while not self._stop.is_set():
            try:
                while self._hold_lock() and self.tick() >= 5000 and not self._stop.is_set():
                    pass  # a backlog: keep ticking, renewing the lock each time
            except Exception as exc:  # Redis restarting, broker down: keep trying
                log.warning("scheduler.tick_failed", error=f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.settings.tick_interval)
        log.info("scheduler.stopped")

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="mailworker-scheduler", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
