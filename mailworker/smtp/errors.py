"""SMTP failures in smtplib's own vocabulary, with the facts the retry policy needs attached.

We raise the standard library's classes (``SMTPServerDisconnected``, ``SMTPDataError``, ...)
because that is the vocabulary users and the retry policy already speak. Where the SMTP
layer catches or raises one, :func:`annotate` attaches one typed :class:`Failure` to it:
class, reply code, RFC 3463 enhanced code (``"5.1.1"``), decoded text, the :class:`Stage`
it happened at and the relay's name. Everything downstream (the retry policy, the record,
the CLI) reads it with :func:`failure_of`, which also builds one for an exception nobody
annotated, so the facts are derived in one place.

A lost reply after the final dot is :class:`DeliveryUncertain`, a subclass of
``SMTPServerDisconnected``: the server may have queued the message (RFC 1047), so it is
retried but flagged ``possible_duplicate``.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from mailworker.smtp.values import BEFORE_MAIL, SendResult, Stage

__all__ = [
    "BEFORE_MAIL",
    "CleartextAuthRefused",
    "DeliveryUncertain",
    "Failure",
    "NotAttempted",
    "ProtocolError",
    "ReplyTimeout",
    "Stage",
    "TLSConfigurationError",
    "annotate",
    "attach_partial",
    "enhanced_code_of",
    "failure_of",
]


_ENHANCED_RE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_code_of(text: str | bytes | None) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text, if any."""
    if text is None:
        return None
    m = _ENHANCED_RE.match(_decode(text))
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None


class DeliveryUncertain(smtplib.SMTPServerDisconnected):
    """The connection failed after the final dot, before the server's reply.

    The server may or may not have queued the message. Retrying is right (losing mail is
    worse), but the retry may deliver a second copy, so it is flagged.
    """

    possible_duplicate = True


class NotAttempted(smtplib.SMTPServerDisconnected):
    """The connection failed before any content of this message reached the server.

    Used for the messages of a batch (``send_many``) that come after the one the
    connection failed on: their commands may have been written, but no content and no
    final dot. Safe to send again at once on another connection, and not the message's
    fault, so a retry policy need not count it as an attempt.
    """

    possible_duplicate = False


class ReplyTimeout(smtplib.SMTPServerDisconnected, TimeoutError):  # noqa: N818 - like PoolTimeout
    """No complete reply within its wall-clock bound (``timeout``, ``setup_timeout`` or the
    transaction ``deadline``); the connection is closed. A server that trickles a reply a
    byte at a time ends here too, not just a silent one."""


class ProtocolError(smtplib.SMTPServerDisconnected):
    """The server broke the reply syntax or its limits (a malformed line, a line over
    :data:`~mailworker.smtp.replylog.MAX_LINE` bytes, a reply over
    :data:`~mailworker.smtp.replylog.MAX_LINES` lines). Replies would be out of step, so
    the connection is closed and never reused."""


class TLSConfigurationError(ssl.SSLError):
    """The relay's own TLS settings cannot be used (``ca_file`` missing, unreadable or not
    PEM). Nothing was sent: a configuration problem at stage ``tls`` (the relay is paused
    and the mail kept), never a delivery that might have happened."""


class CleartextAuthRefused(smtplib.SMTPException):
    """mailworker itself refused to send credentials over an unencrypted connection.

    Not a server reply: nothing was sent. The fix is TLS (``smtps://``,
    ``smtp+starttls://``) or, knowingly, ``allow_plain_auth=true``. Raised at stage
    ``auth``, where the retry policy pauses the relay and keeps the mail.
    """


E = TypeVar("E", bound=BaseException)
_T = TypeVar("_T")


def _decode(text: str | bytes | None) -> str:
    """Reply text as ``str``; smtplib hands out bytes, our own code mostly str."""
    if text is None:
        return ""
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _single(values: Iterable[_T]) -> _T | None:
    """The one value all items share, else None (the "single code" rule of a refusal)."""
    found = set(values)
    return found.pop() if len(found) == 1 else None


# Where smtplib raises each class, for exceptions nobody annotated with a stage.
# SMTPDataError may also come after the dot; the default rules treat both alike.
_IMPLIED_STAGE: tuple[tuple[type[BaseException], Stage], ...] = (
    (DeliveryUncertain, Stage.AFTER_DOT), (smtplib.SMTPConnectError, Stage.GREETING),
    (smtplib.SMTPHeloError, Stage.EHLO), (smtplib.SMTPAuthenticationError, Stage.AUTH),
    (smtplib.SMTPSenderRefused, Stage.MAIL), (smtplib.SMTPRecipientsRefused, Stage.RCPT),
    (smtplib.SMTPDataError, Stage.DATA),
)

# The smtplib class a bare reply at each stage would have been raised as.
_REPLY_KIND: dict[Stage, type[BaseException]] = {
    Stage.MAIL: smtplib.SMTPSenderRefused, Stage.RCPT: smtplib.SMTPRecipientsRefused,
    Stage.DATA: smtplib.SMTPDataError, Stage.AFTER_DOT: smtplib.SMTPDataError,
    Stage.GREETING: smtplib.SMTPConnectError, Stage.EHLO: smtplib.SMTPHeloError,
    Stage.AUTH: smtplib.SMTPAuthenticationError,
}


@dataclass(frozen=True, slots=True)
class Failure:
    """The facts about one SMTP failure, built once where it is caught.

    ``kind`` is the exception class (the retry policy matches on it, by ``issubclass``);
    ``text`` the decoded reply text (or the exception's message when no reply came);
    ``partial`` the per-recipient result of an envelope whose earlier transaction (a 452
    split) was accepted before this failure.
    """

    kind: type[BaseException]
    code: int | None = None
    enhanced_code: str | None = None
    text: str = ""
    stage: Stage | None = None
    relay: str | None = None
    possible_duplicate: bool = False
    partial: SendResult | None = None

    @property
    def error(self) -> str:
        """The exception class name, as the policy table and the record spell it."""
        return self.kind.__name__

    @property
    def summary(self) -> str:
        """One line fit for a status record or a log line: ``"550 5.7.1 ..."`` for a
        reply, ``"ClassName: message"`` otherwise."""
        if self.code is not None and issubclass(self.kind, smtplib.SMTPResponseException):
            return f"{self.code} {self.text}".strip()
        return f"{self.error}: {self.text}" if self.text else self.error

    def as_dict(self) -> dict[str, Any]:
        """The record's ``error`` entry of an attempt."""
        return {"class": self.error, "code": self.code, "enhanced_code": self.enhanced_code,
                "stage": self.stage.value if self.stage else None, "text": self.summary}

    @classmethod
    def reply(cls, code: int | None, text: str | bytes, stage: Stage | None,
              relay: str | None = None, enhanced_code: str | None = None) -> Failure:
        """A refusal the server replied (one recipient's RCPT, say), as the class smtplib
        raises for a reply at that stage."""
        text = _decode(text)
        kind = _REPLY_KIND.get(stage, smtplib.SMTPResponseException) if stage else \
            smtplib.SMTPResponseException
        return cls(kind, code,
                   enhanced_code or enhanced_code_of(text), text, stage, relay)

    @classmethod
    def of(cls, exc: BaseException, stage: Stage | None = None, relay: str | None = None,
           enhanced_code: str | None = None) -> Failure:
        """Read the facts off *exc* (no annotation needed; see :func:`failure_of`)."""
        code: int | None = None
        text = str(exc)
        if isinstance(exc, smtplib.SMTPResponseException):
            code, text = int(exc.smtp_code), _decode(exc.smtp_error)
        elif isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
            replies = [(int(c), _decode(t)) for c, t in exc.recipients.values()]
            code = _single(c for c, _ in replies)
            text = _single(t for _, t in replies) or replies[0][1]
            if enhanced_code is None:
                enhanced_code = _single(enhanced_code_of(t) for _, t in replies)
        if enhanced_code is None and code is not None:
            enhanced_code = enhanced_code_of(text)
        if stage is None:
            stage = next((s for k, s in _IMPLIED_STAGE if isinstance(exc, k)), None)
        duplicate = getattr(type(exc), "possible_duplicate", False) is True
        return cls(type(exc), code, enhanced_code, text, Stage(stage) if stage else None,
                   relay, duplicate)


def annotate(exc: E, stage: Stage, relay: str | None = None, enhanced_code: str | None = None,
             ) -> E:
    """Attach the :class:`Failure` of *exc* (at *stage*, on *relay*) and return *exc*.

    The first annotation wins: an exception raised deep inside the session keeps the
    stage it was raised at when an outer layer annotates it again (which may only add
    the relay's name).
    """
    known = getattr(exc, _ATTR, None)
    if isinstance(known, Failure):
        if relay is not None and known.relay is None:
            setattr(exc, _ATTR, replace(known, relay=relay))
        return exc
    setattr(exc, _ATTR, Failure.of(exc, stage, relay, enhanced_code))
    return exc


def attach_partial(exc: E, partial: SendResult) -> E:
    """Add the per-recipient result of *exc*'s envelope to its :class:`Failure`."""
    setattr(exc, _ATTR, replace(failure_of(exc), partial=partial))
    return exc


def failure_of(exc: BaseException) -> Failure:
    """The :class:`Failure` attached by :func:`annotate`; for an exception nobody
    annotated (a bug, a time limit), one read off it, with the stage smtplib implies."""
    known = getattr(exc, _ATTR, None)
    return known if isinstance(known, Failure) else Failure.of(exc)


_ATTR = "smtp_failure"
