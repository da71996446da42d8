"""Redis failures reach the caller as QueueUnavailable / QueueFull, within a bound, with
nothing half-written (review finding S2-08, issue 10's "Redis down").

Real sockets and a real redis-server: a server that accepts and never answers, a closed
port, and a private Redis with a 2 MB maxmemory and noeviction.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import mailworker
from mailworker import runtime
from mailworker.config import Settings
from mailworker.relay import parse_relay
from mailworker.testing.polling import free_port, wait_until

RELAYS = {"default": parse_relay("default", "smtp://127.0.0.1:2525")}
GOOD: dict[str, Any] = {"to": "a@example.com", "subject": "s", "text": "t"}


@pytest.fixture(autouse=True)
def no_broker() -> Iterator[None]:
    yield
    runtime.reset_runtime()


def use(url: str, **kw: Any) -> None:
    runtime.configure(Settings(redis_url=url, relays=RELAYS, default_sender="app@example.com",
                               **kw), publisher=lambda ids, queue: None)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    srv.close()


def test_hung_redis_fails_within_the_socket_timeout(silent_server: int) -> None:
    use(f"redis://:s3cret-pw@127.0.0.1:{silent_server}/0", redis_socket_timeout=0.5,
        redis_connect_timeout=0.5)
    for call in (lambda: mailworker.send(**GOOD), lambda: mailworker.status("0" * 32)):
        started = time.monotonic()
        with pytest.raises(mailworker.QueueUnavailable) as info:
            call()
        elapsed = time.monotonic() - started
        # One socket timeout (timeouts are not retried); generous for a loaded machine.
        assert elapsed < 5, elapsed
        assert isinstance(info.value, OSError)
        assert isinstance(info.value.__cause__, redis.TimeoutError)
        assert "s3cret-pw" not in str(info.value) and "127.0.0.1" in str(info.value)
    # A read that times out changed nothing: no "may have been queued" (review F5).
    assert not info.value.maybe_queued and "nothing was changed" in str(info.value)


def test_closed_port_is_queue_unavailable() -> None:
    port = free_port()
    use(f"redis://127.0.0.1:{port}/0", redis_retries=1)
    with pytest.raises(mailworker.QueueUnavailable, match="nothing was") as info:
        mailworker.send_many([GOOD, GOOD])
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert not isinstance(info.value, mailworker.QueueFull)
    with pytest.raises(OSError):  # what Django-era code catches
        mailworker.status("0" * 32)


@pytest.fixture(scope="module")
def small_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (run scripts/system-deps)")
    port = free_port()
    work = tmp_path_factory.mktemp("small-redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--maxmemory", "2mb",
         "--maxmemory-policy", "noeviction", "--save", "", "--appendonly", "no",
         "--dir", str(Path(work))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(up, 10, message="redis-server to start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_s2_08_full_redis_raises_queue_full_and_keeps_nothing_of_the_batch(
        small_redis: str) -> None:
    use(small_redis, max_message_size=1_000_000)
    client = runtime.get_runtime().redis
    client.flushall()
    batch = [{**GOOD, "subject": f"m{i}", "text": "x" * 20_000} for i in range(8)]
    queued: list[str] = []
    with pytest.raises(mailworker.QueueFull) as info:
        for _ in range(100):  # 160 KB a batch: Redis is full after a few
            queued += mailworker.send_many(batch)
    assert isinstance(info.value, mailworker.QueueUnavailable) and isinstance(info.value, OSError)
    assert "out of memory" in str(info.value)
    assert len(queued) >= 8, "the first batch must fit, or the test proves nothing"
    stored = {k.decode().rsplit(":", 1)[1] for k in client.scan_iter("mw:m:*")}
    # Everything stored belongs to batches that were accepted: none of the refused one.
    assert stored == set(queued)
    inflight = {m.decode() for m in client.zrange("mw:inflight", 0, -1)}
    assert inflight == set(queued)


class LateReplies:
    """A TCP proxy to Redis that forwards requests at once but holds every reply that
    follows a script call (EVAL/EVALSHA) until :meth:`release`: the script runs, its
    answer is late, as when Redis stalls on fsync or the network drops after the write."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.released = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._serve, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, scripted: threading.Event,
              replies: bool) -> None:
        try:
            while data := src.recv(65536):
                if not replies and b"EVAL" in data.upper():
                    scripted.set()
                if replies and scripted.is_set():
                    self.released.wait()
                dst.sendall(data)
        except OSError:
            pass

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            scripted = threading.Event()
            for src, dst, replies in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, scripted, replies),
                                 daemon=True).start()

    def close(self) -> None:
        self.released.set()
        for sock in self.sockets:
            sock.close()


def test_review_f5_lost_answer_is_queue_uncertain_and_a_keyed_retry_sends_once(
        redis_url: str) -> None:
    direct = redis.Redis.from_url(redis_url)
    host, port = direct.connection_pool.connection_kwargs["host"], direct.connection_pool.\
        connection_kwargs["port"]
    prefix = f"f5{time.monotonic_ns()}"
    use(redis_url, key_prefix=prefix)
    mailworker.send(**GOOD)  # loads the scripts into Redis, as in any running deployment
    direct.delete(*direct.keys(f"{prefix}:*"))
    proxy = LateReplies((host, port))
    try:
        use(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=prefix, redis_socket_timeout=0.5,
            redis_retries=0)
        with pytest.raises(mailworker.QueueUncertain) as info:
            mailworker.send(**GOOD, idempotency_key="order-42")
        assert isinstance(info.value, mailworker.QueueUnavailable) and info.value.maybe_queued
        assert isinstance(info.value.__cause__, redis.TimeoutError)
        text = str(info.value)
        assert "may have been queued" in text and "idempotency_key" in text
        assert "nothing was changed" not in text
        # It was queued: the sweeper would deliver it.
        wait_until(lambda: direct.zcard(f"{prefix}:inflight") == 1, 10,
                   message="the script to have run")
    finally:
        proxy.close()
    # The retry the error recommends, with the same key, queues nothing more.
    use(redis_url, key_prefix=prefix)
    first = direct.zrange(f"{prefix}:inflight", 0, -1)[0].decode()
    assert mailworker.send(**GOOD, idempotency_key="order-42") == first
    assert direct.zcard(f"{prefix}:inflight") == 1
    assert len(list(direct.scan_iter(f"{prefix}:m:*"))) == 1


def test_review_f5_refusals_are_certain() -> None:
    use(f"redis://127.0.0.1:{free_port()}/0", redis_retries=0)
    with pytest.raises(mailworker.QueueUnavailable) as info:
        mailworker.send(**GOOD)
    assert not isinstance(info.value, mailworker.QueueUncertain)
    assert not info.value.maybe_queued and "nothing was changed" in str(info.value)
