"""Mail transactions over one open connection: RFC 2920 pipelining, per-recipient results.

Why pipelining: a delivery on a busy connection is dominated by round trips. Unpipelined,
smtplib needs four per message (MAIL, RCPT, DATA, the dot) plus one per extra recipient.
Here MAIL, every RCPT and DATA go out in one write; and in a batch the next message's
commands ride in the same write as the previous message's content and final dot, as
Postfix does, so a busy connection costs one round trip per message.

Replies are read strictly in order and each is checked against the command it answers.
Anything that can put replies out of step (a 421, a lost connection, a malformed line)
closes the connection; it is never reused.

After a transaction fails before its final dot (MAIL, RCPT or DATA refused) a ``RSET``
is owed; it goes out in front of the next MAIL, in the same write. A reply after the dot,
accepted or not, ends the transaction (RFC 5321 4.1.1.4), so no RSET follows it.

The batch contract (:meth:`Session.run`): one entry per envelope, in order, either a
:class:`SendResult` or the exception for that message. A message whose connection failed
gets the failure annotated with its stage (``DeliveryUncertain`` when its dot was written
and no reply came); every message after it gets :class:`NotAttempted`: no content of it
reached the server, so it can go again at once. An entry is a ``SendResult`` when at
least one recipient was accepted and the connection held (refused recipients are in it);
otherwise it is the exception, with the per-recipient ``SendResult`` as ``exc.result``.
"""

from __future__ import annotations

import re
import smtplib
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mailworker.smtp.errors import (
    DeliveryUncertain,
    NotAttempted,
    Stage,
    annotate,
    enhanced_code_of,
)
from mailworker.smtp.replylog import ReplyLog

__all__ = ["Envelope", "Gate", "Prepared", "RecipientResult", "SendResult", "Session", "Wire",
           "rcpt_lines"]

Gate = Callable[[int], bool]
"""``gate(i)``: may envelope ``i`` of the batch start now? Asked just before its MAIL FROM."""

_BAD_ASCII = re.compile(r"[\x00-\x20\x7f<>]")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to send: the SMTP envelope and the RFC 5322 bytes.

    Addresses are checked here, when the envelope is made, so nothing can be smuggled
    into an SMTP command: no control character (CR, LF, NUL, ...), no space (which would
    start an ESMTP parameter), no ``<``/``>``, and outside ASCII no separator or invisible
    character (U+2028, U+0085, U+200B, U+FEFF, ...). Enclosing angle brackets are dropped.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str | None = None  # ours; bound on every log event of the transaction

    def __post_init__(self) -> None:
        rcpts = (self.recipients,) if isinstance(self.recipients, str) else self.recipients
        if not rcpts:
            raise ValueError("an envelope needs at least one recipient")
        object.__setattr__(self, "sender", _address(self.sender, allow_empty=True))
        object.__setattr__(self, "recipients", tuple(_address(r) for r in rcpts))


def _address(addr: str, allow_empty: bool = False) -> str:
    a = addr.strip()
    if a[:1] == "<" and a[-1:] == ">":
        a = a[1:-1]
    bad = _BAD_ASCII.search(a) or not (a.isascii() or all(map(_visible, a)))
    if bad or (not a and not allow_empty):
        raise ValueError(f"invalid envelope address {addr!r}: empty, or has a space, CR, LF "
                         "or another control or invisible character, a separator, or <>")
    return a


def _visible(ch: str) -> bool:
    """Not a control, format (zero-width), separator, surrogate or unassigned character."""
    return ch.isascii() or unicodedata.category(ch)[0] not in "CZ"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What the server finally said about one recipient, and at which stage."""

    recipient: str
    code: int | None  # None: the connection died before a reply decided it
    text: str
    enhanced_code: str | None
    stage: Stage

    @property
    def accepted(self) -> bool:
        """True only for a 2xx reply after the final dot: the server took the message."""
        return self.stage is Stage.AFTER_DOT and self.code is not None and self.code < 300


@dataclass(frozen=True, slots=True)
class SendResult:
    """Per-recipient outcome of one envelope, in envelope order."""

    envelope: Envelope
    recipients: tuple[RecipientResult, ...]
    transactions: int  # >1 when 452 "too many recipients" split the envelope

    @property
    def accepted(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if r.accepted)

    @property
    def refused(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if not r.accepted)


@dataclass(frozen=True, slots=True)
class Prepared:
    """An envelope turned into wire bytes for one server's capabilities."""

    sender: str
    mail: bytes  # "MAIL FROM:<...> params\r\n"
    mail_cmd: str  # the same, for the log
    content: bytes  # CRLF, dot-stuffed, ending in CRLF.CRLF


def rcpt_lines(recipients: Iterable[str]) -> list[tuple[bytes, str]]:
    """``RCPT TO`` lines as (wire bytes, log text)."""
    out = []
    for r in recipients:
        cmd = f"RCPT TO:<{r}>"
        out.append((cmd.encode() + b"\r\n", cmd))
    return out


_RSET = b"RSET\r\n"
_DATA = b"DATA\r\n"
_TERMINATOR = b".\r\n"


class Wire(Protocol):
    """What a session needs from the socket (:class:`mailworker.smtp.wire.ReplyWire`)."""

    def set_deadline(self, deadline: float | None, label: str = ...) -> None: ...
    def write(self, data: bytes) -> None: ...
    def read_reply(self, command: str | None = None) -> tuple[int, bytes]: ...
    def peer_spoke(self) -> bool: ...
    def end_transaction(self) -> None: ...
    def close(self) -> None: ...


class _Abort(Exception):  # noqa: N818 - internal control flow, never escapes this module
    """The connection is unusable; unwind the batch and hand out the failures."""

    def __init__(self, exc: BaseException, stage: Stage, txn: _Txn | None) -> None:
        super().__init__(str(exc))
        self.exc, self.stage, self.txn = exc, stage, txn


@dataclass(slots=True, eq=False)
class _Txn:
    """One MAIL transaction: an envelope, or the part of it a 452 pushed to a new one."""

    index: int
    prep: Prepared
    recipients: tuple[str, ...]
    lines: list[tuple[bytes, str]]
    deadline: float = 0.0
    mail: tuple[int, bytes] | None = None
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    retry: list[str] = field(default_factory=list)
    first: bool = True  # False for the part of an envelope a 452 pushed to a new transaction

    @property
    def commands(self) -> bytes:
        return b"".join([self.prep.mail, *(line for line, _ in self.lines), _DATA])


@dataclass(slots=True, eq=False)
class _Outcome:
    """What happened to one envelope, across all its transactions."""

    envelope: Envelope
    decided: dict[str, RecipientResult] = field(default_factory=dict)
    transactions: int = 0
    error: BaseException | None = None
    fatal: bool = False  # the connection failed on it: raised even if some were accepted

    def decide(self, rcpts: Sequence[str], code: int | None, text: str, stage: Stage) -> None:
        enhanced = enhanced_code_of(text)
        for r in rcpts:
            self.decided[r] = RecipientResult(r, code, text, enhanced, stage)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


class Session:
    """Runs batches of transactions over one wire; lives as long as the connection."""

    def __init__(
        self,
        wire: Wire,
        log: ReplyLog,
        *,
        relay: str,
        deadline: float,
        pipelining: bool,
        clock: Callable[[], float],
    ) -> None:
        self.wire, self.log, self.relay, self.clock = wire, log, relay, clock
        self.deadline, self.pipelining = deadline, pipelining
        self.needs_rset = False
        self._deadline_label = f"the transaction deadline={deadline:g}s"
        self.dots = 0  # transactions that reached the final dot: counts toward max_messages
        self._cur: _Txn | None = None
        self._outcomes: list[_Outcome] = []
        self._gate: Gate | None = None

    # -- entry point -------------------------------------------------------------------
    def run(self, envelopes: Sequence[Envelope], prepared: Sequence[Prepared | BaseException],
            *, gate: Gate | None = None) -> list[SendResult | BaseException]:
        """Send *envelopes*; *prepared* holds each one's wire bytes, or why it cannot go.

        *gate*, if given, is asked ``gate(i)`` (``i`` indexes *envelopes*) right before the
        ``MAIL FROM`` of envelope ``i`` is written, once per envelope (not for the second
        transaction of a 452 split: that envelope has started). When it returns False or
        raises, envelope ``i`` and all later ones are not started: each gets
        :class:`NotAttempted`; the previous message's content and dot, if pending, still
        go out and its reply is read. The caller uses this to stop at a lost lease.
        """
        outcomes = self._outcomes = [_Outcome(env) for env in envelopes]
        self._gate = gate
        todo: deque[_Txn] = deque()
        for i, (env, prep) in enumerate(zip(envelopes, prepared, strict=True)):
            if isinstance(prep, BaseException):  # refused before sending (SIZE, SMTPUTF8)
                outcomes[i].decide(env.recipients, *_code_text(prep), Stage.MAIL)
                outcomes[i].error, outcomes[i].fatal = prep, True
            else:
                todo.append(_Txn(i, prep, env.recipients, rcpt_lines(env.recipients)))
        self._cur = None
        try:
            if todo and self.wire.peer_spoke():
                raise _Abort(smtplib.SMTPServerDisconnected(
                    "the server spoke before MAIL (closed, or sent an unsolicited reply)"),
                    Stage.MAIL, todo[0])
            if self.pipelining:
                self._pipelined(todo)
            else:
                self._sequential(todo)
        except _Abort as abort:
            self.wire.close()
            self._distribute(abort, todo)
        except BaseException:  # interrupted mid-transaction: replies are out of step
            self.wire.close()
            raise
        finally:
            self.wire.end_transaction()
        return [self._entry(oc) for oc in outcomes]

    # -- the two ways of talking -------------------------------------------------------
    def _pipelined(self, todo: deque[_Txn]) -> None:
        pending = b""  # content + dot (or a bare dot) to write ahead of the next commands
        dot: _Txn | None = None  # whose content is in `pending` (None: a bare terminator)
        while True:
            cur = self._cur = self._next(todo)
            if cur is None and not pending:
                return
            rset = self.needs_rset and cur is not None
            parts = [pending] if pending else []
            if rset:
                parts.append(_RSET)
            if cur is not None:
                self._start(cur)
                parts.append(cur.commands)
            if dot is not None:
                self._still_listening(dot)
            started = self._write(b"".join(parts), dot, cur, trailing=cur is not None)
            if pending:
                if dot is not None:
                    self._final(dot, started)
                else:  # the reply to a bare terminator carries no news; keep in step
                    code, text = self._read(cur, Stage.MAIL, "<dot>", started)
                    if code == 421:
                        raise _Abort(smtplib.SMTPResponseException(code, text), Stage.MAIL, cur)
                pending, dot = b"", None
            if cur is None:
                return
            if rset:
                self._rset_reply(cur, started)
            self._mail_reply(cur, *self._read(cur, Stage.MAIL, cur.prep.mail_cmd, started))
            for rcpt, (_, cmd) in zip(cur.recipients, cur.lines, strict=True):
                code, text = self._read(cur, Stage.RCPT, cmd, started, rcpt)
                self._rcpt_reply(cur, rcpt, code, text)
            code, text = self._read(cur, Stage.DATA, "DATA", started)
            pending = self._data_reply(cur, code, text, todo)
            dot = cur if pending is cur.prep.content else None

    def _sequential(self, todo: deque[_Txn]) -> None:
        while todo:
            cur = self._cur = self._next(todo)
            if cur is None:
                return
            self._start(cur)
            if self.needs_rset:
                self._rset_reply(cur, self._write(_RSET, None, cur))
            started = self._write(cur.prep.mail, None, cur)
            self._mail_reply(cur, *self._read(cur, Stage.MAIL, cur.prep.mail_cmd, started))
            if cur.mail is None:
                for rcpt, (line, cmd) in zip(cur.recipients, cur.lines, strict=True):
                    started = self._write(line, None, cur, stage=Stage.RCPT)
                    self._rcpt_reply(cur, rcpt, *self._read(cur, Stage.RCPT, cmd, started, rcpt))
            if cur.mail is None and cur.accepted:
                started = self._write(_DATA, None, cur, stage=Stage.DATA)
                pending = self._data_reply(cur, *self._read(cur, Stage.DATA, "DATA", started), todo)
            else:
                pending = self._data_reply(cur, None, b"", todo)
            if pending:
                self._still_listening(cur)
                self._final(cur, self._write(pending, cur, None, trailing=False))

    # -- reply handlers (shared by both paths) ---------------------------------------------
    def _rset_reply(self, cur: _Txn, started: float) -> None:
        code, text = self._read(cur, Stage.MAIL, "RSET", started)
        if not 200 <= code < 300:  # a server that refuses RSET is closing or confused
            exc = smtplib.SMTPSenderRefused(code, text, cur.prep.sender)
            raise _Abort(exc, Stage.MAIL, cur)
        self.needs_rset = False

    def _mail_reply(self, t: _Txn, code: int, text: bytes) -> None:
        if 200 <= code < 300:
            return
        if code == 421:
            raise _Abort(smtplib.SMTPSenderRefused(code, text, t.prep.sender), Stage.MAIL, t)
        t.mail = (code, text)

    def _rcpt_reply(self, t: _Txn, rcpt: str, code: int, text: bytes) -> None:
        if 200 <= code < 300:
            t.accepted.append(rcpt)
            return
        if code == 421:
            refused = {r: (code, text) for r in t.recipients}
            raise _Abort(smtplib.SMTPRecipientsRefused(refused), Stage.RCPT, t)
        t.refused[rcpt] = (code, text)
        if code == 452:  # "too many recipients": these go in a transaction of their own
            t.retry.append(rcpt)

    def _data_reply(self, t: _Txn, code: int | None, text: bytes, todo: deque[_Txn]) -> bytes:
        """Settle everything decided before the dot; return the bytes to send next."""
        oc = self._outcomes[t.index]
        oc.transactions += 1
        if code == 421:
            raise _Abort(smtplib.SMTPDataError(code, text), Stage.DATA, t)
        go_on = t.mail is None and bool(t.accepted) and code == 354
        retry = set(t.retry) if go_on else set()
        for rcpt, (c, txt) in t.refused.items():
            if rcpt not in retry:
                oc.decide((rcpt,), c, txt.decode("utf-8", "replace"), Stage.RCPT)
        exc: smtplib.SMTPException | None = None
        enhanced = None
        if t.mail is not None:
            exc = smtplib.SMTPSenderRefused(t.mail[0], t.mail[1], t.prep.sender)
            oc.decide(t.recipients, t.mail[0], t.mail[1].decode("utf-8", "replace"), Stage.MAIL)
            stage = Stage.MAIL
        elif not t.accepted:
            exc, stage = smtplib.SMTPRecipientsRefused(dict(t.refused)), Stage.RCPT
            codes = {enhanced_code_of(txt) for _, txt in t.refused.values()}
            enhanced = codes.pop() if len(codes) == 1 else None
        elif code != 354:
            assert code is not None
            exc, stage = smtplib.SMTPDataError(code, text), Stage.DATA
            oc.decide(t.accepted, code, text.decode("utf-8", "replace"), Stage.DATA)
        if exc is not None:
            oc.fail(annotate(exc, stage, self.relay, enhanced))
            self.needs_rset = True
            # RFC 2920: a server may still say 354; end that empty message at once.
            return _TERMINATOR if code == 354 else b""
        if t.retry:
            todo.appendleft(_Txn(t.index, t.prep, tuple(t.retry), rcpt_lines(t.retry),
                                 first=False))
        return t.prep.content

    def _final(self, t: _Txn, started: float) -> None:
        code, text = self._read(t, Stage.AFTER_DOT, "<dot>", started)
        self.dots += 1
        oc = self._outcomes[t.index]
        decoded = text.decode("utf-8", "replace")
        oc.decide(t.accepted, code, decoded, Stage.AFTER_DOT)
        if 200 <= code < 300:
            return
        oc.fail(annotate(smtplib.SMTPDataError(code, text), Stage.AFTER_DOT, self.relay))
        if code == 421:  # the message is refused, and the connection is going away
            oc.fatal = True
            raise _Abort(smtplib.SMTPDataError(code, text), Stage.AFTER_DOT, None)

    # -- the gate ------------------------------------------------------------------------
    def _next(self, todo: deque[_Txn]) -> _Txn | None:
        """The next transaction to start, or None: none left, or the gate said stop."""
        if not todo:
            return None
        t = todo[0]
        if self._gate is None or not t.first or self._may_start(self._gate, t.index):
            return todo.popleft()
        for oc in self._outcomes[t.index:]:
            exc = NotAttempted(f"not attempted: the caller stopped the batch at message {t.index}")
            oc.decided.clear()
            oc.error, oc.fatal = annotate(exc, Stage.MAIL, self.relay), True
        todo.clear()
        return None

    def _may_start(self, gate: Gate, index: int) -> bool:
        try:
            return bool(gate(index))
        except Exception as exc:  # a broken gate must not send: treat it as "stop"
            self.log.failure("smtp.gate_failed", exc, index=index)
            return False

    # -- I/O with failures turned into aborts ----------------------------------------------
    def _still_listening(self, t: _Txn) -> None:
        """Before content goes out: a server that hung up after 354 gets none (one poll)."""
        if self.wire.peer_spoke():
            raise _Abort(smtplib.SMTPServerDisconnected(
                "the server closed the connection after 354, before the content"), Stage.DATA, t)

    def _start(self, t: _Txn) -> None:
        t.deadline = self.clock() + self.deadline
        self.wire.set_deadline(t.deadline, self._deadline_label)  # bounds its writes too

    def _write(self, data: bytes, dot: _Txn | None, cur: _Txn | None, *,
               trailing: bool = True, stage: Stage = Stage.MAIL) -> float:
        started = self.clock()
        try:
            self.wire.write(data)
        except (OSError, smtplib.SMTPServerDisconnected) as err:
            exc = smtplib.SMTPServerDisconnected(f"write failed: {err}")
            exc.__cause__ = err
            if dot is not None:
                # With commands after the dot in the same write, the dot may have left;
                # when the dot is the last thing written, a failed write never sent it.
                raise _Abort(exc, Stage.AFTER_DOT if trailing else Stage.DATA, dot) from err
            raise _Abort(exc, stage, cur) from err
        return started

    def _read(self, t: _Txn | None, stage: Stage, command: str, started: float,
              recipient: str | None = None) -> tuple[int, bytes]:
        wire = self.wire
        if t is not None:
            wire.set_deadline(t.deadline, self._deadline_label)
        try:
            code, text = wire.read_reply(command)
        except (OSError, smtplib.SMTPServerDisconnected) as err:
            raise _Abort(err, stage, t) from err
        log = self.log
        if log.enabled:
            mid = self._outcomes[t.index].envelope.message_id if t is not None else None
            log.reply(command, code, text, started, self.clock(), message_id=mid,
                      recipient=recipient)
        return code, text

    # -- results ------------------------------------------------------------------------
    def _distribute(self, abort: _Abort, todo: deque[_Txn]) -> None:
        """The connection died: the message it died on gets the error, the rest NotAttempted."""
        failing = abort.txn
        for t in dict.fromkeys(t for t in (failing, self._cur, *todo) if t is not None):
            oc = self._outcomes[t.index]
            if oc.fatal:
                continue
            exc: BaseException
            if t is failing:
                exc, stage = abort.exc, abort.stage
                if stage is Stage.AFTER_DOT and not isinstance(exc, smtplib.SMTPResponseException):
                    uncertain = DeliveryUncertain(f"no reply after the final dot: {exc}")
                    uncertain.__cause__ = exc
                    exc = uncertain
            else:
                exc, stage = NotAttempted("not attempted: the connection failed on an earlier "
                                          f"message ({abort.exc})"), Stage.MAIL
            code, text = _code_text(exc)
            undecided = [r for r in t.recipients if r not in oc.decided]
            oc.decide(undecided, code, text, stage)
            oc.error, oc.fatal = annotate(exc, stage, self.relay), True

    def _entry(self, oc: _Outcome) -> SendResult | BaseException:
        env = oc.envelope
        results = tuple(oc.decided.get(r) or RecipientResult(r, None, "not attempted", None,
                                                             Stage.MAIL) for r in env.recipients)
        result = SendResult(env, results, oc.transactions)
        if oc.error is None or (not oc.fatal and result.accepted):
            return result
        oc.error.result = result  # type: ignore[attr-defined]
        return oc.error


def _code_text(exc: BaseException) -> tuple[int | None, str]:
    """The reply an exception carries, as recipient results record it."""
    if isinstance(exc, smtplib.SMTPResponseException):
        err = exc.smtp_error
        return exc.smtp_code, err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code, err = next(iter(exc.recipients.values()))
        return code, err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
    return None, str(exc)
