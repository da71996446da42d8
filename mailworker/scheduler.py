"""The scheduler tick: promote due deferred mail, wake stuck mail, publish wake-ups.

Long waits live in Redis (DESIGN.md principle 4), so something must look at the clock:
each tick moves due records from the deferred set to the in-flight set and publishes a
``deliver`` task per batch. The same tick sweeps: a record in flight past its watchdog
with no lease (its broker message was lost, or its worker died) is woken again. Leases
make a duplicate wake-up harmless, so the sweeper can err on the side of waking.

Any number of schedulers may run; a Redis lock lets one tick at a time.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence

import structlog

from mailworker.config import Settings
from mailworker.store import Store

__all__ = ["Publisher", "Scheduler", "publish_ids"]

log = structlog.get_logger("mailworker.scheduler")
_LOCK = """
local v = redis.call("GET", KEYS[1])
if v == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if v then return 0 end
return redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2]) and 1 or 0
"""
Publisher = Callable[[Sequence[str], str], None]
"""Publishes one wake-up for a batch of ids on a queue."""


def publish_ids(ids: Sequence[str], queue: str) -> None:
    """The default publisher: one ``mailworker.deliver`` task per batch (on the app
    :func:`mailworker.celery_integration.install` named, else mailworker's own)."""
    from mailworker.celery_integration import deliver_task

    deliver_task().apply_async(args=[list(ids)], queue=queue, routing_key=queue)


class Scheduler:
    """Runs :meth:`tick` every ``settings.tick_interval`` seconds while it holds the lock."""

    def __init__(self, settings: Settings, store: Store, publish: Publisher = publish_ids,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.publish = publish
        self.clock = clock
        self.identity = uuid.uuid4().hex
        self._stop = threading.Event()
        self.lock_key = store.key("scheduler", "lock")
        self._lock_script = store.redis.register_script(_LOCK)

    def _hold_lock(self) -> bool:
        """Take or extend the scheduler lock (atomically: compare, then extend)."""
        ttl = max(1000, int(self.settings.tick_interval * 5000))
        return bool(self._lock_script(keys=[self.lock_key], args=[self.identity, ttl]))

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
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        gone: list[str] = []
        for mid, route in zip(ids, self.store.routes(ids), strict=True):
            if route is None:
                gone.append(mid)
            else:
                groups[route].append(mid)
        self.store.forget_inflight(gone)
        for (queue, _relay), group in groups.items():
            for i in range(0, len(group), s.batch_size):
                self.publish(group[i:i + s.batch_size], queue)
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
