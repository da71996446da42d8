"""Plain values of the SMTP layer: where a session failed, what to send, what came back.

Kept below :mod:`mailworker.smtp.errors` (whose :class:`~mailworker.smtp.errors.Failure`
carries a partial :class:`SendResult`) and :mod:`mailworker.smtp.pipeline` (which makes
them), so that neither imports the other.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BEFORE_MAIL", "Envelope", "RecipientResult", "SendResult", "Stage"]


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
