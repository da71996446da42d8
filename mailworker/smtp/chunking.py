"""Whole transactions pipelined with BDAT (RFC 3030 CHUNKING): a window of messages in flight.

Why: with DATA, RFC 2920 makes the client wait for the 354 before it sends the content,
so a connection can never beat one round trip per message. ``BDAT <n> LAST`` carries its
length instead of waiting for permission, so MAIL, every RCPT, ``BDAT n LAST`` and the
content of one message, and of the next ones, can all go out before any reply is read. A
connection keeps up to ``pipeline_window`` transactions in flight (a relay option; 8 by
default): at 10 ms reply latency that is up to 8 messages per round trip instead of one.
Each write carries whole transactions, up to :data:`WRITE_BYTES` (then the next write
follows at once), and the window is refilled once the replies already received are read.
Used only when the server offers both PIPELINING and CHUNKING and the relay's options
(``pipelining``, ``chunking``) allow it; otherwise :mod:`mailworker.smtp.pipeline`'s DATA
paths run, unchanged. BINARYMIME is not used: the content is the same CRLF text DATA
would carry, without dot-stuffing and without the terminator (the length frames it).

Everything else is :class:`~mailworker.smtp.pipeline.Session`'s: replies are read
strictly in order and matched to their transaction (RSET, MAIL, each RCPT, then the BDAT
reply), with the same reply handlers, per-recipient results, 452 splits (the deferred
recipients go in a later transaction, after those already in flight), one reply-log
event per reply, the transaction deadline (from when the transaction is written) and
``dots`` (a BDAT LAST reply counts like the reply after the dot). The gate is asked
right before an envelope's MAIL FROM is written, which may now be before the replies to
earlier transactions arrive; when it says stop, the transactions already written are
still read to the end.

After a failed transaction no RSET is sent. The server answers every BDAT, even one
whose MAIL or every RCPT it refused, and then discards its bytes (RFC 3030 section 2:
"the receiver-SMTP MUST accept and discard the associated message data before sending
the appropriate 5XX or 4XX code", and MUST be prepared to discard BDAT chunks already in
the pipeline). The reply to BDAT LAST ends the transaction whatever it says, as the
reply after DATA's dot does (RFC 5321 4.1.1.4): Postfix's smtpd answers such a BDAT LAST
with ``503 5.5.1 Error: need RCPT command`` (MAIL refused) or ``554 5.5.1 Error: no
valid recipients`` and then resets the MAIL transaction (``skip_bdat()`` calls
``mail_reset()`` on a final chunk), so the next MAIL is welcome. An RSET could not be
placed in time anyway: when the failure is read the next MAIL is usually written already.
(So ``needs_rset``, which the shared reply handlers set after a failure, is cleared.)

When the connection fails (lost, a 421, a timeout, a malformed reply) with transactions
in flight: each transaction whose BDAT LAST was (possibly) written and whose final reply
was not read is :class:`~mailworker.smtp.errors.DeliveryUncertain` at stage
``after-dot`` (the server may have queued it; the duplicate budget applies downstream),
unless a refusal read earlier already decided it (MAIL refused, or every RCPT refused):
it keeps that refusal. The transaction a 421 answered at MAIL gets the 421, as on the
DATA path (no transaction was open). A 421 to a RCPT is that recipient's refusal, but
unlike on the DATA path the content was already written behind it: the recipients
accepted before it, or whose replies were not read, are uncertain (a server that said
421 and carried on would otherwise get the message twice). Transactions never written are
:class:`~mailworker.smtp.errors.NotAttempted`, except the later part of a 452 split (its
envelope's accepted recipients must not get a second copy: a connection failure that
carries them as ``partial``). The pool's "stale connection" retry (a disconnect or 421 at
the first MAIL of a reused connection) is taken only when nothing after that first
transaction is uncertain.

A failed write is judged by the bytes the kernel took (``wire.sent``): a transaction
whose content ended within them counts as written (the server may have it all); one
whose content was cut cannot have been accepted (the server never had its whole chunk),
so it is a plain connection failure at stage ``data``, like a DATA transaction whose
final dot was never sent. After a failed write nothing more is written, but the replies
the server sent before it went away are still read, in order, until the connection
gives out or the first cut transaction: the transactions they answer are decided by
them, the rest in flight are uncertain. A write that timed out (the server stopped
reading) is treated the same, with :data:`DRAIN` seconds to read what had arrived.

The stale pooled connection: a server may close an idle connection just as the next
window is written, too late for the pool's idle poll to see. With DATA that is a clean
failure before any content; with BDAT the whole window would be written and uncertain.
So a batch that follows :data:`PROBE_IDLE` seconds of silence first writes only its first
transaction's MAIL and RCPT and reads the MAIL reply (one round trip, only when the
connection is not busy; the pool's NOOP covers ``noop_after`` and longer). A server that
goes away later than that, or without an idle spell (shutdown, restart), costs up to a
window of possible duplicates: the price of BDAT's round trips, bounded by
``pipeline_window``.

Not guarded against (inherent to pipelining, RFC 2920 section 3.1): a server that sends
more replies than commands puts every later reply of the batch on the wrong command. The
extra reply is seen at the next batch at the latest (the server "spoke before MAIL"): the
connection is closed before anything of that batch is written, never reused out of step.
"""

from __future__ import annotations

import smtplib
from collections import deque
from collections.abc import Callable

from mailworker.smtp.errors import DeliveryUncertain, ReplyTimeout, Stage
from mailworker.smtp.pipeline import Reply, Session, Wire, _Abort, _Txn, _unsent
from mailworker.smtp.replylog import ReplyLog

__all__ = ["DEFAULT_WINDOW", "ChunkingSession"]

DEFAULT_WINDOW = 8
"""Transactions in flight per connection (the relay option ``pipeline_window``)."""

WRITE_BYTES = 1 << 20
"""A write carries whole transactions up to this many bytes (then the next write follows
at once), so a window of large messages is not one huge buffer: each write's deadline is
the oldest transaction's in flight, and the later ones get theirs when they are written."""

PROBE_IDLE = 1.0
"""Seconds idle after which a connection's next batch proves the server is still there
before any content goes out (see :meth:`ChunkingSession._probe`)."""

PROBE_WAIT = 2.0
"""How long the probe waits for its MAIL reply before it goes on as if it had not probed:
a server that holds its replies until the group ends (against RFC 2920 section 3.2) or
checks the sender slowly must not cost a timeout."""

DRAIN = 0.5
"""After a write timed out (the server stopped reading), seconds left to read the replies
it sent before: they are normally here already; they decide their transactions."""

_REPLIES = (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused)
_GO_ON = Reply(354, "")  # a BDAT LAST accepted: settle the envelope as after a DATA 354


class ChunkingSession(Session):
    """A :class:`Session` whose pipelined path is BDAT with a window of transactions."""

    def __init__(self, wire: Wire, log: ReplyLog, *, relay: str, deadline: float,
                 window: int, clock: Callable[[], float]) -> None:
        super().__init__(wire, log, relay=relay, deadline=deadline, pipelining=True,
                         clock=clock)
        self.window = max(1, window)
        self.idle = 0.0  # seconds the connection sat idle before this batch (set by its owner)
        self._inflight: deque[_Txn] = deque()  # written, final reply not read; oldest first
        self._probed: _Txn | None = None  # its MAIL reply was read before its BDAT was written
        self._cut: set[_Txn] = set()  # in a failed write that ended before its content did

    def _pipelined(self, todo: deque[_Txn]) -> None:
        inflight = self._inflight
        inflight.clear()
        self._cut.clear()
        broken: smtplib.SMTPServerDisconnected | None = None  # a write failed or timed out
        head = self._probe(todo) if self.idle >= PROBE_IDLE else None
        self.idle = 0.0
        while True:
            parts: list[bytes] = []
            ends: list[tuple[_Txn, int]] = []  # where each transaction's content ends
            size = 0  # of this write
            # Refill once the replies already received are read: one write for many.
            while broken is None and len(inflight) < self.window and not (
                    inflight and self.wire.buffered()) and size < WRITE_BYTES:
                if head is not None:  # MAIL and RCPT went out with the probe
                    cur, head = head, None
                    parts += (b"BDAT %d LAST\r\n" % len(cur.prep.content), cur.prep.content)
                else:
                    nxt = self._cur = self._next(todo)  # asks the gate
                    if nxt is None:
                        break
                    cur = nxt
                    cur.deadline = self.clock() + self.deadline
                    parts += (cur.prep.mail, *(line for line, _ in cur.lines),
                              b"BDAT %d LAST\r\n" % len(cur.prep.content), cur.prep.content)
                size = sum(map(len, parts))
                ends.append((cur, size))
                inflight.append(cur)  # before the write: a failed write may have sent it
            if parts:
                # A write is bounded by the oldest deadline in flight: its reply waits on it.
                self.wire.set_deadline(inflight[0].deadline, self._deadline_label)
                broken = self._send(b"".join(parts), ends)
                if size >= WRITE_BYTES:  # a full write: go on filling before reading
                    continue
            if not inflight or (broken is not None and inflight[0] in self._cut):
                if broken is not None:
                    raise _Abort(broken, Stage.AFTER_DOT, None)
                return
            self._replies(inflight[0], todo)

    def _probe(self, todo: deque[_Txn]) -> _Txn | None:
        """After an idle spell: the first transaction's MAIL and RCPT alone, then its MAIL
        reply, before any content is written.

        Why: a server may close an idle connection in the instant between the pool's check
        (a poll for its 421 or hang-up) and our write; its FIN is still on its way. With DATA
        that costs nothing (the 354 never comes: a clean "stale connection", sent again at
        once); with BDAT the whole window, content included, would already be written and
        all of it would be a possible duplicate. Reading one reply first turns that race
        back into a clean failure at MAIL (nothing but commands sent), for one round trip
        per batch that follows at least :data:`PROBE_IDLE` seconds of silence, i.e. only
        when the connection is not busy. A server that fails later is the ordinary case of
        a connection lost mid-window. No MAIL reply within :data:`PROBE_WAIT`: the batch
        goes on without the probe (its MAIL reply is read in order later), never a stall.
        """
        cur = self._cur = self._next(todo)
        if cur is None:
            return None
        self._start(cur)
        head = b"".join([cur.prep.mail, *(line for line, _ in cur.lines)])
        cur.sent_at = started = self._write(head, None, cur)
        if self.wire.wait_readable(min(PROBE_WAIT, self.deadline)):
            self._mail_reply(cur, self._read(cur, Stage.MAIL, cur.prep.mail_cmd, started))
            self._probed = cur
        return cur  # without its MAIL reply: read in order with the rest

    def _send(self, data: bytes, ends: list[tuple[_Txn, int]]
              ) -> smtplib.SMTPServerDisconnected | None:
        """Write; a failed or timed-out write is returned, not raised.

        The server may have answered earlier transactions before it went away: their
        replies are still to be read (in order, until the connection says no more), so
        they are decided by what the server said rather than all left uncertain. After a
        write that timed out (the server stopped reading: a content filter stuck on one
        message, a full disk) the replies it sent before are read within :data:`DRAIN`
        seconds; the first one missing makes the rest in flight uncertain.

        A transaction whose content did not leave in full (its end lies past the bytes the
        kernel took, ``wire.sent``) cannot have been accepted: the server never had its
        whole chunk. It is not uncertain; it and those after it are not read.
        """
        started = self.clock()
        try:
            self.wire.write(data, keep_open=True,
                            what=f"{len(ends)} BDAT transaction(s) ({len(data)} bytes)")
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            err = exc if isinstance(exc, smtplib.SMTPServerDisconnected) else \
                smtplib.SMTPServerDisconnected(f"write failed: {exc}")
            sent = getattr(self.wire, "sent", len(data))
            self._cut.update(t for t, end in ends if end > sent)
            if isinstance(err, ReplyTimeout):
                # Even past a deadline (the write was bounded by the oldest one): a reply
                # that came while we were writing is not late.
                drain = self.clock() + DRAIN
                for t in self._inflight:
                    t.deadline = drain
                self._deadline_label = f"{DRAIN:g}s after a write timed out ({err})"
            return err
        finally:
            for t in self._inflight:
                t.sent_at = t.sent_at or started
        return None

    def _replies(self, t: _Txn, todo: deque[_Txn]) -> None:
        """Read one transaction's replies, in order, and settle its envelope."""
        started = t.sent_at
        if t is self._probed:  # read before its content was written
            self._probed = None
        else:
            self._mail_reply(t, self._read(t, Stage.MAIL, t.prep.mail_cmd, started))
        for rcpt, (_, cmd) in zip(t.recipients, t.lines, strict=True):
            self._rcpt_reply(t, rcpt, self._read(t, Stage.RCPT, cmd, started, rcpt))
        reply = self._read(t, Stage.AFTER_DOT, f"BDAT {len(t.prep.content)} LAST", started)
        self._inflight.popleft()  # its final reply is read: never uncertain from here on
        if t.mail is not None or not t.accepted:  # refused before the content: the server
            self._data_reply(t, None, todo)     # discarded it (and its BDAT reply says so)
            self.needs_rset = False  # the BDAT LAST reply ended the transaction (docstring)
            if reply.code == 421:
                raise _Abort(smtplib.SMTPDataError(*reply.raw), Stage.AFTER_DOT, None)
            return
        ok = 200 <= reply.code < 300
        self._data_reply(t, _GO_ON if ok else None, todo)  # refusals; a 452 split if ok
        self.needs_rset = False
        self._after_dot(t, reply)

    def _distribute(self, abort: _Abort, todo: deque[_Txn]) -> None:
        """The connection died: settle what is in flight (see the module docstring)."""
        written = set(self._inflight)
        replied = isinstance(abort.exc, _REPLIES)  # a 421, not a lost connection
        failing = abort.txn
        for t in dict.fromkeys(t for t in (failing, *self._inflight, *todo) if t is not None):
            oc = self._outcomes[t.index]
            if oc.fatal:
                continue
            exc: BaseException
            if t is failing and (t not in written or (replied and abort.stage is Stage.MAIL)):
                exc, stage = abort.exc, abort.stage  # nothing was written; or a 421 to MAIL
            elif t in self._cut:  # its chunk never reached the server in full
                exc = smtplib.SMTPServerDisconnected(
                    f"the write failed before the end of its content ({abort.exc})")
                exc.__cause__, stage = abort.exc, Stage.DATA
            elif t in written:
                read = len(t.accepted) + len(t.refused)
                if t.mail is not None or (read == len(t.recipients) and not t.accepted):
                    self._data_reply(t, None, todo)  # decided by a refusal read earlier
                    continue
                for rcpt, refusal in t.refused.items():
                    oc.decide((rcpt,), *refusal, Stage.RCPT)
                exc = DeliveryUncertain(f"no reply to BDAT LAST: {abort.exc}")
                exc.__cause__, stage = abort.exc, Stage.AFTER_DOT
            else:  # never written: NotAttempted (a 452 split's later part: see _unsent)
                exc, stage = _unsent(abort, t), Stage.MAIL
            self._fail_on(t, exc, stage)
        self._inflight.clear()
        self._probed = None
        self._cut.clear()
