"""Pool and PoolManager against the test server: reuse, expiry, staleness, threads, fork."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailworker.smtp import (
    NotAttempted,
    Pool,
    PoolManager,
    PoolTimeout,
    SendResult,
    Stage,
    failure_of,
)
from mailworker.testing import Fault, SMTPTestServer, wait_until

from .helpers import envelope, relay_for, run_threads, verbs

MakeServer = Callable[..., SMTPTestServer]


def test_connections_are_reused(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    for i in range(5):
        pool.send(envelope(i))
    assert server.connections_opened == 1
    stats = pool.stats()
    assert (stats.opened, stats.reused, stats.active, stats.idle) == (1, 4, 0, 1)
    assert repr(pool) == "<Pool relay='test' [0 active, 1 idle, 0 opening, 0 waiting]>"
    pool.close()
    assert verbs(server)[-1] == "QUIT"
    assert pool.stats().idle == 0 and pool.stats().closed == 1


def test_idle_disconnect_is_noticed_at_checkout_without_a_round_trip(
        server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(1))
    server.add_fault(Fault.idle_disconnect(after=0.05, times=1))
    wait_until(lambda: server.active_connections == 0)
    commands_before = len(server.commands)

    pool.send(envelope(2))  # no error reaches the caller

    assert server.connections_opened == 2
    assert pool.stats().discarded_stale == 1
    # The stale connection got no NOOP, RSET or QUIT: the new one starts with EHLO.
    assert verbs(server)[commands_before] == "EHLO"
    assert len(server.wait_for_messages(2)) == 2
    pool.close()


def test_stale_connection_is_replaced_and_the_message_sent_once(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(1))
    # The server drops us just as we reuse the connection: 421 to MAIL, then close.
    server.add_fault(Fault.disconnect("MAIL", code=421, times=1))
    result = pool.send(envelope(2))

    assert result.accepted
    assert server.connections_opened == 2
    assert pool.stats().discarded_stale == 1
    assert server.deliveries()[("<m2@example.test>", "rcpt@example.test")] == 1


def test_stale_connection_hang_up_without_reply_is_retried(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(1))
    server.add_fault(Fault.disconnect("MAIL", code=None, times=1))
    assert pool.send(envelope(2)).accepted
    assert server.connections_opened == 2


def test_a_fresh_connection_refused_at_mail_is_not_retried(server: SMTPTestServer) -> None:
    server.add_fault(Fault.disconnect("MAIL", code=421, times=1))
    pool = Pool(relay_for(server))
    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        pool.send(envelope(1))
    assert info.value.smtp_code == 421 and failure_of(info.value).stage is Stage.MAIL
    assert server.connections_opened == 1 and pool.stats().active == 0
    assert pool.stats().idle == 0  # a connection that got 421 is never pooled


def test_uncertain_delivery_is_never_retried_by_the_pool(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(1))
    server.add_fault(Fault.drop_after_dot(times=1))
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        pool.send(envelope(2))
    assert failure_of(info.value).stage is Stage.AFTER_DOT
    assert server.connections_opened == 1  # no second attempt
    assert pool.stats().idle == 0


class Clock:
    """Real monotonic time plus an offset the test can advance: nothing really waits."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def test_long_idle_connection_gets_a_noop_first(server: SMTPTestServer) -> None:
    clock = Clock()
    pool = Pool(relay_for(server, noop_after=10), clock=clock)
    pool.send(envelope(1))
    conn_commands = len(server.commands)
    clock.advance(11)
    pool.send(envelope(2))
    assert verbs(server)[conn_commands] == "NOOP"
    assert server.connections_opened == 1


def test_failed_noop_discards_the_connection(server: SMTPTestServer) -> None:
    clock = Clock()
    pool = Pool(relay_for(server, noop_after=10), clock=clock)
    pool.send(envelope(1))
    server.add_fault(Fault.reply("NOOP", 421, "4.3.2 going away", times=1))
    clock.advance(11)
    pool.send(envelope(2))
    assert server.connections_opened == 2 and pool.stats().discarded_stale == 1


def test_max_messages_retires_connections(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server, max_messages=3))
    results = pool.send_many([envelope(i) for i in range(7)])
    assert all(isinstance(r, SendResult) for r in results)
    assert server.connections_opened == 3
    assert verbs(server).count("QUIT") == 2  # retired ones say goodbye
    assert pool.stats().closed == 2 and pool.stats().idle == 1


def test_idle_timeout_and_max_age_retire_connections(server: SMTPTestServer) -> None:
    clock = Clock()
    pool = Pool(relay_for(server, idle_timeout=60, max_age=300), clock=clock)
    pool.send(envelope(1))
    clock.advance(61)
    pool.send(envelope(2))  # the idle one is retired (with QUIT), a new one opened
    assert server.connections_opened == 2 and pool.stats().closed == 1
    assert verbs(server).count("QUIT") == 1
    for _ in range(6):  # kept busy, it still retires at max_age (6 x 59 s > 300 s)
        clock.advance(59)
        pool.send(envelope(3))
    assert server.connections_opened == 3 and pool.stats().closed == 2


def test_eight_threads_share_two_connections(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server, max_connections=2))

    def work(t: int) -> None:
        for i in range(10):
            pool.send(envelope(t * 100 + i))

    run_threads(8, work)
    assert len(server.wait_for_messages(80)) == 80
    assert max(server.deliveries().values()) == 1
    assert server.max_concurrent_connections <= 2
    assert pool.stats().opened <= 2 and pool.stats().active == 0


def hold_the_connection(pool: Pool) -> tuple[threading.Event, threading.Thread]:
    """Send m0 in a thread whose gate holds its connection until the event is set."""
    release = threading.Event()
    holder = threading.Thread(target=pool.send_many, args=([envelope(0)],),
                              kwargs={"gate": lambda i: release.wait(10)})
    holder.start()
    wait_until(lambda: pool.stats().active == 1)
    return release, holder


def test_waiters_are_served_in_arrival_order_and_counted_in_repr(
        server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server, max_connections=1))
    release, holder = hold_the_connection(pool)  # while five senders line up behind it
    senders = []
    for n in range(1, 6):
        senders.append(threading.Thread(target=pool.send, args=(envelope(n),)))
        senders[-1].start()
        wait_until(lambda n=n: pool.stats().waiting == n)  # type: ignore[misc]
    assert repr(pool) == "<Pool relay='test' [1 active, 0 idle, 0 opening, 5 waiting]>"

    release.set()
    for t in [holder, *senders]:
        t.join(10)
    order = [m.data.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0] for m in server.messages]
    assert order == [b"m0", b"m1", b"m2", b"m3", b"m4", b"m5"]  # one connection, handed on
    assert server.connections_opened == 1 and pool.stats().waiting == 0


def test_more_threads_than_connections_are_served_fairly(make_server: MakeServer) -> None:
    """8 threads x 10 sends over 2 connections: each freed connection goes to the thread
    that has waited longest, so no checkout waits much longer than the others (before the
    FIFO hand-off, the thread that gave a connection back usually took it again: the
    longest wait was 13-21 times the mean here, up to half a second)."""
    server = make_server(latency=0.005)
    pool = Pool(relay_for(server, max_connections=2))
    checkout = pool._checkout
    waits: list[float] = []
    lock = threading.Lock()

    def timed(fresh: bool = False) -> Any:
        started = time.perf_counter()
        try:
            return checkout(fresh)
        finally:
            with lock:
                waits.append(time.perf_counter() - started)

    pool._checkout = timed  # type: ignore[method-assign]

    def work(t: int) -> None:
        for i in range(10):
            pool.send(envelope(t * 100 + i))  # a PoolTimeout would fail the test

    run_threads(8, work)
    assert len(server.wait_for_messages(80)) == 80 and max(server.deliveries().values()) == 1
    mean = sum(waits) / len(waits)
    assert len(waits) == 80 and max(waits) <= 4 * mean, (max(waits), mean)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_a_waiter_interrupted_by_a_time_limit_leaves_the_line(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server, max_connections=1))
    release, holder = hold_the_connection(pool)

    def time_limit(signum: int, frame: object) -> None:  # as Celery's soft time limit does
        raise TimeoutError("soft time limit")

    previous = signal.signal(signal.SIGALRM, time_limit)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError, match="soft time limit"):
            pool.send(envelope(1))  # waits in line for the held connection
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert pool.stats().waiting == 0
    release.set()
    holder.join(10)
    assert pool.send(envelope(2)).accepted  # nothing leaked: the one connection is free
    assert server.connections_opened == 1 and pool.stats().active == 0


def test_checkout_times_out_when_every_connection_is_busy(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server, max_connections=1, connect_timeout=0.2))
    server.add_fault(Fault.delay("DOT", 1.0, times=1))
    busy = threading.Thread(target=pool.send, args=(envelope(1),))
    busy.start()
    wait_until(lambda: pool.stats().active == 1)
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="max_connections"):
        pool.send(envelope(2))
    assert pool.stats().waiting == 0  # it left the line
    # It waited for connect_timeout; not for the busy connection (that comes back after
    # 1 s, and would have been handed over rather than time out).
    assert time.monotonic() - started > 0.15
    busy.join(5)
    assert pool.send(envelope(3)).accepted  # free again


def test_connect_failure_raises_and_frees_the_slot(server: SMTPTestServer) -> None:
    server.add_fault(Fault.greeting(code=554, text="5.7.1 go away", times=1))
    pool = Pool(relay_for(server, max_connections=1))
    with pytest.raises(smtplib.SMTPConnectError):
        pool.send(envelope(1))
    assert pool.send(envelope(2)).accepted


def test_send_many_after_a_failed_connection_marks_the_rest_not_attempted(
        server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server, max_messages=2))
    server.add_fault(Fault.drop_after_dot(match="r1@"))
    results = pool.send_many([envelope(i, (f"r{i}@example.test",)) for i in range(5)])
    assert isinstance(results[0], SendResult)
    assert isinstance(results[1], smtplib.SMTPServerDisconnected)
    assert all(isinstance(r, NotAttempted) for r in results[2:])
    assert server.connections_opened == 1


def test_reset_after_fork_drops_connections_without_quit(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(1))
    pool.reset_after_fork()
    wait_until(lambda: server.active_connections == 0)
    assert "QUIT" not in verbs(server)
    assert pool.stats().idle == 0
    pool.send(envelope(2))
    assert server.connections_opened == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_touch_the_parents_connection(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(1))
    pid = os.fork()
    if pid == 0:  # child: the pool notices the new pid and opens its own connection
        code = 1
        try:
            code = 0 if pool.send(envelope(2)).accepted else 2
        finally:
            os._exit(code)
    statuses: list[int] = []

    def child_exited() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        statuses.extend([status] if done else [])
        return bool(done)

    try:
        wait_until(child_exited, 20, message="the forked child to exit")
    except TimeoutError:
        os.kill(pid, 9)
        raise
    assert os.waitstatus_to_exitcode(statuses[0]) == 0
    pool.send(envelope(3))  # the parent's pooled connection still works
    assert server.connections_opened == 2
    assert pool.stats().reused == 1
    assert "QUIT" not in verbs(server)


def test_pool_manager_keys_bounds_and_repr(make_server: MakeServer) -> None:
    servers = [make_server() for _ in range(3)]
    manager = PoolManager(max_pools=2)
    relays = [relay_for(s, name=f"r{i}", user="bob", password="hunter2-secret",
                        allow_plain_auth=True) for i, s in enumerate(servers)]
    plain = [relay_for(s, name=f"p{i}") for i, s in enumerate(servers)]
    first = manager.get(plain[0])
    assert manager.get(plain[0]) is first
    first.send(envelope(1))
    manager.get(plain[1])
    manager.get(plain[2])  # evicts the least recently used: the first, closed with QUIT
    assert verbs(servers[0])[-1] == "QUIT"
    assert manager.get(relays[1]) is not manager.get(plain[1])  # the user is part of the key
    text = repr(manager) + repr(manager.get(relays[2]))
    assert "hunter2" not in text and "pools" in text
    manager.close_all()
    assert repr(manager).startswith("<PoolManager [0 pools]")


def test_pool_close_closes_active_connections_when_they_return(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    server.add_fault(Fault.delay("DOT", 0.3, times=1))
    worker = threading.Thread(target=pool.send, args=(envelope(1),))
    worker.start()
    wait_until(lambda: pool.stats().active == 1)
    pool.close()
    worker.join(5)
    assert pool.stats().idle == 0 and verbs(server)[-1] == "QUIT"
    assert len(server.wait_for_messages(1)) == 1
