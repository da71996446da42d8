"""One SMTP connection on ``smtplib``: TLS, AUTH, pipelined sends, and the pool's questions.

The session set-up (EHLO, STARTTLS, ``login()``) is smtplib's own code. We subclass
``smtplib.SMTP`` / ``smtplib.SMTP_SSL`` only to put our reply reader and reply log under
it (:class:`~mailworker.smtp.replylog.ReplyWire`); the mail transactions themselves are
:mod:`mailworker.smtp.pipeline`'s, or :mod:`mailworker.smtp.chunking`'s (BDAT) when the
server offers PIPELINING and CHUNKING.

The TCP connect and the TLS handshake are done here rather than in ``smtplib.connect`` so
that a failure is annotated with the right stage (connect vs tls). TLS follows the
relay's level (:mod:`mailworker.smtp.tls`): only under ``tls=may`` (opportunistic, the
default of ``smtp://``) does a failed STARTTLS fall back to clear text, and then on a
new connection that never sends STARTTLS, with a warning; at every other level a TLS
failure closes the socket and nothing is sent. Before any byte of a message is sent,
:func:`prepare` checks it against what this server offers (SIZE, SMTPUTF8).

Every wait is bounded by the wall clock (see :mod:`mailworker.smtp.wire`): the TCP
connect by ``connect_timeout``; greeting, EHLO, STARTTLS with its handshake and AUTH
together by ``setup_timeout`` (twice over when ``tls=may`` falls back); each reply
also by ``timeout``; a transaction by ``deadline``; QUIT by a couple of seconds. A
relay that stalls or trickles costs a thread at most that long.
"""

from __future__ import annotations

import contextlib
import functools
import re
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mailworker.relay import Relay
from mailworker.smtp.chunking import ChunkingSession
from mailworker.smtp.dial import dial, local_name
from mailworker.smtp.errors import (
    CleartextAuthRefused,
    NotAttempted,
    ReplyTimeout,
    Stage,
    annotate,
)
from mailworker.smtp.pipeline import Envelope, Gate, Prepared, SendResult, Session
from mailworker.smtp.replylog import ReplyLog
from mailworker.smtp.tls import context_for, falls_back, unverified_auth, verifies
from mailworker.smtp.wire import ReplyWire

__all__ = ["Connection", "prepare"]

_EOL = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_LINE_DOT = re.compile(rb"\n\.")
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_ODD_LF = re.compile(rb"\n(?:\.|(?<!\r\n))")  # a bare LF, or one before a dot
_QUIT_TIMEOUT = 2.0


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    """smtplib would call ``socket.getfqdn()`` (a DNS lookup) for every connection; this
    looks it up once, bounded (see :func:`mailworker.smtp.dial.local_name`)."""
    return local_name()


def _no_delay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off: every write is a whole command group or transaction,
    so holding a write back until the previous one is acknowledged only adds latency (with
    the peer's delayed ACK, up to 40 ms). With BDAT's transactions in flight it halved the
    rate at 10 ms (bench_smtp.py)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def prepare(envelope: Envelope, capabilities: dict[str, str], *, chunking: bool = False
            ) -> Prepared:
    """Check SIZE and SMTPUTF8 against the server and build the wire bytes.

    Raises before anything is sent: ``SMTPDataError(552)`` when the server's advertised
    SIZE is too small, ``SMTPNotSupportedError`` when an address needs SMTPUTF8 and the
    server lacks it. Line endings become CRLF and leading dots are doubled, each by a
    single C-level pass (no per-line Python loop); the common already-CRLF case is only
    counted, not copied. With *chunking* (BDAT) the content is only CRLF-normalised: no
    dot-stuffing and no terminator, since BDAT frames it by its length; SIZE is then the
    exact octet count BDAT announces.
    """
    data = envelope.data
    # Two passes, each a regex with a literal prefix (C-speed scans for CR, then LF): a CR
    # without its LF, and an LF without its CR or followed by a dot (DATA only). Most
    # bodies have neither; counting b"\r\n" and `b"\n." in data` took twice as long.
    odd = (_BARE_LF if chunking else _ODD_LF).search(data)
    if _BARE_CR.search(data) or (odd is not None and _BARE_LF.search(data, odd.start())):
        data = _EOL.sub(b"\r\n", data)  # a CR that became CRLF may start a dot line
        stuff = not chunking and _LINE_DOT.search(data) is not None
    else:  # no bare LF anywhere: the first odd LF, if any, is one before a dot
        stuff = not chunking and odd is not None
    if data and data[-2:] != b"\r\n":
        data += b"\r\n"
    size = len(data)  # RFC 1870: CRLF line ends, before dot-stuffing
    params: list[str] = []
    if "size" in capabilities:
        params.append(f"SIZE={size}")
        limit = capabilities["size"].strip()
        if limit.isdigit() and 0 < int(limit) < size:
            raise smtplib.SMTPDataError(
                552, f"5.3.4 Message size exceeds server limit ({size} > {limit} bytes)".encode())
    utf8 = not (envelope.sender.isascii() and all(r.isascii() for r in envelope.recipients))
    if utf8 and "smtputf8" not in capabilities:
        raise smtplib.SMTPNotSupportedError(
            "an envelope address is not ASCII and the server does not offer SMTPUTF8")
    if (utf8 or not data.isascii()) and "8bitmime" in capabilities:
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    cmd = f"MAIL FROM:<{envelope.sender}>"
    if params:
        cmd = f"{cmd} {' '.join(params)}"
    if chunking:
        return Prepared(envelope.sender, cmd.encode() + b"\r\n", cmd, data)
    if stuff or data[:1] == b".":
        data = _LEADING_DOT.sub(b"..", data)
    return Prepared(envelope.sender, cmd.encode() + b"\r\n", cmd, data + b".\r\n")


class _Client(ReplyWire, smtplib.SMTP):
    """smtplib's client over our wire; for ``smtps://`` we wrap the socket ourselves."""


class Connection:
    """A reusable SMTP session to one relay; see the module docstring."""

    def __init__(self, relay: Relay, *, logger: Any = None, conn_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.relay = relay
        self.conn_id = conn_id or uuid.uuid4().hex[:12]
        self._clock = clock
        self._log = ReplyLog(relay.name, self.conn_id, logger)
        self._client: _Client | None = None
        self._session: Session | None = None
        self.encrypted = False
        #: The certificate was verified in the handshake (see :func:`~.tls.verifies`).
        self.verified = False
        #: STARTTLS failed under ``tls=may`` and this session is the clear-text retry.
        self.tls_fallback = False
        self.opened_at = clock()
        self.last_used_at = self.opened_at
        self.in_use = False  # set by the pool while checked out

    # -- session set-up -------------------------------------------------------------------
    def open(self) -> None:
        """Connect, read the greeting, EHLO, TLS per the relay's level, then AUTH.

        Under ``tls=may`` a failed STARTTLS is logged (warning ``smtp.tls_fallback``) and
        the session is opened again in clear text on a new connection."""
        if not self.is_closed:
            raise RuntimeError(f"{self!r} is already open")
        self.tls_fallback = False
        failed = self._open(starttls=self.relay.level != "none")
        if failed is not None:
            self._log.failure("smtp.tls_fallback", failed, address=self.relay.address,
                              hint="STARTTLS failed, so this connection sends in clear text "
                                   "(tls=may); tls=encrypt or tls=verify would refuse")
            self.tls_fallback = True
            self._open(starttls=False)

    def _open(self, *, starttls: bool) -> BaseException | None:
        """One session set-up; raises, or returns the STARTTLS failure to fall back from."""
        relay = self.relay
        name = relay.local_hostname or _fqdn()
        client = _Client(local_hostname=name)
        client.log, client.clock, client.timeout = self._log, self._clock, relay.timeout
        self._client = client
        stage = Stage.CONNECT
        try:
            self.opened_at = client._sent_at = self._clock()
            sock = dial(relay.host, relay.port, relay.connect_timeout)  # DNS included
            _no_delay(sock)
            client.sock, client._timeout_now = sock, relay.connect_timeout
            client.set_deadline(self._clock() + relay.setup_timeout,
                                f"setup_timeout={relay.setup_timeout:g}s")
            if relay.security == "tls":
                stage = Stage.TLS
                self._wrap(client)
            stage = Stage.GREETING
            code, msg = client.getreply()
            if code != 220:
                raise smtplib.SMTPConnectError(code, msg)
            stage = Stage.EHLO
            self._ehlo(client, name)
            if starttls and relay.security != "tls" and (
                    relay.level != "may" or client.has_extn("starttls")):
                stage = Stage.TLS
                self._starttls(client)
                stage = Stage.EHLO
                self._ehlo(client, name)
            if relay.username:
                stage = Stage.AUTH
                self._login(client)
            client.end_transaction()  # set-up done: lift its deadline
        except BaseException as exc:
            client.close()
            annotate(exc, stage, relay.name)
            if falls_back(relay, exc, stage):
                return exc
            self._log.failure("smtp.connect_failed", exc, address=relay.address)
            raise
        self.encrypted = isinstance(client.sock, ssl.SSLSocket)
        self.verified = self.encrypted and verifies(relay)
        self.last_used_at = self._clock()
        if self.supports_chunking:
            self._session = ChunkingSession(client, self._log, relay=relay.name,
                                            deadline=relay.deadline,
                                            window=relay.pipeline_window, clock=self._clock)
        else:
            self._session = Session(client, self._log, relay=relay.name,
                                    deadline=relay.deadline,
                                    pipelining=self.supports_pipelining, clock=self._clock)
        self._log.connect(address=relay.address, security=relay.security, tls=self.encrypted,
                          tls_level=relay.level, verified=self.verified,
                          pipelining=self.supports_pipelining, chunking=self.supports_chunking,
                          latency_ms=round((self.last_used_at - self.opened_at) * 1000, 3))
        return None

    def _wrap(self, client: _Client) -> None:
        """TLS handshake on the connected socket, bounded by what is left of set-up."""
        relay = self.relay
        ctx = context_for(relay)
        left = (client.deadline or 0.0) - self._clock()
        try:
            if left <= 0:
                raise TimeoutError
            client.sock.settimeout(left)  # a handshake's timeout bounds all of it
            client._timeout_now = left
            client.sock = ctx.wrap_socket(client.sock, server_hostname=relay.host)
        except TimeoutError as err:
            raise ReplyTimeout(f"TLS handshake not complete within "
                               f"setup_timeout={relay.setup_timeout:g}s") from err
        except ssl.SSLCertVerificationError as err:
            if relay.level == "verify":
                raise
            # Checked only because AUTH follows: refuse AUTH, do not fall back.
            raise annotate(unverified_auth(relay, err), Stage.AUTH, relay.name) from err

    def _ehlo(self, client: smtplib.SMTP, name: str) -> None:
        code, msg = client.ehlo(name)
        if 200 <= code < 300:
            return
        if code != 421:  # not ESMTP: fall back to HELO (no extensions, so no pipelining)
            code, msg = client.helo(name)
            if 200 <= code < 300:
                return
        raise smtplib.SMTPHeloError(code, msg)

    def _starttls(self, client: _Client) -> None:
        if not client.has_extn("starttls"):
            raise smtplib.SMTPNotSupportedError(
                f"relay {self.relay.name!r} requires STARTTLS (tls={self.relay.level}) but "
                f"{self.relay.address} does not offer it")
        code, msg = client.docmd("STARTTLS")
        if code != 220:
            raise smtplib.SMTPResponseException(code, msg)
        if client.buffered():  # bytes sent before the handshake must not be trusted
            raise smtplib.SMTPServerDisconnected("server sent data after 220 to STARTTLS")
        self._wrap(client)
        client.helo_resp = client.ehlo_resp = None
        client.esmtp_features, client.does_esmtp = {}, False

    def _login(self, client: _Client) -> None:
        relay = self.relay
        if not isinstance(client.sock, ssl.SSLSocket) and not relay.allow_plain_auth:
            raise CleartextAuthRefused(
                f"mailworker did not send the credentials for relay {relay.name!r}: the "
                f"connection to {relay.address} is not encrypted. Use smtps:// or "
                "smtp+starttls://, or set allow_plain_auth=true for a relay on localhost "
                "or a trusted network")
        client._secret = True
        client.log.hide(relay.password or "")  # never in a reply text, even echoed back
        try:
            client.login(relay.username or "", relay.password or "")
        except smtplib.SMTPResponseException as exc:
            # Its text goes into the record (Redis) and the delivery log: a server may
            # have echoed the payload or the password in it.
            said = exc.smtp_error
            text = client.log.scrub_auth_reply(
                said.decode("utf-8", "replace") if isinstance(said, bytes) else said)
            exc.smtp_error = text.encode()
            exc.args = (exc.smtp_code, exc.smtp_error)
            raise
        except UnicodeError:  # never chained or quoted: the text would show a character
            raise smtplib.SMTPException(
                f"relay {relay.name!r}: the user name or password is not valid UTF-8 text"
            ) from None
        finally:
            client._secret = False
            client.user = client.password = ""  # smtplib would keep them on the object

    # -- sending --------------------------------------------------------------------------
    def send(self, envelope: Envelope) -> SendResult:
        """Send one message; return per-recipient results or raise (see pipeline docs)."""
        entry = self.send_many((envelope,))[0]
        if isinstance(entry, BaseException):
            raise entry
        return entry

    def send_many(self, envelopes: Sequence[Envelope], *, gate: Gate | None = None
                  ) -> list[SendResult | BaseException]:
        """Send a batch, one round trip per message (DATA), or a window of messages per round
        trip (BDAT, when the server offers CHUNKING); never raises for SMTP failures.

        *gate*: see :meth:`Session.run` (asked before each envelope's MAIL FROM)."""
        session = self._session
        if session is None or self.is_closed:
            return [annotate(NotAttempted("the connection is not open"), Stage.CONNECT,
                             self.relay.name) for _ in envelopes]
        caps = self._client.esmtp_features if self._client is not None else {}
        chunking = isinstance(session, ChunkingSession)
        if isinstance(session, ChunkingSession):
            session.idle = self.idle_for(self._clock())  # a probe first after an idle spell
        prepared: list[Prepared | BaseException] = []
        for env in envelopes:
            try:
                prepared.append(prepare(env, caps, chunking=chunking))
            except (ValueError, smtplib.SMTPException) as exc:
                prepared.append(annotate(exc, Stage.MAIL, self.relay.name))
        try:
            return session.run(envelopes, prepared, gate=gate)
        finally:
            self.last_used_at = self._clock()
            if self.is_closed:
                self._log.close(reason="failure", messages_sent=self.messages_sent)

    def reset(self) -> None:
        """RSET: abandon any transaction in progress."""
        self._simple("rset", Stage.MAIL)
        if self._session is not None:
            self._session.needs_rset = False

    def noop(self) -> None:
        """NOOP: prove the connection still answers (the pool's check after a long idle)."""
        self._simple("noop", Stage.MAIL)

    def _simple(self, verb: str, stage: Stage) -> None:
        client = self._client
        try:
            if client is None or client.sock is None:
                raise smtplib.SMTPServerDisconnected("not connected")
            code, msg = getattr(client, verb)()
            if code != 250:
                client.close()
                raise smtplib.SMTPResponseException(code, msg)
        except (OSError, smtplib.SMTPException) as exc:
            if client is not None:
                client.close()
            annotate(exc, stage, self.relay.name)
            raise
        finally:
            self.last_used_at = self._clock()

    def close(self, quit: bool = True) -> None:
        """QUIT (best effort, short timeout), then close; ``quit=False`` after fork."""
        client, self._client = self._client, None
        if client is None:
            return
        if client.sock is not None:
            if quit:
                try:
                    limit = min(_QUIT_TIMEOUT, self.relay.timeout)
                    client.set_deadline(self._clock() + limit, f"the QUIT limit of {limit:g}s")
                    client.quit()
                except (OSError, smtplib.SMTPException):
                    pass
            client.close()
            self._log.close(reason="quit" if quit else "dropped", messages_sent=self.messages_sent)

    def abandon(self) -> None:
        """Forget a connection inherited across ``fork()``: close this process's copy of
        the socket only. No QUIT (the parent still owns the session) and no log event (a
        logging lock may be held by a thread that did not survive the fork)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- what the pool asks -------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self._client is None or self._client.sock is None

    @property
    def is_idle(self) -> bool:
        return not self.in_use and not self.is_closed

    def has_expired(self, now: float) -> bool:
        """Retire it: see :meth:`is_retired`, or the server spoke while it sat idle."""
        return self.is_retired(now) or (not self.in_use and self.server_spoke())

    def is_retired(self, now: float) -> bool:
        """Closed, ``max_messages`` sent, older than ``max_age``, or idle past ``idle_timeout``
        (clock checks only: cheap enough to sweep every idle connection)."""
        if self.is_closed:
            return True
        relay = self.relay
        if self.messages_sent >= relay.max_messages or now - self.opened_at >= relay.max_age:
            return True
        return not self.in_use and now - self.last_used_at >= relay.idle_timeout

    def server_spoke(self) -> bool:
        """The idle socket is readable: an unsolicited 421, or a hang-up. No round trip;
        reusing it would read that stale reply as the answer to our MAIL."""
        client = self._client
        return client is None or client.sock is None or client.peer_spoke()

    def idle_for(self, now: float) -> float:
        return now - self.last_used_at

    @property
    def messages_sent(self) -> int:
        return self._session.dots if self._session is not None else 0

    @property
    def capabilities(self) -> dict[str, str]:
        return dict(self._client.esmtp_features) if self._client is not None else {}

    @property
    def supports_pipelining(self) -> bool:
        features = self._client.esmtp_features if self._client is not None else {}
        return self.relay.pipelining and "pipelining" in features

    @property
    def supports_chunking(self) -> bool:
        """BDAT pipelining (:mod:`~mailworker.smtp.chunking`): the server offers PIPELINING
        and CHUNKING, and the relay's ``pipelining`` and ``chunking`` options allow it."""
        features = self._client.esmtp_features if self._client is not None else {}
        return self.supports_pipelining and self.relay.chunking and "chunking" in features

    @property
    def max_size(self) -> int | None:
        features = self._client.esmtp_features if self._client is not None else {}
        size = features.get("size", "").strip()
        return int(size) if size.isdigit() and int(size) > 0 else None

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "active" if self.in_use else "idle"
        return (f"<Connection {self.conn_id} relay={self.relay.name!r} {self.relay.address} "
                f"{state} sent={self.messages_sent}>")
