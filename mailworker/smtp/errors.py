"""SMTP failures in smtplib's own vocabulary, with the facts the retry policy needs attached.

We raise the standard library's classes (``SMTPServerDisconnected``, ``SMTPDataError``, ...)
because that is the vocabulary users and the retry policy already speak. Each raised
exception carries three extra attributes, set by :func:`annotate`:

* ``stage``: where in the session it happened (:class:`Stage`),
* ``enhanced_code``: the RFC 3463 status code from the reply text, e.g. ``"5.1.1"``,
* ``relay``: the relay's name.

A lost reply after the final dot is :class:`DeliveryUncertain`, a subclass of
``SMTPServerDisconnected``: the server may have queued the message (RFC 1047), so it is
retried but flagged ``possible_duplicate``.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from enum import StrEnum
from typing import TypeVar

__all__ = [
    "BEFORE_MAIL",
    "CleartextAuthRefused",
    "DeliveryUncertain",
    "NotAttempted",
    "ProtocolError",
    "ReplyTimeout",
    "Stage",
    "TLSConfigurationError",
    "annotate",
    "enhanced_code_of",
    "error_code",
    "error_enhanced_code",
    "error_stage",
    "error_text",
]


class Stage(StrEnum):
    """Where in an SMTP session a failure happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    AFTER_DOT = "after-dot"

    @property
    def before_dot(self) -> bool:
        """True when no message content can have been accepted yet: safe to retry."""
        return self is not Stage.AFTER_DOT


BEFORE_MAIL = frozenset({Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.TLS, Stage.AUTH})
"""Stages of session set-up: a failure here means no MAIL FROM was sent on the connection."""


_ENHANCED_RE = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_code_of(text: str | bytes | None) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text, if any."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    m = _ENHANCED_RE.match(text)
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


def annotate(exc: E, stage: Stage, relay: str | None = None, enhanced_code: str | None = None) -> E:
    """Attach ``stage``, ``relay`` and ``enhanced_code`` to *exc* and return it.

    The first annotation wins: an exception raised deep inside the session keeps the
    stage it was raised at when an outer layer annotates it again.
    """
    if getattr(exc, "stage", None) is None:
        exc.stage = Stage(stage)  # type: ignore[attr-defined]
    if relay is not None and getattr(exc, "relay", None) is None:
        exc.relay = relay  # type: ignore[attr-defined]
    if getattr(exc, "enhanced_code", None) is None:
        code = enhanced_code
        if code is None and isinstance(exc, smtplib.SMTPResponseException):
            code = enhanced_code_of(exc.smtp_error)
        exc.enhanced_code = code  # type: ignore[attr-defined]
    return exc


def error_stage(exc: BaseException) -> Stage | None:
    stage = getattr(exc, "stage", None)
    return Stage(stage) if stage is not None else None


def error_code(exc: BaseException) -> int | None:
    """The SMTP reply code an exception carries, if it carries one."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return int(exc.smtp_code)
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        codes = {int(c) for c, _ in exc.recipients.values()}
        return codes.pop() if len(codes) == 1 else None
    return None


def error_enhanced_code(exc: BaseException) -> str | None:
    code = getattr(exc, "enhanced_code", None)
    if code:
        return str(code)
    if isinstance(exc, smtplib.SMTPResponseException):
        return enhanced_code_of(exc.smtp_error)
    return None


def error_text(exc: BaseException) -> str:
    """A one-line description fit for a status record or a log line."""
    if isinstance(exc, smtplib.SMTPResponseException):
        err = exc.smtp_error
        text = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
        return f"{exc.smtp_code} {text}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
