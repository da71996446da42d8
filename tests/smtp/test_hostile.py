"""S2-02: a hostile or broken relay costs a thread a bounded time and bounded memory.

Each test drives the client against one misbehaviour of the test server (a reply that
never comes, trickles a byte at a time, never ends, or has one huge line) and checks
that the calling thread comes back within the configured bound, with the failure typed
and staged, and that memory stayed small. The calls run on a watchdog thread so that a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from mailworker.smtp import (
    Connection,
    DeliveryUncertain,
    NotAttempted,
    Pool,
    ProtocolError,
    ReplyTimeout,
    Stage,
)
from mailworker.smtp.errors import failure_of
from mailworker.smtp.wire import MAX_LINE, MAX_LINES
from mailworker.testing import Fault, SMTPTestServer

from .helpers import envelope, relay_for

MakeServer = Callable[..., SMTPTestServer]
# Short bounds so the suite stays fast; SLACK covers a loaded machine, not the bound.
BOUNDS: dict[str, Any] = {"timeout": 0.5, "connect_timeout": 1, "setup_timeout": 1.0,
                          "deadline": 1.5}
SLACK = 2.0


def bounded_call(fn: Callable[[], Any], bound: float) -> tuple[float, BaseException | None, int]:
    """Run *fn* on a watchdog thread; return (seconds taken, what it raised, peak bytes
    allocated by Python meanwhile). Fails if it has not returned within bound + SLACK."""
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as exc:  # handed to the test
            out.append(exc)

    tracemalloc.start()
    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound + SLACK)
    took = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not thread.is_alive(), f"the call still runs after {took:.1f}s (bound {bound}s)"
    return took, out[0], peak


def opened(server: SMTPTestServer, **options: Any) -> Connection:
    conn = Connection(relay_for(server, **{**BOUNDS, **options}))
    conn.open()
    return conn


SETUP_CASES = [
    ("greeting-hang", Fault.hang("GREETING"), ReplyTimeout, Stage.GREETING),
    ("greeting-trickle", Fault.trickle("GREETING", code=220), ReplyTimeout, Stage.GREETING),
    ("greeting-endless", Fault.endless("GREETING", code=220), ProtocolError, Stage.GREETING),
    ("ehlo-hang", Fault.hang("EHLO"), ReplyTimeout, Stage.EHLO),
    ("ehlo-trickle", Fault.trickle("EHLO"), ReplyTimeout, Stage.EHLO),
    ("ehlo-endless", Fault.endless("EHLO"), ProtocolError, Stage.EHLO),
    ("ehlo-overlong", Fault.overlong("EHLO"), ProtocolError, Stage.EHLO),
]


@pytest.mark.parametrize(("fault", "error", "stage"), [c[1:] for c in SETUP_CASES],
                         ids=[c[0] for c in SETUP_CASES])
def test_s2_02_session_setup_is_bounded(make_server: MakeServer, fault: Fault,
                                        error: type[Exception], stage: Stage) -> None:
    server = make_server()
    server.add_fault(fault)
    conn = Connection(relay_for(server, **BOUNDS))
    _, exc, peak = bounded_call(conn.open, BOUNDS["setup_timeout"])
    assert isinstance(exc, error), exc
    assert failure_of(exc).stage is stage
    assert conn.is_closed
    assert peak < 2_000_000, f"{peak} bytes allocated for one reply"


def test_s2_02_a_trickle_is_stopped_by_setup_timeout_not_by_each_read(
        make_server: MakeServer) -> None:
    # Each byte comes well within `timeout`; only the phase bound can end this.
    server = make_server()
    server.add_fault(Fault.trickle("EHLO", seconds=0.02))
    conn = Connection(relay_for(server, **{**BOUNDS, "timeout": 30}))
    took, exc, _ = bounded_call(conn.open, BOUNDS["setup_timeout"])
    assert isinstance(exc, ReplyTimeout) and "setup_timeout=1s" in str(exc)
    assert BOUNDS["setup_timeout"] - 0.1 <= took


def test_s2_02_starttls_and_auth_are_bounded(make_server: MakeServer) -> None:
    tls = make_server(tls="starttls")
    tls.add_fault(Fault.hang("STARTTLS"))
    _, exc, _ = bounded_call(Connection(relay_for(tls, **BOUNDS)).open, 1.0)
    assert isinstance(exc, ReplyTimeout) and failure_of(exc).stage is Stage.TLS

    for fault, error in ((Fault.hang("AUTH"), ReplyTimeout),
                         (Fault.endless("AUTH", code=334), ProtocolError)):
        server = make_server(auth={"u": "p"})
        server.add_fault(fault)
        relay = relay_for(server, user="u", password="p", allow_plain_auth=True, **BOUNDS)
        _, exc, _ = bounded_call(Connection(relay).open, 1.0)
        assert isinstance(exc, error) and failure_of(exc).stage is Stage.AUTH


def test_s2_02_a_tls_handshake_that_never_comes_is_bounded() -> None:
    # smtps:// to a peer that accepts TCP and then says nothing, not even a TLS byte.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        from mailworker.relay import parse_relay
        query = "&".join(f"{k}={v}" for k, v in BOUNDS.items())
        conn = Connection(parse_relay("mute", f"smtps://127.0.0.1:{port}?{query}"))
        _, exc, _ = bounded_call(conn.open, BOUNDS["setup_timeout"])
    assert isinstance(exc, ReplyTimeout) and failure_of(exc).stage is Stage.TLS


@pytest.mark.parametrize("fault", [Fault.hang("NOOP"), Fault.endless("NOOP"),
                                   Fault.trickle("NOOP")], ids=["hang", "endless", "trickle"])
def test_s2_02_noop_is_bounded(make_server: MakeServer, fault: Fault) -> None:
    server = make_server()
    conn = opened(server)
    server.add_fault(fault)
    _, exc, peak = bounded_call(conn.noop, BOUNDS["timeout"])
    assert isinstance(exc, ReplyTimeout | ProtocolError), exc
    assert conn.is_closed and peak < 2_000_000


@pytest.mark.parametrize("fault", [Fault.hang("QUIT"), Fault.endless("QUIT"),
                                   Fault.trickle("QUIT")], ids=["hang", "endless", "trickle"])
def test_s2_02_quit_is_bounded(make_server: MakeServer, fault: Fault) -> None:
    server = make_server()
    conn = opened(server, timeout=30)  # QUIT has its own short limit, not `timeout`
    server.add_fault(fault)
    _, exc, _ = bounded_call(conn.close, 2.0)
    assert exc is None and conn.is_closed


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_s2_02_transaction_replies_are_bounded(make_server: MakeServer,
                                               pipelining: bool) -> None:
    server = make_server(pipelining=pipelining)
    pool = Pool(relay_for(server, **BOUNDS))
    server.add_fault(Fault.endless("RCPT", times=1))
    entries: list[Any] = []
    _, exc, _ = bounded_call(lambda: entries.extend(pool.send_many([envelope(1), envelope(2)])),
                             BOUNDS["deadline"])
    assert exc is None  # send_many hands failures back as entries
    assert isinstance(entries[0], ProtocolError) and failure_of(entries[0]).stage is Stage.RCPT
    assert isinstance(entries[1], NotAttempted)
    server.add_fault(Fault.trickle("DOT", times=1))
    _, exc, _ = bounded_call(lambda: pool.send(envelope(3)), BOUNDS["deadline"])
    assert isinstance(exc, DeliveryUncertain) and isinstance(exc.__cause__, ReplyTimeout)
    pool.close()


def test_s2_02_reply_limits_are_the_documented_ones(make_server: MakeServer) -> None:
    assert (MAX_LINE, MAX_LINES) == (2048, 100)
    ok = make_server()
    ok.add_fault(Fault.overlong("NOOP", length=MAX_LINE - 4))  # "250 " + text = MAX_LINE
    conn = opened(ok)
    conn.noop()
    conn.close()
    long = make_server()
    long.add_fault(Fault.overlong("NOOP", length=MAX_LINE - 3))
    conn = opened(long)
    with pytest.raises(ProtocolError, match="longer than 2048 bytes"):
        conn.noop()
    assert conn.is_closed


def test_s2_17_pipelined_errors_name_the_command_waited_for(make_server: MakeServer) -> None:
    server = make_server()
    server.add_fault(Fault.trickle("MAIL", times=1))
    conn = opened(server, local_hostname="client.example")
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        conn.send(envelope(1))
    text = str(info.value)
    assert "MAIL FROM:<sender@example.test>" in text and "EHLO" not in text
    assert failure_of(info.value).stage is Stage.MAIL
