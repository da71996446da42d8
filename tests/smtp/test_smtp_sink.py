"""The same client against a real MTA implementation: Postfix's ``smtp-sink``.

smtp-sink is Postfix's own SMTP test server (package ``postfix``; CI installs it). It
answers like Postfix does, PIPELINING included, and throws the mail away, so these tests
assert on our replies and the pool's counts rather than on stored messages.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from mailworker.relay import Relay
from mailworker.smtp import Connection, Envelope, Pool, SendResult, Stage, failure_of
from mailworker.testing import free_port

from .helpers import run_threads

SMTP_SINK = shutil.which("smtp-sink") or next(
    (p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink") if os.path.exists(p)),
    None)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(SMTP_SINK is None,
                       reason="Postfix's smtp-sink is not installed (apt-get install postfix)"),
]


@pytest.fixture(scope="module")
def sink() -> Iterator[Callable[..., int]]:
    """Start smtp-sink with extra flags; returns its port. All are stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> int:
        assert SMTP_SINK is not None
        port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        proc = subprocess.Popen([SMTP_SINK, *user, *flags, f"127.0.0.1:{port}", "128"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"smtp-sink did not start: {err}")
                time.sleep(0.01)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


def relay(port: int, **options: object) -> Relay:
    return Relay(name="sink", host="127.0.0.1", port=port, timeout=10, connect_timeout=5,
                 **options)  # type: ignore[arg-type]


def message(i: int, rcpts: int = 1, size: int = 200) -> Envelope:
    body = (b"x" * 76 + b"\r\n") * (size // 78 + 1)
    data = f"From: a@example.test\r\nSubject: {i}\r\nMessage-ID: <{i}@t>\r\n\r\n".encode() + body
    return Envelope("a@example.test", tuple(f"r{n}@example.test" for n in range(rcpts)), data,
                    message_id=str(i))


def test_single_send(sink: Callable[..., int]) -> None:
    conn = Connection(relay(sink()))
    conn.open()
    assert conn.supports_pipelining and not conn.encrypted
    result = conn.send(message(1))
    assert [(r.code, r.enhanced_code, r.stage) for r in result.recipients] == [
        (250, "2.0.0", Stage.AFTER_DOT)]
    conn.close()


def test_send_many_batch_of_200_on_one_connection(sink: Callable[..., int]) -> None:
    conn = Connection(relay(sink(), max_messages=1000))
    conn.open()
    results = conn.send_many([message(i) for i in range(200)])
    assert all(isinstance(r, SendResult) and r.recipients[0].code == 250 for r in results)
    assert conn.messages_sent == 200 and not conn.is_closed
    conn.close()


def test_five_recipients_and_a_100_kb_message(sink: Callable[..., int]) -> None:
    conn = Connection(relay(sink()))
    conn.open()
    result = conn.send(message(2, rcpts=5, size=100_000))
    assert len(result.accepted) == 5 and {r.code for r in result.recipients} == {250}
    result = conn.send(message(3, rcpts=5))
    assert len(result.accepted) == 5
    conn.close()


def test_without_pipelining(sink: Callable[..., int]) -> None:
    conn = Connection(relay(sink("-p")))
    conn.open()
    assert not conn.supports_pipelining
    results = conn.send_many([message(i, rcpts=3) for i in range(20)])
    assert all(isinstance(r, SendResult) and len(r.accepted) == 3 for r in results)
    conn.close()


def test_hard_rejected_recipients(sink: Callable[..., int]) -> None:
    conn = Connection(relay(sink("-f", "RCPT")))
    conn.open()
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        conn.send(message(4, rcpts=2))
    assert failure_of(info.value).stage is Stage.RCPT
    assert {code for code, _ in info.value.recipients.values()} == {500}
    assert not conn.is_closed  # still in step: RSET owed, then the next message
    conn.close()


def test_pool_reuse_across_threads(sink: Callable[..., int]) -> None:
    pool = Pool(relay(sink(), max_connections=3, max_messages=1000))

    def work(t: int) -> None:
        for i in range(25):
            assert pool.send(message(t * 100 + i)).accepted

    run_threads(6, work)
    stats = pool.stats()
    assert stats.opened <= 3 and stats.reused == 150 - stats.opened
    assert stats.active == 0 and stats.idle == stats.opened
    pool.close()
    assert pool.stats().closed == stats.opened
