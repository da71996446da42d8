"""Run the real delivery machinery in one process, on a clock the test controls.

:class:`LocalDelivery` wires the production pieces together without Celery, Redis or a
worker process, so a test can drive them step by step and look at every state:

* the store is :class:`mailworker.store.Store` on fakeredis (with Lua: the same atomic
  scripts as on Redis), installed as the process's runtime, so :mod:`mailworker.dlq` and
  :func:`mailworker.status` read it;
* wake-ups go to an in-memory list instead of the broker; :meth:`LocalDelivery.run_until_idle`
  hands them to a real :class:`~mailworker.delivery.Deliverer` and runs real
  :class:`~mailworker.scheduler.Scheduler` ticks until nothing is due;
* time is a :class:`Clock` that stands still until :meth:`LocalDelivery.advance` moves
  it, so a 10-minute backoff takes no time and its length can be asserted exactly;
* mail goes over real SMTP, pooled and pipelined, to an :class:`SMTPTestServer` (started
  for you) or to any relay DSN you give.

What it leaves out is processes: crashes, restarts and several workers sharing a fleet
need real ``mailworker worker`` subprocesses and a real Redis.

fakeredis is imported only when a :class:`LocalDelivery` is made: it is in the ``demo``
and ``test`` extras (``pip install 'mailworker[demo]'``), not a runtime dependency.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from mailworker import runtime as _runtime
from mailworker.config import Settings
from mailworker.delivery import Deliverer, PassReport
from mailworker.hooks import Hooks
from mailworker.hooks import hooks as default_hooks
from mailworker.policy import Policy
from mailworker.record import MessageState, Record
from mailworker.relay import parse_relay
from mailworker.scheduler import Scheduler
from mailworker.smtp import PoolManager
from mailworker.store import Store

from .server import SMTPTestServer

__all__ = ["Clock", "LocalDelivery", "StillPending"]


class StillPending(RuntimeError):  # noqa: N818 - reads as what it says, like PoolTimeout
    """:meth:`LocalDelivery.run_until_idle` gave up: work was still due after its rounds."""


class Clock:
    """Wall-clock time that stands still until :meth:`advance` moves it.

    It starts at the real time (so records stamped by the store and by the clock agree)
    and never goes back. :meth:`monotonic` is the real monotonic clock plus every advance,
    for the SMTP pools: idle connections age when the test moves time on.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else float(start)
        self.offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time on by *seconds* (not negative); returns the new time."""
        if not seconds >= 0:
            raise ValueError(f"a clock only goes forward: advance({seconds!r})")
        with self._lock:
            self._now += seconds
            self.offset += seconds
            return self._now

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class _EventLog:
    """A structlog-shaped logger for the SMTP pools that keeps every event in a list
    (``smtp.reply``, ``smtp.connect``...), with the fields bound by ``bind()``."""

    def __init__(self, events: list[dict[str, Any]], lock: threading.Lock,
                 context: Mapping[str, Any] | None = None) -> None:
        self._events, self._lock, self._context = events, lock, dict(context or {})

    def bind(self, **kw: Any) -> _EventLog:
        return _EventLog(self._events, self._lock, {**self._context, **kw})

    def is_enabled_for(self, level: int) -> bool:
        return True

    def __getattr__(self, level: str) -> Callable[..., None]:
        if level.startswith("_"):
            raise AttributeError(level)

        def emit(event: str, **kw: Any) -> None:
            with self._lock:
                self._events.append({"event": event, "level": level, **self._context, **kw})
        return emit


def _fake_redis() -> Any:
    try:
        import fakeredis
    except ImportError:
        raise ImportError(
            "LocalDelivery needs fakeredis with Lua: pip install 'mailworker[demo]' "
            "(or pass redis_client= a real Redis client)") from None
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


class LocalDelivery:
    """The real deliverer, scheduler and dead-letter code in this process; see the module
    docstring. Use it as a context manager (or call :meth:`close`)::

        with LocalDelivery() as local:
            mid = local.send(to="user@example.com", subject="Hi", text="Hello")
            local.run_until_idle()
            assert local.status(mid)["state"] == "delivered"
            assert local.server.messages[0].recipients == ("user@example.com",)

    *relay* is the ``default`` relay: an :class:`SMTPTestServer` (or a DSN); when neither
    it, *relays* nor *settings* name a relay, a test server is started (``.server``) and
    stopped on close. *settings* defaults to :class:`~mailworker.config.Settings` with a
    default sender; *overrides* are Settings fields on top. *policy* replaces the retry
    policy of ``settings.retry`` (e.g. backoffs without jitter). *hooks* defaults to the
    process's registry (``@mailworker.on``), as in a worker. *redis_client* replaces
    fakeredis (a real Redis, with your own key prefix).
    """

    def __init__(
        self,
        relay: SMTPTestServer | str | None = None,
        *,
        relays: Mapping[str, SMTPTestServer | str] | None = None,
        settings: Settings | None = None,
        policy: Policy | None = None,
        hooks: Hooks | None = None,
        clock: Clock | None = None,
        seed: int = 0,
        redis_client: Any = None,
        max_rounds: int = 100,
        **overrides: Any,
    ) -> None:
        self.clock = clock or Clock()
        self.max_rounds = max_rounds
        self.server: SMTPTestServer | None = None
        self._previous = _runtime.current()
        self._wakeups: list[tuple[list[str], str]] = []
        self._closed = self._installed = False
        self._pools: PoolManager | None = None
        try:
            self._start(relay, relays, settings, policy, hooks, seed, redis_client, overrides)
        except BaseException:  # a bad setting or DSN: leave nothing running or replaced
            self.close()
            raise

    def _start(self, relay: SMTPTestServer | str | None,
               relays: Mapping[str, SMTPTestServer | str] | None, settings: Settings | None,
               policy: Policy | None, hooks: Hooks | None, seed: int, redis_client: Any,
               overrides: dict[str, Any]) -> None:
        named: dict[str, SMTPTestServer | str] = dict(relays or {})
        if relay is not None:
            named["default"] = relay
        base = settings or Settings(default_sender="app@example.com")
        if not named and not base.relays:
            self.server = SMTPTestServer(hostname="local.test")
            self.server.start()
            named["default"] = self.server
        parsed = {name: parse_relay(name, r.dsn() if isinstance(r, SMTPTestServer) else r)
                  for name, r in named.items()}
        if parsed:
            overrides.setdefault("relays", {**base.relays, **parsed})
        self.settings = base.with_(**overrides) if overrides else base
        rt = _runtime.configure(self.settings, redis_client=redis_client or _fake_redis(),
                                publisher=self.publish)
        self._installed = True
        self.redis = rt.redis
        self.store: Store = rt.store
        self._events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self.pools = self._pools = PoolManager(
            logger=_EventLog(self._events, self._events_lock), clock=self.clock.monotonic)
        self.deliverer = Deliverer(self.settings, self.store, self.pools,
                                   hooks if hooks is not None else default_hooks,
                                   clock=self.clock, rng=random.Random(seed), policy=policy)
        self.scheduler = Scheduler(self.settings, self.store, publish=self.publish,
                                   clock=self.clock)
        #: What each delivery pass did (claimed, skipped, states, lost leases...).
        self.reports: list[PassReport] = []

    # -- the in-memory broker --------------------------------------------------------------
    def publish(self, ids: Sequence[str], queue: str) -> None:
        """The wake-up publisher: one batch of ids for *queue*, kept until delivered."""
        self._wakeups.append((list(ids), queue))

    @property
    def wakeups(self) -> list[tuple[list[str], str]]:
        """Wake-ups published and not yet delivered: (ids, queue), oldest first."""
        return [(list(ids), q) for ids, q in self._wakeups]

    def drop_wakeups(self) -> int:
        """Lose every pending wake-up, as a broker that lost its messages; returns how many.
        The records stay in flight, for the scheduler's sweep to find."""
        n = len(self._wakeups)
        self._wakeups.clear()
        return n

    # -- sending and driving ---------------------------------------------------------------
    def send(self, **message: Any) -> str:
        """Accept one message as :func:`mailworker.send` does; returns its id."""
        return self.send_many([message])[0]

    def send_many(self, messages: Sequence[Mapping[str, Any]]) -> list[str]:
        """Accept messages as :func:`mailworker.send_many` does, stamped with this clock.

        The real validation and enqueue code runs; the times it stamps (creation, expiry,
        ``send_at``) are moved onto :attr:`clock`. Wake-ups go to :attr:`wakeups`, as do
        those of :func:`mailworker.send` itself (the runtime's publisher is this one),
        but ``mailworker.send`` stamps the wall-clock time.
        """
        from mailworker import api

        items = api.prepare_many(messages)
        for rec, _raw in items:
            shift = self.clock() - rec.created_at  # the api's "now", for every time it set
            rec.created_at += shift
            rec.expires_at += shift
            if rec.send_at is not None:
                rec.send_at += shift
            if rec.next_attempt_at is not None:
                rec.next_attempt_at += shift
        return api.enqueue_prepared(items)

    def deliver(self, ids: Sequence[str]) -> PassReport:
        """Run one delivery pass over *ids* now, as a worker given that wake-up would."""
        report = self.deliverer.run(list(ids), task_id=f"local-{uuid.uuid4().hex[:8]}")
        self.reports.append(report)
        return report

    def tick(self) -> int:
        """One scheduler tick (promote due mail, sweep stuck mail); ids woken."""
        return self.scheduler.tick()

    def run_until_idle(self, max_rounds: int | None = None) -> int:
        """Deliver wake-ups and tick the scheduler until nothing is due at this time.

        Returns the number of delivery passes run. Mail deferred to a later time stays
        deferred (:meth:`advance` or :meth:`drain` move time on). Raises
        :class:`StillPending`, naming what is still due, after *max_rounds* rounds
        (default :attr:`max_rounds`) of passes and ticks that each found work.
        """
        rounds = self.max_rounds if max_rounds is None else max_rounds
        passes = 0
        for _ in range(rounds):
            # The wake-ups of this round only: a pass may publish more (a hook that sends).
            batch, self._wakeups = self._wakeups, []
            for ids, _queue in batch:
                self.deliver(ids)
            passes += len(batch)
            busy = bool(batch)
            if self.tick():
                busy = True
            if not busy:
                return passes
        pending = [mid for ids, _ in self._wakeups for mid in ids]
        due = [_text(m) for m in self.redis.zrangebyscore(self.store.keys.inflight, "-inf",
                                                           self.clock())]
        raise StillPending(
            f"still busy after {rounds} rounds at t={self.clock():.3f}: "
            f"{len(self._wakeups)} wake-ups pending ({_ids(pending)}), "
            f"{len(due)} in flight and due ({_ids(due)}). Is there work that makes more "
            "work, such as a hook that sends mail for every delivery? If not, raise "
            "max_rounds")

    def advance(self, seconds: float) -> None:
        """Move the clock on by *seconds*, then :meth:`run_until_idle`."""
        self.clock.advance(seconds)
        self.run_until_idle()

    def drain(self, max_seconds: float = 30 * 86400.0) -> float:
        """Run until every message is final, jumping the clock to each next due time.

        Returns the seconds the clock moved. Raises :class:`StillPending` when mail would
        still be waiting after *max_seconds*.
        """
        start = self.clock()
        for _ in range(self.max_rounds):
            self.run_until_idle()
            nxt = self._next_due()
            if nxt is None:
                return self.clock() - start
            if nxt - start > max_seconds:
                break
            self.clock.advance(max(0.0, nxt - self.clock()))
        raise StillPending(f"mail still waiting after {self.clock() - start:.0f} s: "
                           f"{self.store.counts()}")

    def _next_due(self) -> float | None:
        times: list[float] = []
        for key in (self.store.keys.deferred, self.store.keys.inflight):
            first: list[Any] = self.redis.zrange(key, 0, 0, withscores=True)
            times += [float(score) for _member, score in first]
        return min(times) if times else None

    # -- what tests read -------------------------------------------------------------------
    def record(self, message_id: str) -> Record | None:
        """The stored record (a fresh copy each call)."""
        return self.store.get(message_id)

    def status(self, message_id: str) -> dict[str, Any] | None:
        """What :func:`mailworker.status` says about the message."""
        rec = self.store.get(message_id)
        return rec.summary() if rec else None

    @property
    def records(self) -> list[Record]:
        """Every record in the store, in no particular order."""
        head = self.store.keys.head("m")
        ids = sorted(_text(k)[len(head):]
                     for k in self.redis.scan_iter(match=self.store.keys.scan_pattern("m")))
        return [r for r in self.store.get_many(ids) if r is not None]

    @property
    def dead_letters(self) -> list[Record]:
        """The dead letters, oldest first (as ``mailworker dlq list`` shows them)."""
        return [r for r in self.store.get_many(self.store.dead_ids())
                if r is not None and r.state is MessageState.DEAD]

    @property
    def replies(self) -> list[dict[str, Any]]:
        """Every ``smtp.reply`` event the pools logged: command, code, text, recipient..."""
        with self._events_lock:
            return [e for e in self._events if e["event"] == "smtp.reply"]

    @property
    def events(self) -> list[dict[str, Any]]:
        """Everything the SMTP pools logged (``smtp.connect``, ``smtp.close``, replies)."""
        with self._events_lock:
            return list(self._events)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Close connections, stop the test server it started, give back the runtime."""
        if self._closed:
            return
        self._closed = True
        deliverer = getattr(self, "deliverer", None)
        if deliverer is not None:
            deliverer.slots.close()  # the heartbeat stops renewing this harness's window slots
        if self._pools is not None:
            self._pools.close_all()
        if self.server is not None:
            self.server.stop()
        if self._installed:
            if self._previous is None:
                _runtime.reset_runtime()
            else:
                _runtime.configure(self._previous.settings, redis_client=self._previous.redis,
                                   publisher=self._previous.publisher)

    def __enter__(self) -> LocalDelivery:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<LocalDelivery t={self.clock():.3f} {self.store.counts()} "
                f"[{len(self._wakeups)} wake-ups pending]>")


def _ids(ids: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "") if ids else "none"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
