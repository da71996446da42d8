"""The gate: the caller may stop a batch right before any message's MAIL FROM.

The Deliverer uses it to stop at a lost lease, so what matters is exactly which messages
reached the server, and that the message before the refusal is still completed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailworker.smtp import Connection, NotAttempted, Pool, PoolManager, SendResult
from mailworker.testing import Fault, SMTPTestServer

from .helpers import envelope, relay_for

MakeServer = Callable[..., SMTPTestServer]


class Gate:
    """Says yes until index *stop*; records each call and how much the server had by then."""

    def __init__(self, server: SMTPTestServer, stop: int | None, *, error: bool = False) -> None:
        self.server, self.stop, self.error = server, stop, error
        self.calls: list[int] = []
        self.seen: list[int] = []  # messages the server had received at each call

    def __call__(self, i: int) -> bool:
        self.calls.append(i)
        self.seen.append(len(self.server.messages))
        if self.stop is not None and i >= self.stop:
            if self.error:
                raise ConnectionError("redis went away")
            return False
        return True


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_gate_refusing_at_2_of_5_sends_exactly_2(make_server: MakeServer, pipelining: bool) -> None:
    server = make_server(pipelining=pipelining)
    conn = Connection(relay_for(server))
    conn.open()
    assert conn.supports_pipelining is pipelining
    gate = Gate(server, stop=2)

    entries = conn.send_many([envelope(i) for i in range(5)], gate=gate)

    assert gate.calls == [0, 1, 2]
    assert all(isinstance(e, SendResult) and e.accepted for e in entries[:2])
    assert all(type(e) is NotAttempted for e in entries[2:])
    assert [m.message_id for m in server.messages] == ["<m0@example.test>", "<m1@example.test>"]
    # Pipelined, gate(i) runs before the write that carries message i-1's content and dot.
    assert gate.seen == ([0, 0, 1] if pipelining else [0, 1, 2])
    assert not conn.is_closed  # the connection is fine and can be used again
    assert isinstance(conn.send(envelope(9)), SendResult)
    conn.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_gate_that_raises_counts_as_a_refusal(make_server: MakeServer, pipelining: bool) -> None:
    server = make_server(pipelining=pipelining)
    pool = Pool(relay_for(server))
    gate = Gate(server, stop=1, error=True)

    entries = pool.send_many([envelope(i) for i in range(3)], gate=gate)

    assert isinstance(entries[0], SendResult)
    assert all(type(e) is NotAttempted for e in entries[1:])
    assert gate.calls == [0, 1]
    assert len(server.messages) == 1
    pool.close()


def test_gate_indexes_the_callers_list_across_connections(server: SMTPTestServer) -> None:
    # Two messages per connection: envelopes 2-3 and 4 go on new connections.
    pool = PoolManager().get(relay_for(server, max_messages=2))
    gate = Gate(server, stop=3)

    entries = pool.send_many([envelope(i) for i in range(5)], gate=gate)

    assert gate.calls == [0, 1, 2, 3]
    assert [isinstance(e, SendResult) for e in entries] == [True, True, True, False, False]
    assert all(type(e) is NotAttempted for e in entries[3:])
    assert len(server.messages) == 3
    pool.close()


def test_gate_is_asked_again_after_a_stale_connection(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    pool.send(envelope(0))
    server.add_fault(Fault.disconnect("MAIL", code=421, times=1))
    gate = Gate(server, stop=None)

    entries = pool.send_many([envelope(1), envelope(2)], gate=gate)

    assert all(isinstance(e, SendResult) for e in entries)
    assert gate.calls == [0, 0, 1]  # index 0 on the stale connection, then on the fresh one
    assert pool.stats().discarded_stale == 1
    pool.close()


def test_gate_refusing_the_first_message_sends_nothing(server: SMTPTestServer) -> None:
    pool = Pool(relay_for(server))
    entries = pool.send_many([envelope(0), envelope(1)], gate=lambda i: False)
    assert all(type(e) is NotAttempted for e in entries)
    assert pool.stats().discarded_stale == 0 and server.connections_opened == 1
    assert "MAIL" not in [c.split(":")[0] for _, c in server.commands]
    pool.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "sequential"])
def test_gate_is_asked_once_per_envelope_not_per_452_split(make_server: MakeServer,
                                                           pipelining: bool) -> None:
    # max_recipients=1: envelope 0's second recipient goes in a transaction of its own;
    # that envelope has started, so the gate is not asked again for it.
    server = make_server(max_recipients=1, pipelining=pipelining)
    pool = Pool(relay_for(server))
    gate = Gate(server, stop=1)
    entries = pool.send_many([envelope(0, ("a@example.test", "b@example.test")), envelope(1)],
                             gate=gate)
    assert gate.calls == [0, 1]
    first = entries[0]
    assert isinstance(first, SendResult) and len(first.accepted) == 2
    assert first.transactions == 2
    assert type(entries[1]) is NotAttempted
    pool.close()
