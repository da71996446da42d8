"""An in-process outbox for an application's own tests: no Redis, no worker, no SMTP.

While an :class:`Outbox` records (``with record_messages() as outbox:``, or the
``mailworker_outbox`` pytest fixture), every message the app hands to mailworker, through
:func:`mailworker.send`, the Django backend or the Flask extension, is delivered at once,
in the calling thread:

* it is built and checked by the real code (:func:`mailworker.api.prepare_many`), with the
  app's own settings, so a bad address or an unknown relay fails in tests as in production;
* each attempt's result goes through the real retry policy
  (:func:`mailworker.outcome.apply_result`), so recipient states, dead letters and
  backoffs are the ones a worker would record; :meth:`Outbox.add_fault` makes the "relay"
  refuse (the same :class:`~mailworker.testing.Fault` values the test SMTP server takes);
* the delivery hooks fire (``@mailworker.on("delivered")``, Django's signals), in the test.

Deferred mail (a 4xx, or ``send_at``/``delay`` in the future) waits for :meth:`Outbox.advance`
or :meth:`Outbox.drain`, which move the outbox's clock as the scheduler's waits would.
What the outbox leaves out is the transport: connections, pipelining and the broker; test
those against :class:`~mailworker.testing.SMTPTestServer` and a real worker.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import smtplib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from functools import cached_property
from typing import Any

from mailworker.hooks import hooks
from mailworker.outcome import apply_expiry, apply_result
from mailworker.policy import Policy
from mailworker.policy_config import policy_of
from mailworker.smtp import Envelope, RecipientResult, SendResult
from mailworker.smtp.errors import Stage, annotate, enhanced_code_of
from mailworker.store import MessageState, Record

from .faults import Fault, FaultBook

__all__ = ["Outbox", "SentMessage", "record_messages"]

_REPLY_VERBS = ("MAIL", "RCPT", "DATA", "DOT")


@dataclass(frozen=True)
class SentMessage:
    """One copy the outbox delivered: the envelope and the exact bytes a relay would get."""

    #: mailworker's id for the message (what ``send()`` returned).
    id: str
    #: The envelope sender (MAIL FROM).
    sender: str
    #: The envelope recipients this copy was delivered to (Bcc included; refused ones not).
    recipients: tuple[str, ...]
    #: The RFC 5322 message as it would go over SMTP.
    data: bytes
    queue: str
    relay: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def message(self) -> EmailMessage:
        """The message parsed with ``email.policy.default`` (headers decoded, and line
        ends as ``\n``, so ``get_content()`` compares equal to the text that was sent)."""
        parsed = email.message_from_bytes(self.data.replace(b"\r\n", b"\n"),
                                          policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))


class Outbox:
    """Delivers accepted mail in-process and remembers it; see the module docstring.

    It is a sequence of the delivered :class:`SentMessage` copies (``len(outbox)``,
    ``outbox[0].subject``), in delivery order; :meth:`status` and :meth:`record` tell each
    message's and recipient's state, delivered or not.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a delivery hook may itself send mail
        self._sent: list[SentMessage] = []
        self._records: dict[str, tuple[Record, bytes]] = {}
        self._keys: dict[str, str] = {}
        self._faults = FaultBook()
        self._offset = 0.0

    # -- what tests read ---------------------------------------------------------------

    @property
    def messages(self) -> list[SentMessage]:
        """The delivered copies, oldest first (a snapshot)."""
        with self._lock:
            return list(self._sent)

    def __len__(self) -> int:
        return len(self._sent)

    def __iter__(self) -> Iterator[SentMessage]:
        return iter(self.messages)

    def __getitem__(self, index: int) -> SentMessage:
        return self.messages[index]

    def record(self, message_id: str) -> Record | None:
        """The message's record as a worker would have left it (live, not a copy)."""
        with self._lock:
            entry = self._records.get(message_id)
            return entry[0] if entry else None

    def status(self, message_id: str) -> dict[str, Any] | None:
        """What :func:`mailworker.status` returns for the message (it asks the outbox
        while one records)."""
        rec = self.record(message_id)
        return rec.summary() if rec else None

    def ids(self, state: MessageState | str | None = None) -> list[str]:
        """Ids of the accepted messages, oldest first; only those in *state* if given."""
        wanted = MessageState(state) if state is not None else None
        with self._lock:
            return [mid for mid, (rec, _) in self._records.items()
                    if wanted is None or rec.state is wanted]

    # -- what tests change ---------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Make the relay answer MAIL, RCPT, DATA or the final dot with *fault*'s reply.

        Only reply faults apply (there is no connection to drop or slow down here), with
        the test server's semantics: ``match`` narrows to a sender or recipient, and
        ``times`` limits how often the fault fires.
        """
        if fault.kind != "reply" or fault.on not in _REPLY_VERBS:
            raise ValueError(
                f"the outbox has no SMTP session, so it takes only Fault.reply on "
                f"{', '.join(_REPLY_VERBS)}, not {fault.kind} on {fault.on}; use "
                "SMTPTestServer for connection-level faults")
        self._faults.add(fault)

    def clock(self) -> float:
        """The outbox's time: real time, moved forward by :meth:`advance`."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> int:
        """Move the clock forward and deliver what is then due; returns attempts made."""
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, not {seconds}")
        with self._lock:
            self._offset += seconds
            return self._run_due()

    def drain(self, limit: int = 1000) -> int:
        """Retry deferred mail until every message is delivered or dead, jumping the clock
        to each next due time as the scheduler would; returns the attempts made."""
        done = 0
        with self._lock:
            while done < limit:
                due = [rec.next_attempt_at for rec, _ in self._records.values()
                       if rec.state is MessageState.DEFERRED and rec.next_attempt_at]
                if not due:
                    return done
                self._offset += max(0.0, min(due) - self.clock())
                done += self._run_due()
        raise RuntimeError(
            f"drain: mail still deferred after {limit} attempts; a fault that never stops "
            "and costs no attempt (a 421, say) keeps mail waiting until its lifetime ends: "
            "give the fault times=..., or use advance()")

    def clear(self) -> None:
        """Forget delivered copies, records, idempotency keys and faults."""
        with self._lock:
            self._sent.clear()
            self._records.clear()
            self._keys.clear()
            self._faults.reset()

    # -- the mailworker.api hook ---------------------------------------------------------

    def accept(self, items: Sequence[tuple[Record, bytes]]) -> list[str]:
        """Take a validated batch (all of it: it was checked before), deliver what is due."""
        ids = []
        with self._lock:
            for given, raw in items:
                key = given.idempotency_key
                if key is not None and key in self._keys:
                    ids.append(self._keys[key])  # the same key sends once, as in Redis
                    continue
                if key is not None:
                    self._keys[key] = given.id
                # What a worker reads back from Redis, not the caller's objects: hooks and
                # status() then see JSON values (lists for tuples) as they were at send(),
                # and the record's serialization is exercised by app tests too.
                rec = Record.from_json(given.to_json())
                self._records[rec.id] = (rec, raw)
                ids.append(rec.id)
                if rec.state is MessageState.QUEUED:
                    self._deliver(rec, raw)
        return ids

    # -- delivery ------------------------------------------------------------------------

    def _run_due(self) -> int:
        now = self.clock()
        due = [(rec, raw) for rec, raw in self._records.values()
               if rec.state is MessageState.DEFERRED and (rec.next_attempt_at or 0) <= now]
        for rec, raw in due:
            self._deliver(rec, raw)
        return len(due)

    def _deliver(self, rec: Record, raw: bytes) -> None:
        """Attempts until the record is final or waiting (a 452 split retries at once)."""
        from mailworker.runtime import get_runtime

        settings = get_runtime().settings
        q = settings.queues.get(rec.queue)
        base = policy_of(settings)
        policy: Policy = (base.with_limits(max_attempts=q.max_attempts, lifetime=q.lifetime)
                          if q else base)
        while True:
            now = self.clock()
            if now >= rec.expires_at:
                apply_expiry(rec, now)
                break
            rcpts = tuple(r.address for r in rec.open_recipients)
            result = self._transaction(rec, raw, rcpts)
            apply_result(rec, result, policy=policy, now=now, started_at=now,
                         relay=rec.relay, worker="outbox")
            if isinstance(result, SendResult) and result.accepted:
                self._sent.append(SentMessage(
                    rec.id, rec.sender, tuple(r.recipient for r in result.accepted), raw,
                    rec.queue, rec.relay, dict(rec.metadata)))
            if rec.state.final or rec.state is MessageState.DEFERRED:
                break
        if rec.state is MessageState.DELIVERED:
            hooks.fire("delivered", rec)
        elif rec.state is MessageState.DEAD:
            hooks.fire("failed", rec)
            hooks.fire("dead_lettered", rec)

    def _transaction(self, rec: Record, raw: bytes,
                     rcpts: tuple[str, ...]) -> SendResult | BaseException:
        """What a relay with this outbox's faults answers, in the SMTP layer's terms."""

        def refusal(verb: str, subjects: Sequence[str]) -> Fault | None:
            fault = self._faults.take("reply", verb, subjects, 0)
            return fault if fault is not None and (fault.code or 0) >= 400 else None

        mail = refusal("MAIL", [rec.sender])
        if mail is not None:
            return annotate(smtplib.SMTPSenderRefused(mail.code or 0, mail.text.encode(),
                                                      rec.sender), Stage.MAIL, rec.relay)
        results: dict[str, RecipientResult] = {}
        for addr in rcpts:
            fault = refusal("RCPT", [addr])
            if fault is not None:
                results[addr] = RecipientResult(addr, fault.code, fault.text,
                                                enhanced_code_of(fault.text), Stage.RCPT)
        accepted = [a for a in rcpts if a not in results]
        if not accepted:
            refused = {a: (r.code or 0, r.text.encode()) for a, r in results.items()}
            return annotate(smtplib.SMTPRecipientsRefused(refused), Stage.RCPT, rec.relay)
        for verb, stage in (("DATA", Stage.DATA), ("DOT", Stage.AFTER_DOT)):
            fault = refusal(verb, [rec.sender, *accepted])
            if fault is not None:
                return annotate(smtplib.SMTPDataError(fault.code or 0, fault.text.encode()),
                                stage, rec.relay)
        for addr in accepted:
            results[addr] = RecipientResult(addr, 250, "2.0.0 Ok: delivered to the outbox",
                                            "2.0.0", Stage.AFTER_DOT)
        envelope = Envelope(rec.sender, rcpts, raw, message_id=rec.id)
        return SendResult(envelope, tuple(results[a] for a in rcpts), transactions=1)


@contextlib.contextmanager
def record_messages() -> Iterator[Outbox]:
    """Deliver mail into a fresh :class:`Outbox` for the duration of the block.

    Like Flask-Mail's ``record_messages()``; nested blocks each get their own outbox and
    the outer one is back in force when the inner one ends.
    """
    from mailworker import api

    outbox = Outbox()
    previous, api.outbox = api.outbox, outbox
    try:
        yield outbox
    finally:
        api.outbox = previous
