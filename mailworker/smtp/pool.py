"""Per-process pools of SMTP connections: one :class:`Pool` per relay, a :class:`PoolManager`.

The shape follows httpcore: each connection answers a few questions (``is_retired``,
``server_spoke``, ``idle_for``); all the bookkeeping is one method, ``Pool._update``,
under the pool's one lock: it notes what happened (a connection came back or opened, a
checkout arrived or gave up) and *returns* the connections to close, which the caller
closes after releasing the lock, because QUIT can block for seconds.

Checkouts are served first come, first served: a connection that comes back, or a slot
that frees up, is handed directly to the thread that has waited longest, so none can be
overtaken again and again until :class:`PoolTimeout`.

Reuse is LIFO: the most recently used connection is the least likely to have been timed
out by the server. An idle connection whose socket is readable (the server sent its
``421 timeout`` or hung up) is dropped without a round trip; one idle past
``relay.noop_after`` is checked with a NOOP.

A pooled connection can still go stale in the instant between that check and our MAIL.
When the first message on a *reused* connection fails before any content was committed
(a disconnect or a 421 at the MAIL stage, including a failed first write), the batch is
sent again, once, on a fresh connection (tenacity, no wait). That is a reconnect, not a
delivery attempt: the caller never sees it.
"""

from __future__ import annotations

import os
import smtplib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_none

from mailworker.relay import Relay, RelayKey
from mailworker.smtp.connection import Connection
from mailworker.smtp.errors import (
    BEFORE_MAIL,
    DeliveryUncertain,
    NotAttempted,
    Stage,
    annotate,
    failure_of,
)
from mailworker.smtp.pipeline import Envelope, Gate, SendResult

__all__ = ["NoSlot", "Pool", "PoolManager", "PoolStats", "PoolTimeout", "Slots", "pools"]

Entry = SendResult | BaseException


class PoolTimeout(TimeoutError):  # noqa: N818 - reads as what it is, like socket.timeout
    """No connection to the relay became free within ``relay.connect_timeout``."""


class NoSlot(PoolTimeout):
    """The relay's fleet-wide window (see :class:`Slots`) has no slot for a new connection."""


class Slots(Protocol):
    """The delivery layer's say over opening connections (the fleet-wide window).

    The pool asks :meth:`take` before it opens a connection and opens none when it gets
    None (raising :class:`NoSlot`); it calls :meth:`give_back` with the token once that
    connection is closed (retired, dropped, or failed to open). The SMTP layer knows
    nothing of how slots are kept (mailworker.fleet keeps them in Redis).
    """

    def take(self, relay: Relay) -> str | None: ...

    def give_back(self, relay: Relay, token: str) -> None: ...


@dataclass(frozen=True)
class PoolStats:
    """Live counts (active, idle, and last: opening, waiting) and totals since made."""

    active: int
    idle: int
    opened: int
    reused: int
    discarded_stale: int
    closed: int
    unencrypted: int = 0  # opened in clear under tls=may (no STARTTLS, or it failed)
    tls_fallbacks: int = 0  # tls=may: STARTTLS failed, so the connection was reopened in clear
    opening: int = 0
    waiting: int = 0


@dataclass(eq=False, slots=True)
class _Waiter:
    """One checkout in line; the pool hands it a connection or a slot to open one."""

    fresh: bool                      # wants a new connection (the stale retry), not an idle one
    again: bool = False              # back after a failed NOOP: keeps its place at the head
    conn: Connection | None = None   # handed an idle connection...
    slot: bool = False               # ...or the right to open one
    served: bool = False
    ready: threading.Event | None = None  # made only for a checkout that has to wait


@dataclass
class _ToClose:
    """What a bookkeeping step took out of the pool, to close outside the lock."""

    drop: list[Connection] = field(default_factory=list)  # no QUIT: hung up or out of step
    quit: list[Connection] = field(default_factory=list)  # retired: say goodbye
    tokens: list[str] = field(default_factory=list)  # their slots, given back once closed
    give_back: Callable[[list[str]], None] | None = None

    def close(self) -> None:
        for conn in self.drop:
            conn.close(quit=False)
        for conn in self.quit:
            conn.close()
        if self.tokens and self.give_back is not None:
            self.give_back(self.tokens)


class _Stale(Exception):  # noqa: N818 - internal signal for tenacity, never escapes
    def __init__(self, entries: list[Entry]) -> None:
        super().__init__("stale pooled connection")
        self.entries = entries


def _is_stale(entry: Entry) -> bool:
    """Failed at MAIL with a disconnect or 421: the server had dropped us, nothing sent.

    Not when an earlier transaction of the same envelope (a 452 split) was accepted:
    sending the envelope again would give those recipients a second copy.
    """
    if not isinstance(entry, BaseException):
        return False
    failure = failure_of(entry)
    if failure.stage is not Stage.MAIL:
        return False
    if isinstance(entry, NotAttempted):  # the gate stopped it: nothing to do with staleness
        return False
    if failure.partial is not None and failure.partial.accepted:
        return False
    return isinstance(entry, smtplib.SMTPServerDisconnected) or failure.code == 421


# Relays already warned about in this process (cleared in a forked child).
_PLAIN_WARNED: set[str] = set()
_PLAIN_LOCK = threading.Lock()

# Built once: tenacity keeps each run's state in thread-local storage, so threads share it.
_RECONNECT = Retrying(stop=stop_after_attempt(2), wait=wait_none(), reraise=True,
                      retry=retry_if_exception_type(_Stale))


class Pool:
    """Connections to one relay, shared by the threads of one process."""

    def __init__(self, relay: Relay, *, logger: Any = None,
                 clock: Callable[[], float] = time.monotonic, slots: Slots | None = None) -> None:
        self.relay = relay
        self.slots = slots
        self._logger, self._clock = logger, clock
        self._log = logger if logger is not None else structlog.get_logger("mailworker.smtp")
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()  # taken by _update (and stats) only
        self._idle: list[Connection] = []  # LIFO: the end is the most recently used
        self._active: set[Connection] = set()
        self._opening = 0
        self._waiters: deque[_Waiter] = deque()  # FIFO: served in arrival order
        self._generation = 0  # close() and fork bump it; older connections are not reused
        self._born: dict[Connection, int] = {}
        self._pid = os.getpid()
        self._opened = self._reused = self._stale = self._closed = self._unencrypted = 0
        self._tls_fallbacks = 0
        self._tokens: dict[Connection, str] = {}  # the slot each connection was opened in
        self._freed: list[str] = []  # slots of connections retired in this _update

    # -- public ---------------------------------------------------------------------------
    def send(self, envelope: Envelope) -> SendResult:
        """Send one message on a pooled connection; raise like :meth:`Connection.send`."""
        entry = self.send_many((envelope,))[0]
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def send_many(self, envelopes: Sequence[Envelope], *, gate: Gate | None = None
                  ) -> list[Entry]:
        """Send a batch, as many per connection as ``max_messages`` allows.

        One entry per envelope (see :meth:`Connection.send_many`). Raises only when no
        connection can be had for the first message (connect, TLS or AUTH failure, or
        :class:`PoolTimeout`); once a connection fails, every later message is
        :class:`NotAttempted`. *gate* is :meth:`Session.run`'s, always called with an
        index into *envelopes* (also when the batch spans connections or is sent again
        after a stale one); once it refuses, no later envelope is started.
        """
        out: list[Entry] = []
        stopped = False

        def gate_at(offset: int) -> Gate | None:
            if gate is None:
                return None

            def at(i: int) -> bool:
                nonlocal stopped
                stopped = True  # until it says yes (a raising gate means "stop" too)
                stopped = not gate(offset + i)
                return not stopped
            return at

        while len(out) < len(envelopes):
            if stopped:
                out.extend(annotate(NotAttempted("not attempted: the caller stopped the batch"),
                                    Stage.MAIL, self.relay.name) for _ in envelopes[len(out):])
                break
            try:
                entries, broken = self._send_with_reconnect(envelopes[len(out):],
                                                            gate_at(len(out)))
            except Exception as exc:
                # Only a failure to get the next connection leaves the rest unsent; anything
                # else (e.g. a time limit firing mid-transaction) may have struck after a
                # final dot, and the caller must treat the batch as uncertain.
                if not out or not (isinstance(exc, PoolTimeout)
                                   or failure_of(exc).stage in BEFORE_MAIL):
                    raise
                entries, broken = [_not_attempted(self.relay, exc)], True
            out.extend(entries)
            if broken:
                cause = next((e for e in reversed(entries) if isinstance(e, BaseException)), None)
                out.extend(_not_attempted(self.relay, cause) for _ in envelopes[len(out):])
        return out

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(len(self._active), len(self._idle), self._opened, self._reused,
                             self._stale, self._closed, self._unencrypted, self._tls_fallbacks,
                             self._opening, len(self._waiters))

    def close(self) -> None:
        """QUIT the idle connections now; active ones are closed when they come back."""
        self._update(close=True).close()

    def reap(self) -> None:
        """Close the idle connections that are past ``idle_timeout`` (or otherwise retired)
        now, not at the next checkout, so their slots go back (the heartbeat calls this)."""
        self._update().close()

    def reset_after_fork(self) -> None:
        """In a forked child: forget inherited connections without QUIT (their sockets
        belong to the parent) and make new locks (the parent's may be held forever)."""
        inherited = [*self._idle, *self._active]
        self._init_state()
        for conn in inherited:
            conn.abandon()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<Pool relay={self.relay.name!r} [{s.active} active, {s.idle} idle, "
                f"{s.opening} opening, {s.waiting} waiting]>")

    # -- one connection's worth -------------------------------------------------------------
    def _send_with_reconnect(self, envelopes: Sequence[Envelope], gate: Gate | None
                             ) -> tuple[list[Entry], bool]:
        """Entries for as many envelopes as one connection takes; and whether it broke."""
        try:
            for attempt in _RECONNECT:
                with attempt:
                    return self._send_once(envelopes, gate,
                                           fresh=attempt.retry_state.attempt_number > 1)
        except _Stale as stale:  # only if even a fresh connection was "stale"
            return stale.entries, True
        raise AssertionError("unreachable")  # pragma: no cover

    def _send_once(self, envelopes: Sequence[Envelope], gate: Gate | None, fresh: bool
                   ) -> tuple[list[Entry], bool]:
        conn, reused = self._checkout(fresh)
        try:
            budget = max(1, self.relay.max_messages - conn.messages_sent)
            entries = conn.send_many(envelopes[:budget], gate=gate)
            broken = conn.is_closed  # only a failure closes it inside send_many
        except BaseException:
            conn.close(quit=False)  # interrupted mid-transaction: out of step
            raise
        finally:
            self._update(back=conn).close()
        # Stale only if nothing after the first went out: with BDAT a window may have been
        # written behind a 421 to its first MAIL (those are uncertain, never sent again here).
        if reused and entries and _is_stale(entries[0]) and not any(
                isinstance(e, DeliveryUncertain) for e in entries[1:]):
            self._update(stale_retry=True).close()
            self._log.info("smtp.stale_retry", relay=self.relay.name, conn_id=conn.conn_id,
                           error=type(entries[0]).__name__)
            raise _Stale(entries)
        return entries, broken

    def _checkout(self, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection for this thread, and whether it was reused; waits its turn."""
        if os.getpid() != self._pid:
            self.reset_after_fork()
        deadline = self._clock() + self.relay.connect_timeout
        again = False
        while True:
            waiter = _Waiter(fresh, again)
            self._update(arrive=waiter).close()
            if waiter.ready is not None and not self._wait(waiter, deadline):
                raise PoolTimeout(
                    f"no connection to relay {self.relay.name!r} became free within "
                    f"{self.relay.connect_timeout:g}s ({self.relay.max_connections} "
                    "in use); raise max_connections or add workers")
            conn = waiter.conn
            if conn is None:  # a slot: open a connection in it
                return self._open(), False
            if conn.idle_for(self._clock()) < self.relay.noop_after or self._noop_ok(conn):
                return conn, True
            again = True

    def _wait(self, waiter: _Waiter, deadline: float) -> bool:
        """Wait for *waiter*'s turn until *deadline*; False if it gave up unserved. One
        interrupted (a time limit raised in this thread) gives back what it was handed."""
        assert waiter.ready is not None
        try:
            if waiter.ready.wait(max(0.0, deadline - self._clock())):
                return True
        except BaseException:
            self._update(leave=waiter).close()
            if waiter.conn is not None:
                self._update(back=waiter.conn).close()
            elif waiter.slot:
                self._update(open_failed=True).close()
            raise
        self._update(leave=waiter).close()
        return waiter.served

    def _noop_ok(self, conn: Connection) -> bool:
        try:
            conn.noop()
            return True
        except (OSError, smtplib.SMTPException):
            self._update(drop=conn).close()
            return False

    def _open(self) -> Connection:
        token = None
        if self.slots is not None:
            try:
                token = self.slots.take(self.relay)
            except BaseException:
                self._update(open_failed=True).close()
                raise
            if token is None:
                self._update(open_failed=True).close()
                raise annotate(NoSlot(f"relay {self.relay.name!r}: every slot of its "
                                      "fleet-wide window is in use"),
                               Stage.CONNECT, self.relay.name)
        conn = Connection(self.relay, logger=self._logger, clock=self._clock)
        try:
            conn.open()
        except BaseException:
            self._update(open_failed=True).close()
            if token is not None:
                self._give_back([token])
            raise
        self._update(opened=conn, token=token).close()
        if not conn.encrypted and self.relay.tls == "may":
            self._warn_plain()
        return conn

    def _give_back(self, tokens: list[str]) -> None:
        slots = self.slots
        if slots is None:
            return
        for token in tokens:
            try:
                slots.give_back(self.relay, token)
            except Exception as exc:  # the slot expires on its own
                self._log.warning("smtp.slot_give_back_failed", relay=self.relay.name,
                                  error=f"{type(exc).__name__}: {exc}")

    def _warn_plain(self) -> None:
        """STARTTLS missing on ``smtp://``: possibly stripped on the path. Once per relay."""
        name = self.relay.name
        with _PLAIN_LOCK:
            if name in _PLAIN_WARNED:
                return
            _PLAIN_WARNED.add(name)
        self._log.warning("smtp.unencrypted", relay=name, address=self.relay.address,
                          hint="the server did not offer STARTTLS, so mail to this relay goes "
                               "in clear (or someone on the path removed it); use "
                               "smtp+starttls:// or smtps:// to require TLS")

    # -- bookkeeping: one method, under the lock; it returns what to close -----------------
    def _update(self, *, arrive: _Waiter | None = None, leave: _Waiter | None = None,
                back: Connection | None = None, drop: Connection | None = None,
                opened: Connection | None = None, open_failed: bool = False,
                stale_retry: bool = False, close: bool = False,
                token: str | None = None) -> _ToClose:
        """Note what happened, then serve the waiters: the only place pool state changes.

        *arrive*/*leave*: a checkout joins the line (at its head when back after a failed
        NOOP) or gives up (a no-op if served meanwhile); *back*: a connection is checked
        in; *drop*: one failed its NOOP; *opened*/*open_failed*: a slot's connection is
        open (in the window slot *token*), or not; *close*: a new generation, idle ones
        retired. Returns what was taken out of the pool (and their slots), for the caller
        to close and give back once the lock is released.
        """
        out = _ToClose(give_back=self._give_back)
        with self._lock:
            now = self._clock()
            if arrive is not None:
                (self._waiters.appendleft if arrive.again else self._waiters.append)(arrive)
            if leave is not None and leave in self._waiters:
                self._waiters.remove(leave)
            if back is not None:
                self._active.discard(back)
                back.in_use = False
                if self._born.get(back) == self._generation and not back.is_retired(now):
                    self._idle.append(back)
                else:
                    self._retire(back, out.quit)
            if drop is not None:
                self._active.discard(drop)
                self._stale += 1
                self._retire(drop, out.drop)
            if opened is not None:
                self._opening -= 1
                self._opened += 1
                self._unencrypted += not opened.encrypted and self.relay.tls == "may"
                self._tls_fallbacks += opened.tls_fallback
                opened.in_use = True
                self._active.add(opened)
                self._born[opened] = self._generation
                if token is not None:
                    self._tokens[opened] = token
            if open_failed:
                self._opening -= 1
            self._stale += stale_retry
            if close:
                self._generation += 1
                while self._idle:
                    self._retire(self._idle.pop(), out.quit)
            self._serve(now, out)
            if arrive is not None and not arrive.served:
                arrive.ready = threading.Event()  # it waits; _serve sets this when its turn comes
            out.tokens, self._freed = self._freed, []
        return out

    def _serve(self, now: float, out: _ToClose) -> None:
        """Retire expired idle connections, then hand what is free to the waiters in
        arrival order: the most recently used idle connection, else a slot to open one."""
        for conn in [c for c in self._idle if c.is_retired(now)]:
            self._idle.remove(conn)
            self._retire(conn, out.quit)
        limit = self.relay.max_connections
        while self._waiters:
            waiter = self._waiters[0]
            if not waiter.fresh:
                waiter.conn = self._reuse(out)
            if waiter.conn is None:
                if waiter.fresh and self._idle and self._size() >= limit:
                    self._retire(self._idle.pop(0), out.quit)  # the oldest makes room
                if self._size() >= limit:
                    return  # everyone behind waits too: first come, first served
                self._opening += 1
                waiter.slot = True
            self._waiters.popleft()
            waiter.served = True
            if waiter.ready is not None:
                waiter.ready.set()

    def _reuse(self, out: _ToClose) -> Connection | None:
        """The most recently used idle connection; those the server spoke on are dropped."""
        while self._idle:
            conn = self._idle.pop()
            if conn.server_spoke():
                self._stale += 1
                self._retire(conn, out.drop)
                continue
            conn.in_use = True
            self._active.add(conn)
            self._reused += 1
            return conn
        return None

    def _size(self) -> int:  # connections open or being opened
        return len(self._active) + self._opening + len(self._idle)

    def _retire(self, conn: Connection, into: list[Connection]) -> None:
        self._born.pop(conn, None)
        token = self._tokens.pop(conn, None)
        if token is not None:
            self._freed.append(token)
        self._closed += 1
        into.append(conn)


def _not_attempted(relay: Relay, cause: BaseException | None) -> NotAttempted:
    exc = NotAttempted(f"not attempted: the connection to relay {relay.name!r} failed ({cause})")
    exc.__cause__ = cause
    return annotate(exc, Stage.MAIL, relay.name)


class PoolManager:
    """One :class:`Pool` per relay key, bounded LRU.

    The key (:class:`~mailworker.relay.RelayKey`) holds everything that makes a connection
    different: the relay's name, host, port, TLS, verification, CA, user, a fingerprint of
    the credentials, EHLO name, ``allow_plain_auth``, pipelining. So a relay that verifies
    certificates never gets a connection opened for one that does not, and a connection
    authenticated with one password never carries mail for another.
    """

    def __init__(self, max_pools: int = 32, *, logger: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pools = max_pools
        self._logger, self._clock = logger, clock
        self._lock = threading.Lock()
        self._pools: OrderedDict[RelayKey, Pool] = OrderedDict()
        self._slots: Slots | None = None

    def use_slots(self, slots: Slots | None) -> None:
        """Open connections only in *slots* (every pool, now and later); None: freely."""
        with self._lock:
            self._slots = slots
            for pool in self._pools.values():
                pool.slots = slots

    def reap(self) -> None:
        """:meth:`Pool.reap` on every pool."""
        with self._lock:
            all_pools = list(self._pools.values())
        for pool in all_pools:
            pool.reap()

    def get(self, relay: Relay) -> Pool:
        """The pool for *relay*.

        A relay whose key changed (a rotated password, a new CA) gets a new pool and the
        old pool of that name is closed. Options outside the key (timeouts, pool sizes)
        apply to the pool's new connections.
        """
        key = relay.key
        evicted: list[Pool] = []
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                for old_key in [k for k in self._pools if k.name == relay.name]:
                    evicted.append(self._pools.pop(old_key))
                pool = self._pools[key] = Pool(relay, logger=self._logger, clock=self._clock,
                                               slots=self._slots)
                while len(self._pools) > self.max_pools:
                    evicted.append(self._pools.popitem(last=False)[1])
            else:
                self._pools.move_to_end(key)
                if pool.relay != relay:
                    pool.relay = relay
        for old in evicted:
            old.close()
        return pool

    def close_all(self) -> None:
        with self._lock:
            all_pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in all_pools:
            pool.close()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        for pool in list(self._pools.values()):
            pool.reset_after_fork()

    def __repr__(self) -> str:
        names = ", ".join(f"{p.relay.name!r}: {p!r}" for p in list(self._pools.values()))
        return f"<PoolManager [{len(self._pools)} pools] {{{names}}}>"


pools = PoolManager()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=pools.reset_after_fork)
    os.register_at_fork(after_in_child=_PLAIN_WARNED.clear)
