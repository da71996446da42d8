"""The pool's Slots hook: a connection opens only in a slot the delivery layer grants, and
the slot goes back once that connection is closed (the fleet window, without Redis)."""

from __future__ import annotations

import threading

import pytest

from mailworker.relay import Relay
from mailworker.smtp import PoolManager
from mailworker.smtp.pool import NoSlot, Pool
from mailworker.testing import SMTPTestServer

from .helpers import envelope, relay_for


class Slots:
    """At most *size* slots; records what was taken and given back."""

    def __init__(self, size: int) -> None:
        self.size, self.n = size, 0
        self.held: set[str] = set()
        self.given_back: list[str] = []
        self.lock = threading.Lock()

    def take(self, relay: Relay) -> str | None:
        with self.lock:
            if len(self.held) >= self.size:
                return None
            self.n += 1
            token = f"slot{self.n}"
            self.held.add(token)
            return token

    def give_back(self, relay: Relay, token: str) -> None:
        with self.lock:
            self.held.discard(token)
            self.given_back.append(token)


def test_a_connection_keeps_its_slot_across_batches_until_it_closes(
        server: SMTPTestServer) -> None:
    slots = Slots(1)
    pool = Pool(relay_for(server), slots=slots)
    for i in range(3):
        assert not isinstance(pool.send_many([envelope(i)])[0], BaseException)
    assert slots.held == {"slot1"} and server.connections_opened == 1
    pool.close()
    assert slots.held == set() and slots.given_back == ["slot1"]


def test_no_slot_means_no_connection(server: SMTPTestServer) -> None:
    slots = Slots(0)
    pool = Pool(relay_for(server), slots=slots)
    with pytest.raises(NoSlot, match="fleet-wide window"):
        pool.send_many([envelope()])
    assert server.connections_opened == 0 and pool.stats().opening == 0


def test_a_failed_open_gives_its_slot_back(server: SMTPTestServer) -> None:
    slots = Slots(1)
    relay = relay_for(server)
    server.stop()
    pool = Pool(relay, slots=slots)
    with pytest.raises(OSError):
        pool.send_many([envelope()])
    assert slots.held == set() and slots.given_back == ["slot1"]


def test_reap_closes_idle_connections_and_gives_their_slots_back(
        server: SMTPTestServer) -> None:
    now = [0.0]
    slots = Slots(2)
    manager = PoolManager(clock=lambda: now[0])
    manager.use_slots(slots)
    pool = manager.get(relay_for(server, idle_timeout=5))
    pool.send_many([envelope()])
    assert slots.held == {"slot1"}
    now[0] = 6.0
    manager.reap()
    assert slots.held == set() and pool.stats().idle == 0
