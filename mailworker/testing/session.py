"""One SMTP connection of the test server: aiosmtpd's protocol plus recording and faults.

aiosmtpd parses and validates the protocol; this subclass adds:

* every command passes through :meth:`FaultySMTP._guard`, which records it and applies
  delay, disconnect and reply faults before aiosmtpd sees it (one interception point
  instead of overriding each ``smtp_*`` method);
* handler hooks (:class:`_Hooks`) decide MAIL, RCPT and the reply after the dot, where the
  parsed address is known: faults with ``match``, the persona's rate cap and drop after
  the dot, ``max_recipients``, ``size_limit``, ``require_auth``, and recording the
  message *before* the reply goes out, so a client that has seen 250 always finds its
  message in ``server.messages``;
* :meth:`FaultySMTP.smtp_DATA` reads the content in bulk (:mod:`.content`) instead of
  aiosmtpd's line at a time, with the same replies, limits and hook call;
* :meth:`FaultySMTP.smtp_BDAT` adds RFC 3030 CHUNKING, which aiosmtpd lacks (offered
  only with ``chunking=True``): each chunk is read from the same stream right after its
  command line, and ``BDAT ... LAST`` ends the message through the same hook as DATA's
  final dot. Errors follow Postfix's smtpd (3.7, checked against it): a refused chunk is
  still read, so the commands pipelined behind it stay in step, and later chunks of the
  same failed transaction are read and discarded (``551 5.0.0``), as RFC 3030 section 2
  asks of a server ("accept and discard additional BDAT chunks already in the pipeline
  after the failed BDAT");
* :meth:`FaultySMTP.push` is the single exit: it applies greeting faults (and the
  persona's connection cap and outages, :mod:`.personas`), answers a pipelined group of
  commands in one write (as Postfix does), and swallows writes to a connection the fault
  code (or the client) already closed, so client disconnects never surface as tracebacks.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, AnyStr, TypeVar

from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from .content import LINE_TOO_LONG, has_long_line, read_content, unstuff
from .faults import HOSTILE, Fault, FaultBook, act_out
from .personas import Provider
from .records import ReceivedMessage, Recorder, address_in, command_line, message_id_of

__all__ = ["FaultySMTP", "SessionConfig"]

log = logging.getLogger("mailworker.testing")

_Command = Callable[[str | None], Awaitable[None]]
_Method = TypeVar("_Method", bound=Callable[..., Any])
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
#: BDAT replies; the error texts are Postfix smtpd's (3.7), where it has one.
CHUNK_TOO_BIG = "552 5.3.4 Chunk exceeds message size limit"
BDAT_SYNTAX = "521 5.5.4 Syntax: BDAT count [LAST]"
BDAT_NO_MAIL = "503 5.5.1 Error: need MAIL command"
BDAT_NO_RCPT = "554 5.5.1 Error: no valid recipients"
DATA_AFTER_BDAT = "503 5.5.1 Error: DATA after BDAT"
BDAT_NULL = "551 5.7.1 Null BDAT request"
_PIECE = 64 * 1024  # a chunk is read (and kept or discarded) this much at a time
#: Commands whose replies push() may hold back (RFC 2920's pipelinable ones, and the end
#: of DATA, which the client does not wait for when it pipelines the next message), and
#: at most how many replies it holds.
_BATCHED = frozenset({"MAIL", "RCPT", "BDAT", "RSET", "NOOP", "DATA"})
_HOLD_MAX = 64


@dataclass(frozen=True)
class SessionConfig:
    """Everything a connection needs from its server; shared by all its connections."""

    recorder: Recorder
    faults: FaultBook
    hostname: str
    auth: Mapping[str, str] | None
    require_auth: bool
    auth_require_tls: bool
    max_recipients: int | None
    size_limit: int | None
    smtputf8: bool
    pipelining: bool
    starttls_context: ssl.SSLContext | None
    implicit_tls: bool
    #: The persona (connection and rate caps) and the outage switch.
    provider: Provider = field(default_factory=Provider)
    #: Live connections, touched only on the server's loop (idle re-arming, stop()).
    sessions: set[FaultySMTP] = field(default_factory=set)
    #: Offer CHUNKING (RFC 3030) and accept BDAT.
    chunking: bool = False


class _QuietSession(Session):
    """aiosmtpd's Session without the deprecation warning logged on every successful AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def _help_of(original: Any) -> Callable[[_Method], _Method]:
    """Give an overriding ``smtp_*`` method the HELP text of aiosmtpd's (``@syntax``)."""

    def copy(method: _Method) -> _Method:
        for name in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            setattr(method, name, getattr(original, name, None))
        return method

    return copy


class FaultySMTP(SMTP):
    """aiosmtpd's SMTP protocol that records what it sees and misbehaves on request."""

    def __init__(self, config: SessionConfig, loop: asyncio.AbstractEventLoop) -> None:
        self._cfg = config
        self._conn_id = 0
        self._gone = False
        self._hung_up = False
        self._greeted = False
        self._queued = 0
        #: The chunks of the current BDAT transaction (None: no BDAT in it yet).
        self._chunks: list[bytes] | None = None
        self._chunked = 0  # their total size
        #: A BDAT of this transaction failed: later chunks are read and discarded.
        self._bdat_failed = False
        self.chunking = config.chunking  # HELP lists BDAT only then (@syntax's ``when``)
        self._last_input = time.monotonic()
        #: Replies held back while the client's next command is already buffered (see
        #: push()), and the verb being answered.
        self._held: list[bytes] = []
        self._verb: str | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        # aiosmtpd warns about AUTH without TLS; testing clients against that is the point.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(
                _Hooks(),
                data_size_limit=None,  # checked in on_dot, to reply with 5.3.4
                enable_SMTPUTF8=config.smtputf8,
                decode_data=False,
                hostname=config.hostname,
                ident="ESMTP mailworker.testing",
                tls_context=config.starttls_context,
                require_starttls=False,
                auth_required=False,  # enforced in on_mail: 530 to MAIL, as relays do
                # Under implicit TLS the channel is always encrypted; aiosmtpd only knows
                # about STARTTLS and would refuse AUTH.
                auth_require_tls=config.auth_require_tls and not config.implicit_tls,
                auth_exclude_mechanism=() if config.auth else ("PLAIN", "LOGIN"),
                authenticator=_authenticate,
                loop=loop,
            )
        self._smtp_methods = {
            verb: self._guard(verb, method) for verb, method in self._smtp_methods.items()
        }

    @property
    def connection_id(self) -> int:
        return self._conn_id

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    # -- connection life ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._conn_id:  # STARTTLS calls this again with the TLS transport
            self._conn_id = self._cfg.recorder.connection_opened()
            self._cfg.sessions.add(self)
            super().connection_made(transport)
            self.arm_idle()
        else:
            super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._conn_id and not self._gone:
            self._gone = True
            self._cancel_idle()
            self._cfg.sessions.discard(self)
            self._cfg.provider.release(self._conn_id)
            self._cfg.recorder.connection_closed()
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._last_input = time.monotonic()
        super().data_received(data)

    def drop(self) -> None:
        """Close the connection now, without a reply, and stop handling its commands."""
        if self._hung_up:
            return
        self.flush()  # replies already given go out before the close
        self._hung_up = True
        self._cancel_idle()
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def _hang_up(self, fault: Fault) -> None:
        if fault.code is not None:
            await self.push(fault.reply_line)
        self.drop()

    async def push(self, status: AnyStr) -> None:
        """Send a reply, or hold it while the client's next command is already buffered.

        A pipelining client sends a group of commands in one write; answering each in its
        own write costs a system call per reply. Like Postfix's smtpd (RFC 2920 section
        3.2: a server may hold replies until its input buffer runs empty), replies to the
        pipelinable commands are held while a further complete command line is waiting,
        and go out together in one write when it is not. Nothing is held that the client
        could be waiting for: an unfinished line in the buffer means the client is still
        writing, and every reply given is sent before a delay, a hostile fault, a close or
        the TLS handshake.
        """
        if self._hung_up:
            return
        if not self._greeted:
            self._greeted = True
            if await self._greeting_fault():
                return
        line = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") \
            if isinstance(status, str) else status
        self._held.append(line + b"\r\n")
        if self._verb in _BATCHED and len(self._held) < _HOLD_MAX and _command_waiting(
                self._reader):
            return
        try:
            self.flush()
            await self._writer.drain()
        except ConnectionError:
            self.drop()

    def flush(self) -> None:
        """Write the replies held back by push() (the server calls this before writing
        anything else to the connection)."""
        if self._held:
            held, self._held = b"".join(self._held), []
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(held)

    async def _greeting_fault(self) -> bool:
        faults, cid = self._cfg.faults, self._conn_id
        if (refusal := self._cfg.provider.greet(cid)) is not None:  # down, or over the cap
            if refusal:
                await self.push(refusal)
            self.drop()
            return True
        if (delay := faults.take("delay", "GREETING", (), cid)) is not None:
            await asyncio.sleep(delay.seconds)  # (nothing can be held before the greeting)
        if await self._hostile("GREETING", ()):
            return True
        if (fault := faults.take("greeting", None, (), cid)) is not None:
            await self._hang_up(fault)
            return True
        return False

    # -- idle disconnects --------------------------------------------------------------

    def arm_idle(self) -> None:
        """(Re)schedule the idle check for the earliest idle fault; the server calls this
        on its loop when an idle fault is added."""
        self._cancel_idle()
        if self._hung_up or self.transport is None:
            return
        deadline = self._cfg.faults.idle_deadline(self._last_input)
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._idle_timer = self.loop.call_later(delay, self._idle_due)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_due(self) -> None:
        self._idle_timer = None
        if self._hung_up:
            return
        fault = self._cfg.faults.take_idle(self._last_input, self._conn_id)
        if fault is None:  # the client spoke meanwhile, or the fault was spent or cleared
            self.arm_idle()
            return
        self.flush()
        if fault.code is not None:
            self._writer.write(f"{fault.reply_line}\r\n".encode())
        self.drop()

    # -- commands ----------------------------------------------------------------------

    def _guard(self, verb: str, method: _Command) -> _Command:
        @functools.wraps(method)  # keeps aiosmtpd's HELP syntax attributes
        async def guarded(arg: str | None) -> None:
            if self._hung_up:
                # drop() cancels the command loop, but the cancellation only lands when
                # the loop next waits; commands pipelined behind the one that hung up are
                # already buffered and would be run (a whole BDAT transaction, recorded)
                # without a client to answer. End the loop here instead.
                raise asyncio.CancelledError
            self._cfg.recorder.command(self._conn_id, command_line(verb, arg))
            self._verb = verb
            try:
                if self._cfg.faults.active and await self._inject(verb, arg):
                    return
                if verb == "AUTH" and not self._cfg.auth:
                    await self.push("503 5.5.1 Error: authentication not enabled")
                    return
                await method(arg)
            finally:
                # aiosmtpd's own replies between commands (unknown command, line too long,
                # too many errors and a close) are never held back.
                self._verb = None

        return guarded

    async def _inject(self, verb: str, arg: str | None) -> bool:
        """Apply faults for this command; True when they answered it instead of aiosmtpd."""
        faults, cid = self._cfg.faults, self._conn_id
        subjects = self._subjects(verb, arg)
        if (delay := faults.take("delay", verb, subjects, cid)) is not None:
            self.flush()  # the delay is this reply's, not the earlier ones'
            await asyncio.sleep(delay.seconds)
        if (fault := faults.take("disconnect", verb, subjects, cid)) is not None:
            await self._hang_up(fault)
            return True
        if await self._hostile(verb, subjects):
            return True
        if verb in ("MAIL", "RCPT", "BDAT"):
            # MAIL/RCPT: their reply faults apply in the hooks, once aiosmtpd parsed them;
            # BDAT: its chunk must be read first (smtp_BDAT).
            return False
        if verb == "DATA":
            # Only a DATA that would be accepted can be refused or dropped by a fault.
            if arg or not self.envelope or not self.envelope.rcpt_tos:
                return False
            if (fault := faults.take("reply", "DATA", subjects, cid)) is not None:
                await self.push(fault.reply_line)
                return True
            if faults.take("drop_during_data", None, subjects, cid) is not None:
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                await self._reader.read(1)  # wait for the content to start arriving
                self.drop()
                return True
            return False
        if (fault := faults.take("reply", verb, subjects, cid)) is not None:
            await self.push(fault.reply_line)
            return True
        return False

    async def _hostile(self, on: str, subjects: tuple[str, ...]) -> bool:
        """Play a hang/trickle/endless fault for *on*, if one applies, until the client goes."""
        for kind in HOSTILE:
            if (fault := self._cfg.faults.take(kind, on, subjects, self._conn_id)) is not None:
                self.flush()
                await act_out(fault, self._writer, lambda: self._hung_up or self.transport is None
                              or self.transport.is_closing())
                self.drop()
                return True
        return False

    def _subjects(self, verb: str, arg: str | None) -> tuple[str, ...]:
        """What a fault's ``match`` is tested against for this command."""
        if verb in ("MAIL", "RCPT"):
            return (address_in(arg),)
        if verb in ("DATA", "BDAT", "DOT"):
            envelope = self.envelope
            if envelope is None:
                return ()
            subjects = (envelope.mail_from or "", *envelope.rcpt_tos)
            if verb == "DOT" and envelope.original_content:
                subjects += (message_id_of(envelope.original_content) or "",)
            return subjects
        return (arg or "",)

    @_help_of(SMTP.smtp_DATA)
    async def smtp_DATA(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's name
        """aiosmtpd's DATA with the content read in bulk; replies, limits and the
        ``handle_DATA`` hook call are aiosmtpd's (1.4)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        if self._chunks is not None:  # RFC 3030: not in a transaction that used BDAT
            await self.push(DATA_AFTER_BDAT)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            raw = await read_content(self._reader)
        except asyncio.CancelledError:  # the connection went away (or drop()) mid-content
            self._writer.close()
            raise
        if has_long_line(raw, self.line_length_limit - 1):
            status = LINE_TOO_LONG  # no hook call: nothing recorded, no DOT faults
        else:
            # decode_data=False: the content stays bytes, as received after unstuffing.
            envelope.content = envelope.original_content = unstuff(raw)
            hooked = await self._call_handler_hook("DATA")  # -> on_dot()
            status = "250 OK" if hooked is MISSING else hooked
        self._set_post_data_state()  # a fresh envelope
        await self.push(status)

    @syntax("BDAT size [LAST]", when="chunking")
    async def smtp_BDAT(self, arg: str | None) -> None:  # noqa: N802 - aiosmtpd's name
        """RFC 3030 BDAT: read exactly ``size`` octets, add them to the message; LAST ends
        it through the same hook as DATA's final dot (no dot-unstuffing: BDAT content is
        sent as it is).

        The chunk is read before any refusal is sent, so a pipelining client's next
        commands, queued behind the chunk, are read as commands and not as content.
        """
        if not self.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        words = (arg or "").split()
        if not (1 <= len(words) <= 2 and words[0].isdigit() and words[0].isascii()
                and (len(words) == 1 or words[1].upper() == "LAST")):
            # Without a size the chunk's end is unknown: hang up, as Postfix does, rather
            # than read content as commands.
            await self.push(BDAT_SYNTAX)
            self.drop()
            return
        size, last = int(words[0]), len(words) == 2
        faults, cid = self._cfg.faults, self._conn_id
        refusal = self._bdat_refusal(size, last)
        # As for DATA, only a chunk that would be taken can be cut off by a fault.
        if refusal is None and faults.active and faults.take(
                "drop_during_data", None, self._subjects("BDAT", arg), cid) is not None:
            await self._read_chunk(min(size, max(1, size // 2)), keep=False)
            self.drop()
            return
        chunk = await self._read_chunk(size, keep=refusal is None)
        if refusal is None and faults.active and (fault := faults.take(
                "reply", "BDAT", self._subjects("BDAT", arg), cid)) is not None:
            refusal = fault.reply_line
        if refusal is not None:
            self._bdat_failed = True
            if last:  # the end of the failed message: the next one starts afresh
                self._set_post_data_state()
            await self.push(refusal)
            return
        assert self.envelope is not None
        if self._chunks is None:
            self._chunks = []
        self._chunks.append(chunk)
        self._chunked += size
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        content = b"".join(self._chunks)
        self.envelope.content = self.envelope.original_content = content
        hooked = await self._call_handler_hook("DATA")  # -> on_dot()
        status = "250 OK" if hooked is MISSING else hooked
        self._set_post_data_state()  # a fresh envelope, and no BDAT state
        await self.push(status)

    def _bdat_refusal(self, size: int, last: bool) -> str | None:
        """Why this BDAT's chunk will be discarded (the reply), or None to keep it."""
        if self._bdat_failed:
            return f"551 5.0.0 Discarded {size} bytes after earlier error"
        if not self.session or not self.session.host_name:
            return "503 Error: send HELO first"
        if self._auth_required and not self.session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope = self.envelope
        if envelope is None or not envelope.mail_from:
            return BDAT_NO_MAIL
        if not envelope.rcpt_tos:
            return BDAT_NO_RCPT
        if not size and not last:  # only the last chunk may be empty (Postfix's rule)
            return BDAT_NULL
        limit = self._cfg.size_limit
        if limit is not None and self._chunked + size > limit:
            return CHUNK_TOO_BIG
        return None

    async def _read_chunk(self, size: int, keep: bool) -> bytes:
        """Read exactly *size* octets of the stream; return them, or b"" when not kept
        (then at most one piece is held at a time, whatever the size announced)."""
        pieces: list[bytes] = []
        remaining = size
        try:
            while remaining:
                piece = await self._reader.read(min(remaining, _PIECE))
                if not piece:  # the client went away mid-chunk
                    self.drop()
                    raise asyncio.CancelledError
                remaining -= len(piece)
                if keep:
                    pieces.append(piece)
        except asyncio.CancelledError:  # the connection went away (or drop()) mid-chunk
            self._writer.close()
            raise
        return b"".join(pieces) if keep else b""

    def _set_post_data_state(self) -> None:
        """aiosmtpd's reset after DATA, RSET, EHLO and HELO; the BDAT state goes with it."""
        self._chunks = None
        self._chunked = 0
        self._bdat_failed = False
        super()._set_post_data_state()  # type: ignore[no-untyped-call]

    def ehlo_lines(self, hostname: str, offered: list[str]) -> list[str]:
        """The EHLO reply: our own extension list, keeping aiosmtpd's STARTTLS/AUTH lines
        (it knows whether TLS is already on and whether AUTH may be offered)."""
        assert self.session is not None
        self.session.host_name = hostname
        cfg = self._cfg
        lines = [cfg.hostname]
        if cfg.pipelining:
            lines.append("PIPELINING")
        if cfg.chunking:
            lines.append("CHUNKING")
        if cfg.size_limit:
            lines.append(f"SIZE {cfg.size_limit}")
        if cfg.smtputf8:
            lines += ["8BITMIME", "SMTPUTF8"]
        lines.append("ENHANCEDSTATUSCODES")
        for line in offered[1:]:
            keyword = line[4:]
            if keyword == "STARTTLS" or (keyword.startswith("AUTH ") and cfg.auth):
                lines.append(keyword)
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def on_mail(self, address: str, options: list[str]) -> str:
        """Decide MAIL FROM after aiosmtpd's syntax checks: faults, AUTH, SIZE."""
        assert self.session is not None and self.envelope is not None
        cfg = self._cfg
        status = "250 2.1.0 OK"
        if (throttled := cfg.provider.throttle("MAIL")) is not None:
            return throttled
        if (fault := cfg.faults.take("reply", "MAIL", (address,), self._conn_id)) is not None:
            if not _positive(fault):
                return fault.reply_line
            status = fault.reply_line
        elif cfg.require_auth and not self.session.authenticated:
            return "530 5.7.0 Authentication required"
        elif cfg.size_limit is not None:
            for option in options:
                size = option.removeprefix("SIZE=")
                if size != option and size.isdigit() and int(size) > cfg.size_limit:
                    return TOO_BIG
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(options)
        self._chunks, self._chunked, self._bdat_failed = None, 0, False  # a new transaction
        return status

    async def on_rcpt(self, address: str, options: list[str]) -> str:
        """Decide RCPT TO: faults, then ``max_recipients``."""
        assert self.envelope is not None
        cfg = self._cfg
        status = "250 2.1.5 OK"
        if (fault := cfg.faults.take("reply", "RCPT", (address,), self._conn_id)) is not None:
            if not _positive(fault):
                return fault.reply_line
            status = fault.reply_line
        elif cfg.max_recipients is not None and len(self.envelope.rcpt_tos) >= cfg.max_recipients:
            return "452 4.5.3 Too many recipients"
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(options)
        return status

    async def on_dot(self) -> str:
        """Decide the reply after the final dot, recording the message before replying."""
        faults, cid = self._cfg.faults, self._conn_id
        subjects = self._subjects("DOT", None) if faults.active else ()  # parses a header
        if (delay := faults.take("delay", "DOT", subjects, cid)) is not None:
            self.flush()
            await asyncio.sleep(delay.seconds)
        if (fault := faults.take("disconnect", "DOT", subjects, cid)) is not None:
            await self._hang_up(fault)
            return ""  # push() ignores it: the connection is closed
        if await self._hostile("DOT", subjects):
            return ""
        if faults.take("drop_after_dot", None, subjects, cid) is not None \
                or self._cfg.provider.drops():
            self._record(acknowledged=False)
            self.drop()
            return ""
        if (throttled := self._cfg.provider.throttle("DOT")) is not None:
            return throttled
        if (fault := faults.take("reply", "DOT", subjects, cid)) is not None:
            if _positive(fault):
                self._record(acknowledged=True)
            return fault.reply_line
        size_limit = self._cfg.size_limit
        assert self.envelope is not None
        if size_limit is not None and len(self.envelope.original_content or b"") > size_limit:
            return TOO_BIG
        self._record(acknowledged=True)
        self._queued += 1
        return f"250 2.0.0 OK: queued as C{cid}M{self._queued}"

    def _record(self, acknowledged: bool) -> None:
        envelope, session = self.envelope, self.session
        assert envelope is not None and session is not None
        data = bytes(envelope.original_content or b"")
        user = session.auth_data if isinstance(session.auth_data, str) else None
        self._cfg.recorder.message(ReceivedMessage(
            sender=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            data=data,
            connection_id=self._conn_id,
            message_id=message_id_of(data),
            acknowledged=acknowledged,
            mail_options=tuple(envelope.mail_options),
            tls=self._cfg.implicit_tls or self._tls_protocol is not None,
            user=user,
        ))


def _command_waiting(reader: asyncio.StreamReader) -> bool:
    """Whether a complete command line is already buffered (so the command loop will run
    it without waiting for the client). A command line is at most a few hundred bytes;
    a longer stretch without a line end is content still arriving."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined] # no public peek
    return buffer.find(b"\n", 0, 1100) >= 0


class _Hooks:
    """aiosmtpd handler hooks; each forwards to the connection that called it."""

    async def handle_EHLO(  # noqa: N802 - aiosmtpd finds hooks by these names
        self, server: FaultySMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        return server.ehlo_lines(hostname, responses)

    async def handle_MAIL(  # noqa: N802
        self, server: FaultySMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        return await server.on_mail(address, mail_options)

    async def handle_RCPT(  # noqa: N802
        self, server: FaultySMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        return await server.on_rcpt(address, rcpt_options)

    async def handle_DATA(  # noqa: N802
        self, server: FaultySMTP, session: Session, envelope: Envelope
    ) -> str:
        return await server.on_dot()

    async def handle_exception(self, error: Exception) -> str:
        # A failed STARTTLS handshake is the client's business (e.g. it distrusts our CA);
        # anything else is a bug in the test server and should be seen.
        if not isinstance(error, TLSSetupException | ConnectionError | ssl.SSLError):
            log.warning("test SMTP server error", exc_info=error)
        return f"451 4.3.0 Test server error: {type(error).__name__}"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
) -> AuthResult:
    """aiosmtpd authenticator: check PLAIN/LOGIN credentials against the server's dict."""
    users = server._cfg.auth if isinstance(server, FaultySMTP) else None
    if not users or not isinstance(auth_data, LoginPassword):
        return AuthResult(success=False, handled=False)
    user = auth_data.login.decode("utf-8", "replace")
    expected = users.get(user)
    ok = expected is not None and hmac.compare_digest(expected.encode(), auth_data.password)
    return AuthResult(success=ok, handled=False, auth_data=user if ok else None)


def _positive(fault: Fault) -> bool:
    return fault.code is not None and 200 <= fault.code < 300
