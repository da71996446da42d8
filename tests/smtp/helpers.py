"""Helpers shared by the SMTP tests (plain functions; the fixtures are in conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from mailworker.relay import Relay, parse_relay
from mailworker.smtp import Envelope
from mailworker.testing import SMTPTestServer


def relay_for(server: SMTPTestServer, name: str = "test", **options: Any) -> Relay:
    """A relay for *server*; short timeouts so a failing test fails fast."""
    defaults: dict[str, Any] = {"timeout": 5, "connect_timeout": 5, "deadline": 10}
    return parse_relay(name, server.dsn(**{**defaults, **options}))


def envelope(n: int = 0, recipients: tuple[str, ...] = ("rcpt@example.test",),
             body: bytes = b"Hello.\r\n", sender: str = "sender@example.test") -> Envelope:
    """An envelope whose Message-ID header is ``<m{n}@example.test>``."""
    data = (f"From: {sender}\r\nTo: {', '.join(recipients)}\r\nSubject: test {n}\r\n"
            f"Message-ID: <m{n}@example.test>\r\n\r\n").encode() + body
    return Envelope(sender, recipients, data, message_id=f"m{n}")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll *condition* until it holds; fail the test at the deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)


def verbs(server: SMTPTestServer) -> list[str]:
    """The command verbs the server received, in order (``DATA`` content is not a verb)."""
    return [line.split(" ", 1)[0].split(":", 1)[0].upper() for _, line in server.commands]
