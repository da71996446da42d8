"""The socket under every SMTP command: bounded reads, bounded writes, a reply log hook.

:class:`ReplyWire` is mixed into ``smtplib.SMTP``. smtplib's own commands (EHLO,
STARTTLS, AUTH, NOOP, RSET, QUIT) reach it through ``putcmd()``/``getreply()``, the
pipelined transactions through :meth:`ReplyWire.write`/:meth:`ReplyWire.read_reply`.

Why wall-clock bounds rather than socket timeouts: a socket timeout limits one
``recv()``, so a server that trickles a reply a byte at a time, or never ends a
multi-line reply, holds the thread forever. Here every reply has a wall-clock limit:
``timeout`` from when we start waiting, and the earlier ``deadline`` when one is set
(session set-up, a transaction). Before each ``recv()`` the socket timeout is lowered to
the time left, so no read can outlast the limit. Writes are bounded the same way, except
that ``timeout`` counts from the last progress (a large body on a slow link that keeps
taking bytes is not a timeout; one that stops reading is), and the deadline bounds the
whole write.

Why size limits: a reply line is at most :data:`MAX_LINE` bytes and a reply at most
:data:`MAX_LINES` lines (RFC 5321 asks for 512-byte lines; Postfix accepts 2,048), so a
reply can never need more than about 200 KiB. Breaking either is a
:class:`~mailworker.smtp.errors.ProtocolError`; like a malformed line it closes the
connection, since the replies that follow would be out of step.
"""

from __future__ import annotations

import base64
import hmac
import select
import smtplib
import ssl
from collections.abc import Callable
from typing import Any

from mailworker.logging import redact_command
from mailworker.smtp.errors import ProtocolError, ReplyTimeout
from mailworker.smtp.replylog import ReplyLog

__all__ = ["MAX_LINE", "MAX_LINES", "ReplyWire"]

MAX_LINE = 2048
"""Longest reply line accepted, in bytes (without the line end)."""
MAX_LINES = 100
"""Most lines in one (multi-line) reply."""
_RECV = 65536
_TLS_PIECE = 256 * 1024  # bytes per send() on a TLS socket (see ReplyWire.write)
_MAX_CHALLENGES = 5  # AUTH 334 round trips, as smtplib allows


class ReplyWire:
    """Mixed into ``smtplib.SMTP``: our reply reader, bounded I/O and a logging hook.

    Replies are read from a buffer of our own rather than ``sock.makefile()``: that lets
    the pool see unread bytes without a round trip and lets STARTTLS refuse plaintext
    that arrived with its 220. While ``login()`` runs, commands are logged redacted.
    ``deadline`` (absolute, on ``clock``) and ``deadline_label`` (for the error text) are
    set by the connection for session set-up and by the pipelined session per transaction.
    """

    sock: Any
    command_encoding: str
    log: ReplyLog
    clock: Callable[[], float]
    deadline: float | None = None
    deadline_label = "deadline"
    timeout: float
    docmd: Callable[..., tuple[int, bytes]]
    _timeout_now: float = 0.0
    sent = 0
    """Bytes of the last :meth:`write` that may have left (all of them unless it failed; on
    TLS, also the piece whose send() failed): bytes past this never left, so the server
    cannot have them."""
    _rbuf = b""
    _rpos = 0
    _last_cmd = "<greeting>"
    _sent_at = 0.0
    _secret = False
    _auth_challenge_count = 0

    # -- smtplib's hooks ----------------------------------------------------------------
    def putcmd(self, cmd: str, args: str = "") -> None:
        s = f"{cmd} {args}" if args else cmd
        if "\r" in s or "\n" in s:
            raise ValueError("SMTP command contains CR or LF")
        verb = cmd.upper()
        if self._secret:  # inside login(): the AUTH argument and any continuation are secret
            self._last_cmd = redact_command(s) if verb == "AUTH" else "AUTH ***"
            # A server may echo what it got ("535 5.7.8 bad credentials <payload>").
            self.log.hide(*(s.split()[2:] if verb == "AUTH" else [s]))
        else:
            self._last_cmd = f"{verb} {args}" if args else verb
        self.write(f"{s}\r\n".encode(self.command_encoding))

    def getreply(self) -> tuple[int, bytes]:
        code, text = self.read_reply()  # bytes: smtplib's contract
        if self.log.enabled:
            self.log.reply(self._last_cmd, code, text.decode("utf-8", "replace"), self._sent_at,
                           self.clock())
        return code, text

    def auth(self, mechanism: str, authobject: Callable[..., str | None], *,
             initial_response_ok: bool = True) -> tuple[int, bytes]:
        """smtplib's ``auth()`` with the payload encoded as UTF-8, not ASCII.

        RFC 4616 (PLAIN) and common LOGIN servers take UTF-8; smtplib's ASCII encoding
        fails on a non-ASCII password with an error that quotes one of its characters.
        """
        mechanism = mechanism.upper()
        if mechanism == "CRAM-MD5":  # smtplib's encodes the password as ASCII too
            authobject = self._cram_md5
        first = authobject() if initial_response_ok else None
        # smtplib's auth_login() tells the user name from the password by this count.
        self._auth_challenge_count = 0 if first is None else 1
        if first is not None:
            code, resp = self.docmd("AUTH", f"{mechanism} {_b64(first)}")
        else:
            code, resp = self.docmd("AUTH", mechanism)
        while code == 334:
            self._auth_challenge_count += 1
            if self._auth_challenge_count > _MAX_CHALLENGES:
                raise smtplib.SMTPAuthenticationError(
                    code, b"the server kept sending AUTH challenges; giving up")
            answer = authobject(base64.decodebytes(resp))
            code, resp = self.docmd(_b64(answer or ""))
        if code in (235, 503):
            return code, resp
        raise smtplib.SMTPAuthenticationError(code, resp)

    def _cram_md5(self, challenge: bytes | None = None) -> str | None:
        if challenge is None:
            return None
        user, password = getattr(self, "user", ""), getattr(self, "password", "")
        digest = hmac.HMAC(password.encode("utf-8"), challenge, "md5").hexdigest()
        return f"{user} {digest}"

    # -- bounded I/O --------------------------------------------------------------------
    def _limit(self, now: float) -> float:
        """When the current wait must end: ``timeout`` from now, or the deadline if sooner."""
        limit = now + self.timeout
        deadline = self.deadline
        return deadline if deadline is not None and deadline < limit else limit

    def _bound(self, limit: float) -> str:
        """The name of the bound that *limit* came from, for an error message."""
        return self.deadline_label if limit == self.deadline else f"timeout={self.timeout:g}s"

    def _lower_timeout(self, wait: float, force: bool = False) -> None:
        if force or wait < self._timeout_now:
            self.sock.settimeout(wait)
            self._timeout_now = wait

    def write(self, data: bytes, *, keep_open: bool = False, what: str | None = None) -> None:
        """Send *data* within the same bound as a reply; close the connection if not.

        *keep_open*: after a failed or timed-out send leave the socket open, so that
        replies the server sent before it went away (or stopped reading) can still be read
        (BDAT pipelining; the caller closes it). *what* names the data in an error
        (default: the last command).
        """
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        self._sent_at = now = self.clock()
        limit = self._limit(now)
        view = memoryview(data)
        self.sent = 0
        # TLS: a send() that fails may already have pushed whole records of its buffer
        # (OpenSSL reports all or nothing), so its bytes count as sent, and pieces are
        # kept small so that this says little.
        piece = _TLS_PIECE if isinstance(self.sock, ssl.SSLSocket) else 0
        at_risk = 0
        try:
            while view:
                wait = limit - self.clock()
                if wait <= 0:
                    raise TimeoutError
                self._lower_timeout(wait)
                part = view[:piece] if piece else view
                at_risk = len(part) if piece else 0
                sent = self.sock.send(part)
                at_risk = 0
                view = view[sent:]
                self.sent += sent
                if view and sent:  # `timeout` bounds a stall; the deadline bounds the whole
                    limit = self._limit(self.clock())
        except TimeoutError as err:
            self.sent += at_risk
            if not keep_open:
                self.close()
            raise ReplyTimeout(f"could not write {what or self._last_cmd} within "
                               f"{self._bound(limit)}; the server stopped reading") from err
        except OSError as err:
            self.sent += at_risk
            if not keep_open:
                self.close()
            raise smtplib.SMTPServerDisconnected(f"write failed: {err}") from err

    def read_reply(self, command: str | None = None) -> tuple[int, bytes]:
        """One (possibly multi-line) reply to *command* (default: the last smtplib command).

        A malformed or oversized reply, or one not complete within the bound, closes the
        connection.
        """
        if command is not None:
            self._last_cmd = command
        limit = 0.0  # set at the first wait: a pipelined reply is often already buffered
        buf, pos = self._rbuf, self._rpos
        lines: list[bytes] = []
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_LINE + 1:
                    self._protocol_error(f"a reply line longer than {MAX_LINE} bytes")
                limit = limit or self._limit(self.clock())
                buf, pos = buf[pos:] + self._recv(limit), 0
                continue
            if end - pos > MAX_LINE + 1:  # +1: the CR
                self._protocol_error(f"a reply line longer than {MAX_LINE} bytes")
            line, pos = buf[pos:end], end + 1
            self._rbuf, self._rpos = buf, pos
            code, sep = line[:3], line[3:4]
            if not code.isdigit() or sep not in (b" ", b"-", b"\r", b""):
                self._protocol_error(f"malformed reply {line[:80]!r}")
            lines.append(line[4:].strip(b" \t\r"))
            if sep != b"-":
                text = lines[0] if len(lines) == 1 else b"\n".join(lines)
                return int(code), text
            if len(lines) >= MAX_LINES:
                self._protocol_error(f"a reply of more than {MAX_LINES} lines")

    def _recv(self, limit: float) -> bytes:
        timed_out: TimeoutError | None = None
        while True:
            sock = self.sock
            if sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            wait = limit - self.clock()
            if wait <= 0:
                self.close()
                raise ReplyTimeout(
                    f"no complete reply to {self._last_cmd} within {self._bound(limit)}"
                ) from timed_out
            self._lower_timeout(wait, force=timed_out is not None)
            try:
                data: bytes = sock.recv(_RECV)
            except TimeoutError as err:
                timed_out = err  # the loop decides whether the bound has passed
                continue
            except OSError as err:
                self.close()
                raise smtplib.SMTPServerDisconnected(f"connection lost: {err}") from err
            if not data:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"connection closed by the server while waiting for the reply to "
                    f"{self._last_cmd}")
            return data

    def _protocol_error(self, what: str) -> None:
        self.close()
        raise ProtocolError(f"{what} to {self._last_cmd}: replies out of step, "
                            "connection closed")

    # -- what the pool and the session ask ------------------------------------------------
    def buffered(self) -> bool:
        """Unread reply bytes already in our buffer (the server said something extra)."""
        return self._rpos < len(self._rbuf)

    def peer_spoke(self) -> bool:
        """True when the server sent anything or hung up while we expected silence."""
        return self.wait_readable(0.0)

    def wait_readable(self, seconds: float) -> bool:
        """True when reply bytes are here or arrive within *seconds*; nothing is read, and
        the connection stays open either way (unlike a read that times out)."""
        sock = self.sock
        if sock is None or self.buffered():
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(max(0, int(seconds * 1000))))
        except (OSError, ValueError):
            return True

    def set_deadline(self, deadline: float | None, label: str = "deadline") -> None:
        """Bound every wait until *deadline* (absolute, on ``clock``); None lifts it."""
        self.deadline, self.deadline_label = deadline, label

    def end_transaction(self) -> None:
        """Drop the deadline; give the socket the full per-reply timeout back."""
        self.deadline = None
        if self._timeout_now != self.timeout and self.sock is not None:
            self.sock.settimeout(self.timeout)
            self._timeout_now = self.timeout

    def close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super().close()  # type: ignore[misc]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
