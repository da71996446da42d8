"""Header fields from callers (``headers=``) and from ready-made messages, checked.

What may be set, and what may be in a value. Fields mailworker writes itself, and trace
and identity fields that servers write (Received, Return-Path, Resent-*), cannot be set
through ``headers=``; the error names the argument to use instead. No control character
but TAB may be in a value: mail software downstream (the stdlib's own generator among
it) treats VT, FF, FS, GS, RS, NEL, LS and PS as line breaks, so they would become
injected fields when the message is written again.
"""

from __future__ import annotations

import email.errors
import email.message
import re
from collections import Counter
from collections.abc import Mapping

from mailworker import mime
from mailworker.errors import shown
from mailworker.mime import InvalidMessageError

__all__ = ["INJECTION", "check_head", "check_headers", "header_lines", "utf8"]

_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ':' (RFC 5322 ftext)
_HEAD_LINE = re.compile(rb"[!-9;-~]+:")  # a serialised field's start
_BAD_FOLD = re.compile(r"\n(?![ \t])|\r|\0")  # a line break that is not folding
_FOLD = re.compile(r"\n[ \t]")
INJECTION = "contains a line break or NUL (header injection); remove it"
# C0 controls but TAB, and DEL: invalid in a header (RFC 5322 2.2), and VT, FF, FS, GS,
# RS are line breaks to str.splitlines(), which the stdlib generator folds with.
# NEL, LS and PS are line breaks too; they are refused in ready-made messages, whose
# values are written as given (ours are RFC 2047 encoded).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PARSED_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# Parser defects that mean the header block was not read whole: a line that is not a
# field ends the headers, and it and every line after it become body text.
_HEAD_DEFECTS = (
    email.errors.MissingHeaderBodySeparatorDefect,
    email.errors.FirstHeaderLineIsContinuationDefect,
    email.errors.MisplacedEnvelopeHeaderDefect,
)
_RESERVED = {
    "from": "pass the sender as sender=...",
    "to": "pass recipients as to=...",
    "cc": "pass recipients as cc=...",
    "bcc": "pass recipients as bcc=...",
    "reply-to": "pass it as reply_to=...",
    "subject": "pass it as subject=...",
    "message-id": "pass it as message_id=...",
    "date": "pass a timestamp as date=...",
    "mime-version": "mailworker writes it",
    "sender": "pass the address as sender_header=... (the agent sending for the From author)",
    "received": "each server on the way adds its own trace field",
    "return-path": "the receiving server writes it from the envelope sender (sender=)",
}


def _reserved_hint(name: str) -> str | None:
    """Why a header may not be set through ``headers=``, or None if it may."""
    lower = name.lower()
    hint = _RESERVED.get(lower)
    if hint is None and lower.startswith("content-"):
        hint = "mailworker writes it from text=, html= and attachments="
    if hint is None and lower.startswith("resent-"):
        hint = ("Resent-* fields are added by software that re-sends a message it received; "
                "for new mail use to=, cc=, bcc= and sender=")
    return hint


def _control_error(field: str, char: str) -> InvalidMessageError:
    return InvalidMessageError(
        field, f"the value contains the control character U+{ord(char):04X}; remove it "
        "(mail software may turn it into a line break, i.e. an injected header)")


def _field_name(name: object) -> str:
    """``headers[Name]`` for an error, with an absurd name cut short."""
    return f"headers[{name if isinstance(name, str) and len(name) <= 80 else shown(name)}]"


def utf8(text: str, field: str) -> bytes:
    """*text* as UTF-8, or an error naming *field* (a lone surrogate cannot be sent)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError(field, f"is not valid Unicode ({exc.reason})") from None


def header_lines(headers: Mapping[str, str] | None) -> list[str]:
    """Validated ``headers=`` as header lines."""
    if headers is None:
        return []
    if not isinstance(headers, Mapping):
        raise InvalidMessageError("headers", "expected a mapping of name to value, e.g. "
                                  f"{{'X-Campaign': 'spring'}}, got {type(headers).__name__}")
    lines = []
    for name, value in headers.items():
        field = _field_name(name)
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidMessageError(
                field, "a header name is printable ASCII without spaces or ':', e.g. X-Campaign"
            )
        hint = _reserved_hint(name)
        if hint:
            raise InvalidMessageError(field, f"{name} cannot be set through headers=; {hint}")
        if not isinstance(value, str):
            raise InvalidMessageError(field, f"expected a string value, got {type(value).__name__}")
        if mime.BREAKS.search(value):
            raise InvalidMessageError(field, f"the value {INJECTION}")
        control = _CONTROL.search(value)
        if control:
            raise _control_error(field, control[0])
        utf8(value, field)
        if not value.isascii():
            lines.append(mime.unstructured(name, value))
        elif mime.longest_word(value) > mime.HARD_LIMIT - len(name) - 4:
            raise InvalidMessageError(
                field, "the value has too long a run without spaces: header lines are limited "
                "to 998 octets (RFC 5322 2.1.1) and can only be folded at spaces; shorten it"
            )
        else:
            lines.append(f"{name}: {mime.fold(value, len(name) + 2)}\r\n")
    return lines


def check_headers(msg: email.message.Message) -> None:
    """Refuse header names and values that would inject headers when serialised.

    ``compat32`` messages (``email.mime``, Django) store any value; a line break is only
    allowed as folding, i.e. followed by a space or tab. The stdlib generator refolds a
    parsed value with ``str.splitlines()``, so VT, FF, FS, GS, RS, NEL, LS and PS would
    become line breaks on the wire: refused like any other control character.
    """
    for part in msg.walk():
        for defect in part.defects:
            if isinstance(defect, _HEAD_DEFECTS):
                raise InvalidMessageError(
                    "message", f"its header block is malformed ({type(defect).__name__}): a "
                    "line in it is not a header field (e.g. 'BCC : x', a space before the "
                    "colon), so that line and every one after it would be sent as body text; "
                    "fix the source")
        for name, value in part.raw_items():
            field = _field_name(name)
            if not _HEADER_NAME.fullmatch(name):
                raise InvalidMessageError(field, "a name is printable ASCII without spaces or ':'")
            text = str(value).replace("\r\n", "\n")
            if _BAD_FOLD.search(text):
                raise InvalidMessageError(field, f"the value {INJECTION}")
            control = _PARSED_CONTROL.search(_FOLD.sub(" ", text))
            if control:
                raise _control_error(field, control[0])


def check_head(head: bytes, msg: email.message.Message) -> None:
    """The serialised header block holds exactly the message's own fields.

    A second line of defence after :func:`check_headers`: whatever a policy's folding
    does to a value, no new field may appear on the wire.
    """
    names: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            continue
        if not _HEAD_LINE.match(line):
            raise InvalidMessageError("message", "serialising it produced a header line that "
                                      f"is not a field: {shown(line)}")
        names.append(line.partition(b":")[0].lower())
    expected = Counter(name.lower().encode("ascii") for name in msg)
    if Counter(names) != expected:
        raise InvalidMessageError("message", "serialising it changed its header fields "
                                  "(a value holds a line break); fix the source")
