"""Per-process pools of SMTP connections: one :class:`Pool` per relay, a :class:`PoolManager`.

The shape follows httpcore: each connection answers a few questions (``is_retired``,
``server_spoke``, ``idle_for``), and the bookkeeping happens in small methods that run
under one lock and *return* the connections to close; the caller closes them after
releasing the lock, because QUIT can block for seconds.

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
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_none

from mailworker.relay import Relay, RelayKey
from mailworker.smtp.connection import Connection
from mailworker.smtp.errors import (
    BEFORE_MAIL,
    NotAttempted,
    Stage,
    annotate,
    failure_of,
)
from mailworker.smtp.pipeline import Envelope, Gate, SendResult

__all__ = ["Pool", "PoolManager", "PoolStats", "PoolTimeout", "pools"]

Entry = SendResult | BaseException


class PoolTimeout(TimeoutError):  # noqa: N818 - reads as what it is, like socket.timeout
    """No connection to the relay became free within ``relay.connect_timeout``."""


@dataclass(frozen=True)
class PoolStats:
    """Live counts: connections in use and idle now; totals since the pool was made."""

    active: int
    idle: int
    opened: int
    reused: int
    discarded_stale: int
    closed: int
    unencrypted: int = 0  # opened in clear under tls=may (no STARTTLS, or it failed)
    tls_fallbacks: int = 0  # tls=may: STARTTLS failed, so the connection was reopened in clear


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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.relay = relay
        self._logger, self._clock = logger, clock
        self._log = logger if logger is not None else structlog.get_logger("mailworker.smtp")
        self._init_state()

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[Connection] = []  # LIFO: the end is the most recently used
        self._active: set[Connection] = set()
        self._opening = 0
        self._generation = 0  # close() and fork bump it; older connections are not reused
        self._born: dict[Connection, int] = {}
        self._pid = os.getpid()
        self._opened = self._reused = self._stale = self._closed = self._unencrypted = 0
        self._tls_fallbacks = 0

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
        with self._cond:
            return PoolStats(len(self._active), len(self._idle), self._opened, self._reused,
                             self._stale, self._closed, self._unencrypted, self._tls_fallbacks)

    def close(self) -> None:
        """QUIT the idle connections now; active ones are closed when they come back."""
        with self._cond:
            self._generation += 1
            idle, self._idle = self._idle, []
            self._closed += len(idle)
        for conn in idle:
            conn.close()

    def reset_after_fork(self) -> None:
        """In a forked child: forget inherited connections without QUIT (their sockets
        belong to the parent) and make new locks (the parent's may be held forever)."""
        inherited = [*self._idle, *self._active]
        self._init_state()
        for conn in inherited:
            conn.abandon()

    def __repr__(self) -> str:
        s = self.stats()
        return f"<Pool relay={self.relay.name!r} [{s.active} active, {s.idle} idle]>"

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
            self._release(conn)
        if reused and entries and _is_stale(entries[0]):
            with self._cond:
                self._stale += 1
            self._log.info("smtp.stale_retry", relay=self.relay.name, conn_id=conn.conn_id,
                           error=type(entries[0]).__name__)
            raise _Stale(entries)
        return entries, broken

    def _checkout(self, fresh: bool = False) -> tuple[Connection, bool]:
        if os.getpid() != self._pid:
            self.reset_after_fork()
        deadline = self._clock() + self.relay.connect_timeout
        while True:
            with self._cond:
                while True:
                    conn, reserved, stale, retired = self._assign(self._clock(), fresh)
                    if conn is not None or reserved or stale or retired:
                        break
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise PoolTimeout(
                            f"no connection to relay {self.relay.name!r} became free within "
                            f"{self.relay.connect_timeout:g}s ({self.relay.max_connections} "
                            "in use); raise max_connections or add workers")
                    self._cond.wait(remaining)
            for old in stale:
                old.close(quit=False)
            for old in retired:
                old.close()
            if conn is not None:
                if conn.idle_for(self._clock()) < self.relay.noop_after or self._noop_ok(conn):
                    return conn, True
                continue
            if reserved:
                return self._open(), False

    def _noop_ok(self, conn: Connection) -> bool:
        try:
            conn.noop()
            return True
        except (OSError, smtplib.SMTPException):
            conn.close(quit=False)
            with self._cond:
                self._stale += 1
                self._closed += 1
                self._active.discard(conn)
                self._forget(conn)
                self._cond.notify()
            return False

    def _open(self) -> Connection:
        conn = Connection(self.relay, logger=self._logger, clock=self._clock)
        try:
            conn.open()
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            raise
        conn.in_use = True
        plain = not conn.encrypted and self.relay.tls == "may"
        with self._cond:
            self._opening -= 1
            self._opened += 1
            self._unencrypted += plain
            self._tls_fallbacks += conn.tls_fallback
            self._active.add(conn)
            self._born[conn] = self._generation
        if plain:
            self._warn_plain()
        return conn

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

    # -- bookkeeping under the lock: return what to close, close it outside ------------------
    def _assign(self, now: float, fresh: bool
                ) -> tuple[Connection | None, bool, list[Connection], list[Connection]]:
        """Pick an idle connection, or reserve a slot to open one.

        Returns (connection, slot reserved, stale to drop, retired to QUIT).
        """
        stale: list[Connection] = []
        retired = self._sweep(now)
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.server_spoke():
                stale.append(conn)
                self._stale += 1
                self._forget(conn)
                self._closed += 1
                continue
            conn.in_use = True
            self._active.add(conn)
            self._reused += 1
            return conn, False, stale, retired
        if fresh and self._idle and len(self._active) + self._opening + len(self._idle) \
                >= self.relay.max_connections:
            oldest = self._idle.pop(0)
            self._forget(oldest)
            self._closed += 1
            retired.append(oldest)
        if len(self._active) + self._opening + len(self._idle) < self.relay.max_connections:
            self._opening += 1
            return None, True, stale, retired
        return None, False, stale, retired

    def _sweep(self, now: float) -> list[Connection]:
        retired = [c for c in self._idle if c.is_retired(now)]
        for conn in retired:
            self._idle.remove(conn)
            self._forget(conn)
        self._closed += len(retired)
        return retired

    def _release(self, conn: Connection) -> None:
        with self._cond:
            self._active.discard(conn)
            conn.in_use = False
            now = self._clock()
            keep = self._born.get(conn) == self._generation and not conn.is_retired(now)
            if keep:
                self._idle.append(conn)
            else:
                self._forget(conn)
                self._closed += 1
            retired = self._sweep(now)
            self._cond.notify()
        if not keep:
            retired.append(conn)
        for old in retired:
            old.close()

    def _forget(self, conn: Connection) -> None:
        self._born.pop(conn, None)


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
                pool = self._pools[key] = Pool(relay, logger=self._logger, clock=self._clock)
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
