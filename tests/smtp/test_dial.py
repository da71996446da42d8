"""The TCP connect, DNS lookup included, is bounded by connect_timeout (review F18)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from mailworker.smtp import dial as dial_mod
from mailworker.smtp.dial import dial, local_name


def test_a_lookup_that_never_answers_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    stuck = threading.Event()

    def hanging(*args: object, **kw: object) -> list[object]:
        stuck.wait(30)  # the resolver's own retries, a black-holed nameserver
        return []

    monkeypatch.setattr(dial_mod.socket, "getaddrinfo", hanging)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"looking up relay\.example took longer"):
        dial("relay.example", 25, 0.3)
    assert time.monotonic() - started < 2
    stuck.set()


def test_every_address_shares_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name with several black-holed addresses: the whole connect takes one timeout,
    # not one per address.
    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.255.255.1", 25))] * 5
    monkeypatch.setattr(dial_mod.socket, "getaddrinfo", lambda *a, **k: addresses)
    tried: list[float] = []

    class SlowSocket:
        def __init__(self, *args: object) -> None:
            self.timeout = 0.0

        def settimeout(self, t: float) -> None:
            self.timeout = t

        def connect(self, address: object) -> None:
            tried.append(self.timeout)
            time.sleep(self.timeout)
            raise TimeoutError("timed out")

        def close(self) -> None:
            pass

    monkeypatch.setattr(dial_mod.socket, "socket", SlowSocket)
    started = time.monotonic()
    with pytest.raises(OSError):
        dial("relay.example", 25, 0.4)
    assert time.monotonic() - started < 1.0
    assert sum(tried) <= 0.45


def test_dial_connects_to_a_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        sock = dial("127.0.0.1", server.getsockname()[1], 2)
        sock.close()
        sock = dial("localhost", server.getsockname()[1], 2)
        sock.close()


def test_local_name_falls_back_when_the_lookup_is_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dial_mod.socket, "getfqdn", lambda: time.sleep(5) or "x")
    started = time.monotonic()
    assert local_name(0.2) == socket.gethostname()
    assert time.monotonic() - started < 1
