"""Mail transactions over one open connection: RFC 2920 pipelining, per-recipient results.

Why pipelining: a delivery on a busy connection is dominated by round trips. Unpipelined,
smtplib needs four per message (MAIL, RCPT, DATA, the dot) plus one per extra recipient.
Here MAIL, every RCPT and DATA go out in one write; and in a batch the next message's
commands ride in the same write as the previous message's content and final dot, as
Postfix does, so a busy connection costs one round trip per message.

When the server also offers CHUNKING, :mod:`mailworker.smtp.chunking` pipelines whole
transactions with BDAT instead (a window of messages in flight), with the reply handlers
of this module.

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
otherwise it is the exception, with the per-recipient ``SendResult`` as the ``partial`` of
its :class:`~mailworker.smtp.errors.Failure` (``failure_of(exc).partial``).
"""

from __future__ import annotations

import smtplib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from mailworker.smtp.errors import (
    DeliveryUncertain,
    NotAttempted,
    Stage,
    annotate,
    attach_partial,
    enhanced_code_of,
    failure_of,
)
from mailworker.smtp.replylog import ReplyLog
from mailworker.smtp.values import Envelope, RecipientResult, SendResult

__all__ = ["Envelope", "Gate", "Prepared", "RecipientResult", "Reply", "SendResult", "Session",
           "Wire", "rcpt_lines"]

Gate = Callable[[int], bool]
"""``gate(i)``: may envelope ``i`` of the batch start now? Asked just before its MAIL FROM."""

@dataclass(frozen=True, slots=True)
class Prepared:
    """An envelope turned into wire bytes for one server's capabilities."""

    sender: str
    mail: bytes  # "MAIL FROM:<...> params\r\n"
    mail_cmd: str  # the same, for the log
    content: bytes  # DATA: CRLF, dot-stuffed, ending in CRLF.CRLF; BDAT: CRLF line ends only


def rcpt_lines(recipients: Iterable[str]) -> list[tuple[bytes, str]]:
    """``RCPT TO`` lines as (wire bytes, log text)."""
    out = []
    for r in recipients:
        cmd = f"RCPT TO:<{r}>"
        out.append((cmd.encode() + b"\r\n", cmd))
    return out


class Reply(NamedTuple):
    """One server reply, its text decoded once where it is read.

    Exceptions raised from it carry bytes again (:attr:`raw`), as smtplib's do, so that
    handlers written for smtplib keep working.
    """

    code: int
    text: str

    @classmethod
    def read(cls, code: int, raw: bytes) -> Reply:
        return cls(code, raw.decode("utf-8", "replace"))

    @property
    def raw(self) -> tuple[int, bytes]:
        """``(code, text as bytes)``, the shape smtplib's exceptions carry."""
        return self.code, self.text.encode()


_RSET = b"RSET\r\n"
_DATA = b"DATA\r\n"
_TERMINATOR = b".\r\n"


class Wire(Protocol):
    """What a session needs from the socket (:class:`mailworker.smtp.wire.ReplyWire`)."""

    def set_deadline(self, deadline: float | None, label: str = ...) -> None: ...
    def write(self, data: bytes, *, keep_open: bool = ..., what: str | None = ...) -> None: ...
    def read_reply(self, command: str | None = None) -> tuple[int, bytes]: ...
    def peer_spoke(self) -> bool: ...
    def wait_readable(self, seconds: float) -> bool: ...
    def buffered(self) -> bool: ...
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
    mail: Reply | None = None
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, Reply] = field(default_factory=dict)
    retry: list[str] = field(default_factory=list)
    first: bool = True  # False for the part of an envelope a 452 pushed to a new transaction
    sent_at: float = 0.0  # BDAT: when the write carrying it started (the reply log's latency)

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


def _not_attempted(abort: _Abort) -> NotAttempted:
    return NotAttempted(f"not attempted: the connection failed on an earlier message ({abort.exc})")


def _unsent(abort: _Abort, t: _Txn) -> BaseException:
    """The error of a transaction never written when the connection failed.

    :class:`NotAttempted` tells the caller to send the whole envelope again, so it is only
    for an envelope's first transaction. The part of an envelope a 452 pushed to a later
    transaction follows one whose recipients may have been accepted: sending the envelope
    again would give them a second copy. It gets a connection failure instead, which
    carries what was decided (``partial``) and leaves only the undecided recipients to retry.
    """
    if t.first:
        return _not_attempted(abort)
    exc = smtplib.SMTPServerDisconnected(
        f"not sent: the connection failed before this part of a 452 split ({abort.exc})")
    exc.__cause__ = abort.exc
    return exc


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
        go out and its reply is read (with BDAT: the transactions already written are read
        to the end). The caller uses this to stop at a lost lease.
        """
        outcomes = self._outcomes = [_Outcome(env) for env in envelopes]
        self._gate = gate
        todo: deque[_Txn] = deque()
        for i, (env, prep) in enumerate(zip(envelopes, prepared, strict=True)):
            if isinstance(prep, BaseException):  # refused before sending (SIZE, SMTPUTF8)
                failure = failure_of(prep)
                outcomes[i].decide(env.recipients, failure.code, failure.text, Stage.MAIL)
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
                    reply = self._read(cur, Stage.MAIL, "<dot>", started)
                    if reply.code == 421:
                        raise _Abort(smtplib.SMTPResponseException(*reply.raw), Stage.MAIL, cur)
                pending, dot = b"", None
            if cur is None:
                return
            if rset:
                self._rset_reply(cur, started)
            self._mail_reply(cur, self._read(cur, Stage.MAIL, cur.prep.mail_cmd, started))
            for rcpt, (_, cmd) in zip(cur.recipients, cur.lines, strict=True):
                self._rcpt_reply(cur, rcpt, self._read(cur, Stage.RCPT, cmd, started, rcpt))
            pending = self._data_reply(cur, self._read(cur, Stage.DATA, "DATA", started), todo)
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
            self._mail_reply(cur, self._read(cur, Stage.MAIL, cur.prep.mail_cmd, started))
            if cur.mail is None:
                for rcpt, (line, cmd) in zip(cur.recipients, cur.lines, strict=True):
                    started = self._write(line, None, cur, stage=Stage.RCPT)
                    self._rcpt_reply(cur, rcpt, self._read(cur, Stage.RCPT, cmd, started, rcpt))
            if cur.mail is None and cur.accepted:
                started = self._write(_DATA, None, cur, stage=Stage.DATA)
                pending = self._data_reply(cur, self._read(cur, Stage.DATA, "DATA", started), todo)
            else:
                pending = self._data_reply(cur, None, todo)
            if pending:
                self._still_listening(cur)
                self._final(cur, self._write(pending, cur, None, trailing=False))

    # -- reply handlers (shared by both paths) ---------------------------------------------
    def _rset_reply(self, cur: _Txn, started: float) -> None:
        code, text = self._read(cur, Stage.MAIL, "RSET", started)
        if not 200 <= code < 300:  # a server that refuses RSET is closing or confused
            exc = smtplib.SMTPSenderRefused(code, text.encode(), cur.prep.sender)
            raise _Abort(exc, Stage.MAIL, cur)
        self.needs_rset = False

    def _mail_reply(self, t: _Txn, reply: Reply) -> None:
        if 200 <= reply.code < 300:
            return
        if reply.code == 421:
            raise _Abort(smtplib.SMTPSenderRefused(*reply.raw, t.prep.sender), Stage.MAIL, t)
        t.mail = reply

    def _rcpt_reply(self, t: _Txn, rcpt: str, reply: Reply) -> None:
        if 200 <= reply.code < 300:
            t.accepted.append(rcpt)
            return
        if reply.code == 421:
            t.refused[rcpt] = reply  # BDAT: the others may be uncertain (chunking._distribute)
            refused = {r: reply.raw for r in t.recipients}
            raise _Abort(smtplib.SMTPRecipientsRefused(refused), Stage.RCPT, t)
        t.refused[rcpt] = reply
        if reply.code == 452:  # "too many recipients": these go in a transaction of their own
            t.retry.append(rcpt)

    def _data_reply(self, t: _Txn, reply: Reply | None, todo: deque[_Txn]) -> bytes:
        """Settle everything decided before the dot; return the bytes to send next."""
        oc = self._outcomes[t.index]
        oc.transactions += 1
        code = reply.code if reply is not None else None
        if reply is not None and code == 421:
            raise _Abort(smtplib.SMTPDataError(*reply.raw), Stage.DATA, t)
        go_on = t.mail is None and bool(t.accepted) and code == 354
        retry = set(t.retry) if go_on else set()
        for rcpt, refusal in t.refused.items():
            if rcpt not in retry:
                oc.decide((rcpt,), *refusal, Stage.RCPT)
        exc: smtplib.SMTPException | None = None
        if t.mail is not None:
            exc = smtplib.SMTPSenderRefused(*t.mail.raw, t.prep.sender)
            oc.decide(t.recipients, *t.mail, Stage.MAIL)
            stage = Stage.MAIL
        elif not t.accepted:
            refused = {r: reply.raw for r, reply in t.refused.items()}
            exc, stage = smtplib.SMTPRecipientsRefused(refused), Stage.RCPT
        elif reply is not None and reply.code != 354:
            exc, stage = smtplib.SMTPDataError(*reply.raw), Stage.DATA
            oc.decide(t.accepted, *reply, Stage.DATA)
        if exc is not None:
            oc.fail(annotate(exc, stage, self.relay))
            self.needs_rset = True
            # RFC 2920: a server may still say 354; end that empty message at once.
            return _TERMINATOR if code == 354 else b""
        if t.retry:
            todo.appendleft(_Txn(t.index, t.prep, tuple(t.retry), rcpt_lines(t.retry),
                                 first=False))
        return t.prep.content

    def _final(self, t: _Txn, started: float) -> None:
        self._after_dot(t, self._read(t, Stage.AFTER_DOT, "<dot>", started))

    def _after_dot(self, t: _Txn, reply: Reply) -> None:
        """The reply to the end of the content (the dot, or BDAT LAST) decides *t*."""
        self.dots += 1
        oc = self._outcomes[t.index]
        oc.decide(t.accepted, *reply, Stage.AFTER_DOT)
        if 200 <= reply.code < 300:
            return
        oc.fail(annotate(smtplib.SMTPDataError(*reply.raw), Stage.AFTER_DOT, self.relay))
        if reply.code == 421:  # the message is refused, and the connection is going away
            oc.fatal = True
            raise _Abort(smtplib.SMTPDataError(*reply.raw), Stage.AFTER_DOT, None)

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
              recipient: str | None = None) -> Reply:
        wire = self.wire
        if t is not None:
            wire.set_deadline(t.deadline, self._deadline_label)
        try:
            reply = Reply.read(*wire.read_reply(command))
        except (OSError, smtplib.SMTPServerDisconnected) as err:
            raise _Abort(err, stage, t) from err
        log = self.log
        if log.enabled:
            mid = self._outcomes[t.index].envelope.message_id if t is not None else None
            log.reply(command, reply.code, reply.text, started, self.clock(), message_id=mid,
                      recipient=recipient)
        return reply

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
                exc, stage = _unsent(abort, t), Stage.MAIL
            self._fail_on(t, exc, stage)

    def _fail_on(self, t: _Txn, exc: BaseException, stage: Stage) -> None:
        """The connection failed on *t*: *exc* is its envelope's error; undecided recipients
        get its code and text."""
        oc = self._outcomes[t.index]
        oc.error, oc.fatal = annotate(exc, stage, self.relay), True
        failure = failure_of(exc)
        undecided = [r for r in t.recipients if r not in oc.decided]
        oc.decide(undecided, failure.code, failure.text, stage)

    def _entry(self, oc: _Outcome) -> SendResult | BaseException:
        env = oc.envelope
        results = tuple(oc.decided.get(r) or RecipientResult(r, None, "not attempted", None,
                                                             Stage.MAIL) for r in env.recipients)
        result = SendResult(env, results, oc.transactions)
        if oc.error is None or (not oc.fatal and result.accepted):
            return result
        return attach_partial(oc.error, result)
