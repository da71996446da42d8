"""The reply path: every SMTP reply is read here, and logged as one ``smtp.reply`` event.

Reading and logging live together so that no reply can escape the log: smtplib's own
commands (EHLO, STARTTLS, AUTH, NOOP, QUIT) reach us through :class:`ReplyWire`'s
``getreply()``, the pipelined transactions through its :meth:`ReplyWire.read_reply`.

A busy worker reads thousands of replies a minute, so this sits on the hot path. Each
connection binds its logger once (relay name and connection id), decides once whether
INFO is enabled at all, and builds each event dict only when it will be emitted.

Events go through ``structlog.get_logger("mailworker.smtp")`` so whatever the caller bound
with ``structlog.contextvars`` (message id, attempt, task id) is merged into every event by
the ``merge_contextvars`` processor of :func:`mailworker.logging.configure_logging`.

AUTH arguments never reach this module unredacted: the connection passes AUTH commands
already redacted, and :meth:`ReplyLog.reply` redacts any command starting with ``AUTH``
again (defence in depth; the check costs one slice per reply).
"""

from __future__ import annotations

import logging
import select
import smtplib
import ssl
from collections.abc import Callable
from typing import Any

import structlog

from mailworker.logging import redact_command
from mailworker.smtp.errors import enhanced_code_of

__all__ = ["LOGGER_NAME", "ReplyLog", "ReplyWire"]

LOGGER_NAME = "mailworker.smtp"
_MAXLINE = 8192
_RECV = 65536


def _info_enabled(logger: Any) -> bool:
    """Whether INFO events would be emitted; filtering loggers answer without a call chain."""
    check = getattr(logger, "is_enabled_for", None)
    if check is None:
        return True
    try:
        return bool(check(logging.INFO))
    except Exception:  # a custom wrapper with another signature: log rather than guess
        return True


class ReplyLog:
    """Per-connection emitter of ``smtp.reply``, ``smtp.connect`` and ``smtp.close`` events."""

    __slots__ = ("_log", "enabled")

    def __init__(self, relay: str, conn_id: str, logger: Any | None = None) -> None:
        base = logger if logger is not None else structlog.get_logger(LOGGER_NAME)
        self._log = base.bind(relay=relay, conn_id=conn_id)
        self.enabled = _info_enabled(self._log)

    def reply(
        self,
        command: str,
        code: int,
        text: bytes,
        started: float,
        now: float,
        *,
        message_id: str | None = None,
        recipient: str | None = None,
    ) -> None:
        """Log one reply; *started* is when the command group it answers was written."""
        if not self.enabled:
            return
        if command[:4].upper() == "AUTH":
            command = redact_command(command)
        decoded = text.decode("utf-8", "replace")
        event: dict[str, Any] = {
            "command": command,
            "code": code,
            "enhanced_code": enhanced_code_of(decoded),
            "text": decoded,
            "latency_ms": round((now - started) * 1000.0, 3),
        }
        if message_id is not None:
            event["message_id"] = message_id
        if recipient is not None:
            event["recipient"] = recipient
        self._log.info("smtp.reply", **event)

    def connect(self, **facts: Any) -> None:
        """``smtp.connect``: the session is ready (after greeting, EHLO, TLS and AUTH)."""
        if self.enabled:
            self._log.info("smtp.connect", **facts)

    def close(self, **facts: Any) -> None:
        """``smtp.close``: the socket is gone, with why and how much it carried."""
        if self.enabled:
            self._log.info("smtp.close", **facts)

    def failure(self, event: str, exc: BaseException, **facts: Any) -> None:
        """A connection-level failure, logged at WARNING with the stage it happened at."""
        self._log.warning(
            event,
            error=type(exc).__name__,
            detail=str(exc)[:300],
            stage=str(getattr(exc, "stage", "") or "") or None,
            **facts,
        )


class ReplyWire:
    """Mixed into ``smtplib.SMTP``: our reply reader and a logging hook under smtplib.

    ``getreply()`` (which smtplib's EHLO, STARTTLS, ``login()``, NOOP and QUIT call) and
    the pipelined session both read through :meth:`read_reply`, from a buffer of our own
    rather than ``sock.makefile()``. That lets the pool see unread bytes without a round
    trip, lets STARTTLS refuse plaintext that arrived with its 220, and checks a
    wall-clock deadline between reads. While ``login()`` runs, commands are logged
    redacted.
    """

    sock: Any
    command_encoding: str
    log: ReplyLog
    clock: Callable[[], float]
    deadline: float | None = None
    timeout: float
    _timeout_now: float = 0.0
    _rbuf = b""
    _rpos = 0
    _last_cmd = "<greeting>"
    _sent_at = 0.0
    _secret = False

    def putcmd(self, cmd: str, args: str = "") -> None:
        s = f"{cmd} {args}" if args else cmd
        if "\r" in s or "\n" in s:
            raise ValueError("SMTP command contains CR or LF")
        verb = cmd.upper()
        if self._secret:  # inside login(): the AUTH argument and any continuation are secret
            self._last_cmd = redact_command(s) if verb == "AUTH" else "AUTH ***"
        else:
            self._last_cmd = f"{verb} {args}" if args else verb
        try:
            self.write(f"{s}\r\n".encode(self.command_encoding))
        except OSError as err:
            self.close()
            raise smtplib.SMTPServerDisconnected(f"write failed: {err}") from err

    def getreply(self) -> tuple[int, bytes]:
        code, text = self.read_reply()
        if self.log.enabled:
            self.log.reply(self._last_cmd, code, text, self._sent_at, self.clock())
        return code, text

    def write(self, data: bytes) -> None:
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        self._sent_at = self.clock()
        self.sock.sendall(data)

    def read_reply(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply; a malformed line closes the connection."""
        buf, pos = self._rbuf, self._rpos
        lines: list[bytes] = []
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > _MAXLINE:
                    self._desync(b"over-long reply line")
                buf, pos = buf[pos:] + self._recv(), 0
                continue
            line, pos = buf[pos:end], end + 1
            self._rbuf, self._rpos = buf, pos
            code, sep = line[:3], line[3:4]
            if not code.isdigit() or sep not in (b" ", b"-", b"\r", b""):
                self._desync(line)
            lines.append(line[4:].strip(b" \t\r"))
            if sep != b"-":
                text = lines[0] if len(lines) == 1 else b"\n".join(lines)
                return int(code), text

    def _recv(self) -> bytes:
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        wait = self.timeout
        if self.deadline is not None:
            remaining = self.deadline - self.clock()
            if remaining <= 0:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"transaction deadline exceeded waiting for the reply to {self._last_cmd}")
            wait = min(wait, remaining)
        if wait != self._timeout_now:
            sock.settimeout(wait)
            self._timeout_now = wait
        try:
            data: bytes = sock.recv(_RECV)
        except TimeoutError as err:
            self.close()
            what = "transaction deadline" if wait < self.timeout else f"timeout of {wait:g}s"
            raise smtplib.SMTPServerDisconnected(
                f"{what} exceeded waiting for a reply") from err
        except OSError as err:
            self.close()
            raise smtplib.SMTPServerDisconnected(f"connection lost: {err}") from err
        if not data:
            self.close()
            raise smtplib.SMTPServerDisconnected("connection closed by the server")
        return data

    def _desync(self, line: bytes) -> None:
        self.close()
        raise smtplib.SMTPServerDisconnected(
            f"malformed reply {line[:80]!r}: replies out of step, connection closed")

    def buffered(self) -> bool:
        """Unread reply bytes already in our buffer (the server said something extra)."""
        return self._rpos < len(self._rbuf)

    def peer_spoke(self) -> bool:
        """True when the server sent anything or hung up while we expected silence."""
        sock = self.sock
        if sock is None or self.buffered():
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def end_transaction(self) -> None:
        """Drop the deadline; give writes the full per-operation timeout back."""
        self.deadline = None
        if self._timeout_now != self.timeout and self.sock is not None:
            self.sock.settimeout(self.timeout)
            self._timeout_now = self.timeout

    def close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super().close()  # type: ignore[misc]
