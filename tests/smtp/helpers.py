"""Helpers shared by the SMTP tests (plain functions; the fixtures are in conftest)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

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


def run_threads(count: int, work: Callable[[int], None], timeout: float = 30) -> None:
    """Run ``work(t)`` in *count* threads at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def verbs(server: SMTPTestServer) -> list[str]:
    """The command verbs the server received, in order (``DATA`` content is not a verb)."""
    return [line.split(" ", 1)[0].split(":", 1)[0].upper() for _, line in server.commands]


class ScriptedServer:
    """A tiny real SMTP peer that answers from a script, for replies no sane server sends.

    ``replies`` maps a command verb to the raw bytes to answer it with (default: a plain
    250); ``after_ehlo`` is written unasked once EHLO was answered. Runs one connection on
    a thread; ``received`` lists the command lines it read.
    """

    def __init__(self, replies: dict[str, bytes] | None = None, after_ehlo: bytes = b"") -> None:
        import socket
        import threading

        self.replies = replies or {}
        self.after_ehlo = after_ehlo
        self.received: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # The client hanging up on us is what some tests are about.
        with contextlib.suppress(OSError):
            self._converse()

    def _converse(self) -> None:
        conn, _ = self._listener.accept()
        with conn, conn.makefile("rb") as reader:
            conn.sendall(b"220 scripted ESMTP\r\n")
            in_data = False
            for raw in reader:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if in_data:
                    in_data = line != "."
                    if in_data:
                        continue
                    verb = "."
                else:
                    self.received.append(line)
                    verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                default = {"EHLO": b"250-scripted\r\n250 PIPELINING\r\n", "DATA": b"354 go\r\n",
                           "QUIT": b"221 bye\r\n"}.get(verb, b"250 2.0.0 ok\r\n")
                conn.sendall(self.replies.get(verb, default))
                if verb == "EHLO" and self.after_ehlo:
                    conn.sendall(self.after_ehlo)
                answer = self.replies.get(verb, default)
                in_data = in_data or (verb == "DATA" and answer.startswith(b"354"))
                if verb == "QUIT":
                    return

    def relay(self, **options: Any) -> Relay:
        defaults: dict[str, Any] = {"timeout": 5, "connect_timeout": 5, "deadline": 10}
        query = "&".join(f"{k}={v}" for k, v in {**defaults, **options}.items())
        return parse_relay("scripted", f"smtp://127.0.0.1:{self.port}?{query}")

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)
