"""Turning ``send(...)`` arguments into an SMTP envelope and raw MIME bytes, validated.

Everything that can be wrong with a message is found here, at enqueue, and reported as
:class:`InvalidMessageError` naming the field and the fix: a message that cannot be sent
must never reach the queue, where it would only fail again later. Header injection (CR/LF
in an address, subject or header) is the case that matters most.

Decisions (the syntax itself lives in :mod:`mailworker.mime` and
:mod:`mailworker.addresses`; header checks in :mod:`mailworker.headers`):

* An address argument given as a string may hold several comma-separated addresses,
  like a To header; given as a list, it holds one address per item.
* Internationalised addresses: with an ASCII local part, a non-ASCII domain is sent as
  its A-label (``xn--...``) in envelope and headers, so no SMTPUTF8 is needed; a
  non-ASCII local part needs SMTPUTF8 and is written raw (RFC 6531/6532). The address
  returned by :func:`validate_address` and kept in :attr:`BuiltMessage.recipients` is
  that envelope form.
* A non-ASCII domain is normalised as IDNA maps it (NFKC: full-width letters become
  ordinary ones; ideographic full stops are dots); one with an invisible character
  (zero-width space, soft hyphen, joiner) is refused, never kept raw or silently dropped.
* Headers we write ourselves (From, To, Cc, Bcc, Reply-To, Subject, Message-ID, Date,
  MIME-Version and every Content-* header) cannot be set through ``headers=``; the error
  names the argument to use. Trace and identity fields (Received, Return-Path, every
  Resent-*) are written by the servers along the way, never by the author: a
  ``Resent-Bcc`` set here would show a "blind" copy to everyone. ``Sender`` (the agent
  sending for the From author) has its own argument, ``sender_header=``, validated as an
  address. Non-ASCII values are RFC 2047 encoded; a control character other than TAB
  (VT, FF, FS..., DEL) is refused, because mail software downstream turns some of them
  into line breaks, i.e. injected headers. The same holds for a ready-made message's
  headers, and a message whose header block the parser could not read whole (a line
  that is not a field, such as ``BCC : x``, ends the headers and would go out as body
  text) is refused.
* ``text=""`` is an empty body; ``None`` is no body.
"""

from __future__ import annotations

import email.errors
import email.generator
import email.message
import email.policy
import io
import math
import mimetypes
import re
import secrets
import time
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from email.utils import formatdate

from mailworker import addresses, mime
from mailworker.errors import shown
from mailworker.headers import INJECTION, check_head, check_headers, header_lines, utf8
from mailworker.mime import InvalidMessageError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "Attachment",
    "BuiltMessage",
    "InvalidMessageError",
    "build_message",
    "from_email_message",
    "parse_mailbox",
    "validate_address",
]

DEFAULT_MAX_SIZE = 10 * 1024 * 1024


@dataclass(frozen=True)
class Attachment:
    """A file to attach; ``inline`` ones are shown in the HTML through ``cid:`` references.

    ``mimetype`` is guessed from the filename when None. An inline attachment without a
    ``content_id`` gets its filename as Content-ID when that is a valid id, so the HTML
    can say ``<img src="cid:logo.png">`` without knowing a generated value.
    """

    filename: str
    content: bytes | str
    mimetype: str | None = None
    inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True)
class BuiltMessage:
    """What the store keeps and the SMTP layer sends: the envelope and the exact bytes.

    ``data`` uses CRLF line endings and has no Bcc header. Like any RFC 5322 message it
    may end without a final CRLF; the SMTP layer adds one before the closing dot, as
    ``smtplib`` does. ``smtputf8`` is True when the message needs the SMTPUTF8 extension:
    an envelope address, or an address written in a header, is non-ASCII.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str
    size: int
    smtputf8: bool


AttachmentLike = Attachment | tuple[str, bytes | str] | tuple[str, bytes | str, str | None]
Addresses = str | Sequence[str]

_MIMETYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_MSG_ID = re.compile(r"<?([!-;=?-~]+@[!-;=?-~]+)>?")  # printable ASCII, no '<' or '>'
_CONTENT_ID = re.compile(r"[!-;=?-~]+")
_MAX_MESSAGE_ID = 250
# Dates RFC 5322 can write (years 1900-9999); formatdate() fails or lies outside them.
_DATES = (-2208988800.0, 253402300799.0)
# Control, format, unassigned, private-use characters and line/paragraph separators.
_NOT_IN_FILENAMES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})
_MAX_FILENAME = 255  # what file systems allow; keeps the RFC 2231 form within 998 octets
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}
def parse_mailbox(value: str, field: str = "address") -> tuple[str, str]:
    """(display name, addr-spec) of ``"a@b"`` or ``"Name <a@b>"``; the address in envelope form."""
    items = addresses.split_addresses(value, strict=True) if isinstance(value, str) else [value]
    if len(items) > 1:
        raise InvalidMessageError(field, f"{value!r} holds {len(items)} addresses; pass one")
    return addresses.mailbox_of(items[0] if items else "", field)


def validate_address(addr: str, field: str = "address") -> str:
    """The bare envelope address of ``addr`` (bare or ``Name <a@b>``); raises if invalid."""
    return parse_mailbox(addr, field)[1]


def _mailboxes(value: Addresses | None, field: str) -> list[tuple[str, str]]:
    """Mailboxes of an address argument: a comma-separated string or one per list item."""
    if value is None:
        return []
    if isinstance(value, str):
        items = addresses.split_addresses(value, strict=True)
        return [addresses.mailbox_of(item, f"{field}[{i}]") for i, item in enumerate(items)]
    if isinstance(value, Mapping | bytes | bytearray) or not isinstance(value, Iterable):
        kind = type(value).__name__
        raise InvalidMessageError(field, f"expected a string or a list of strings, got {kind}")
    return [parse_mailbox(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _dedupe(addresses: Iterable[str]) -> tuple[str, ...]:
    """Addresses without case-insensitive repeats, first occurrence kept, order kept."""
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return tuple(seen.values())


def _attachment(item: object, field: str) -> tuple[Attachment, bytes]:
    """A validated attachment and its content as bytes."""
    if isinstance(item, Attachment):
        att = item
    elif isinstance(item, tuple) and len(item) in (2, 3):
        att = Attachment(*item)
    else:
        raise InvalidMessageError(
            field, "expected Attachment(...) or a (filename, content[, mimetype]) tuple"
        )
    if isinstance(att.mimetype, bytes | bytearray | memoryview) and isinstance(att.content, str):
        raise InvalidMessageError(
            f"{field}.mimetype", "got bytes where a type such as 'application/pdf' goes: "
            "content and mimetype look swapped. The order is Attachment(filename, content, "
            "mimetype); Flask-Mail's attach() takes (filename, content_type, data)")
    if not isinstance(att.filename, str):
        kind = type(att.filename).__name__
        raise InvalidMessageError(f"{field}.filename", f"expected a string, got {kind}")
    if att.content_id is not None and not isinstance(att.content_id, str):
        kind = type(att.content_id).__name__
        raise InvalidMessageError(f"{field}.content_id",
                                  f"expected a string such as 'logo@example.com', got {kind}")
    # Readers strip whitespace around a filename; strip it here so the round trip is exact.
    name = att.filename.strip()
    if not name:
        raise InvalidMessageError(f"{field}.filename", "a filename is required, e.g. 'invoice.pdf'")
    if any(unicodedata.category(c) in _NOT_IN_FILENAMES for c in name):
        raise InvalidMessageError(f"{field}.filename", f"{shown(name)} has control characters")
    if len(utf8(name, f"{field}.filename")) > _MAX_FILENAME:
        raise InvalidMessageError(f"{field}.filename", f"over {_MAX_FILENAME} octets; shorten it")
    if name != att.filename:
        att = replace(att, filename=name)
    if isinstance(att.content, str):
        return att, utf8(att.content, f"{field}.content")
    if isinstance(att.content, bytes | bytearray | memoryview):
        return att, bytes(att.content)
    kind = type(att.content).__name__
    raise InvalidMessageError(f"{field}.content", f"expected bytes or str, got {kind}")


def _content_type(att: Attachment, field: str) -> str:
    """The attachment's Content-Type value, guessed from the filename when not given."""
    mimetype = att.mimetype
    if mimetype is None:
        guessed, compression = mimetypes.guess_type(att.filename, strict=False)
        if compression:  # "x.tar.gz" guesses as (application/x-tar, gzip): the bytes are gzip
            guessed = _COMPRESSED.get(compression, "application/octet-stream")
        # message/* and multipart/* parts may not be base64-encoded (RFC 2046 5.2.1, 5.1).
        if not guessed or guessed.startswith(("message/", "multipart/")):
            guessed = "application/octet-stream"
        mimetype = guessed
    elif not isinstance(mimetype, str) or not _MIMETYPE.fullmatch(mimetype):
        raise InvalidMessageError(
            f"{field}.mimetype",
            f"{shown(mimetype)} is not a type/subtype such as 'application/pdf'"
        )
    elif mimetype.lower().startswith(("message/", "multipart/")):
        raise InvalidMessageError(
            f"{field}.mimetype", f"{mimetype} cannot be attached; use application/octet-stream"
        )
    mimetype = mimetype.lower()
    if isinstance(att.content, str) and mimetype.startswith("text/"):
        return mimetype + "; charset=utf-8"
    return mimetype


def _content_id(att: Attachment, field: str, domain: str, taken: set[str]) -> str | None:
    """The Content-ID for an attachment, without angle brackets; None if it needs none."""
    if att.content_id is not None:
        cid = att.content_id.strip().removeprefix("<").removesuffix(">")
        if not _CONTENT_ID.fullmatch(cid):
            raise InvalidMessageError(
                f"{field}.content_id", f"{shown(att.content_id)} must be printable ASCII, no spaces"
            )
    elif att.inline:
        usable = _CONTENT_ID.fullmatch(att.filename) and att.filename not in taken
        cid = att.filename if usable else f"{secrets.token_hex(8)}@{domain}"
    else:
        return None
    if cid in taken:
        raise InvalidMessageError(f"{field}.content_id",
                                  f"{shown(cid)} is used twice; make it unique")
    taken.add(cid)
    return cid


def _size_error(size: int, limit: int, *, at_least: bool = False) -> InvalidMessageError:
    def human(n: int) -> str:
        if n >= 1024 * 1024:
            return f"{n / 1048576:.1f}".removesuffix(".0") + " MB"
        return f"{n / 1024:.1f}".removesuffix(".0") + " KB" if n >= 1024 else f"{n} bytes"

    return InvalidMessageError(
        "size",
        f"message is {'at least ' if at_least else ''}{human(size)}, over the {human(limit)} "
        "limit (MAILWORKER_MAX_MESSAGE_SIZE); link to big files instead of attaching them",
    )


def _body(
    text: str | None, html: str | None, attachments: Sequence[object], domain: str, limit: int
) -> mime.Part:
    """The root part: text, html, alternative, related and mixed as needed."""
    files = [_attachment(item, f"attachments[{i}]") for i, item in enumerate(attachments)]
    # Base64 only grows a file, and every character of text becomes at least one octet:
    # refuse before encoding megabytes that cannot be sent.
    least = sum(mime.base64_size(len(data)) for _, data in files)
    least += len(text or "") + len(html or "")
    if least > limit:
        raise _size_error(least, limit, at_least=True)
    related: list[mime.Part] = []
    mixed: list[mime.Part] = []
    taken: set[str] = set()
    for i, (att, data) in enumerate(files):
        field = f"attachments[{i}]"
        cid = _content_id(att, field, domain, taken)
        part = mime.attachment_part(att.filename, data, _content_type(att, field), att.inline, cid)
        # Inline parts belong next to the HTML; without HTML they are ordinary files.
        (related if att.inline and html is not None else mixed).append(part)
    body: mime.Part | None = None
    if html is not None:
        utf8(html, "html")
        body = mime.text_part("html", html)
        if related:
            body = mime.multipart("related", [body, *related])
    if text is not None:
        utf8(text, "text")
        plain = mime.text_part("plain", text)
        body = mime.multipart("alternative", [plain, body]) if body else plain
    if mixed:
        body = mime.multipart("mixed", [body, *mixed] if body else mixed)
    assert body is not None, "build_message refuses a message without body or attachments"
    return body


def build_message(
    *,
    sender: str,
    to: Addresses = (),
    cc: Addresses = (),
    bcc: Addresses = (),
    reply_to: Addresses | None = None,
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    attachments: Sequence[AttachmentLike] = (),
    headers: Mapping[str, str] | None = None,
    message_id: str | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    date: float | None = None,
    sender_header: str | None = None,
) -> BuiltMessage:
    """Validate ``send()`` arguments and build the envelope and the MIME bytes.

    ``sender`` is the author (``From:``) and the envelope sender, where bounces go;
    ``sender_header`` is an optional ``Sender:`` field, for mail an agent sends on the
    author's behalf (RFC 5322 3.6.2). ``date`` is epoch seconds (default: now).

    Runs inside the web request, so the MIME is written by hand (:mod:`mailworker.mime`)
    rather than through ``EmailMessage``: some 20 times faster (benchmarks/bench_build.py).
    """
    if not sender:
        raise InvalidMessageError("sender", "required, e.g. sender='Shop <shop@example.com>'")
    from_name, from_addr = parse_mailbox(sender, "sender")
    agent = parse_mailbox(sender_header, "sender_header") if sender_header is not None else None
    to_boxes = _mailboxes(to, "to")
    cc_boxes = _mailboxes(cc, "cc")
    recipients = _dedupe(a for _, a in (*to_boxes, *cc_boxes, *_mailboxes(bcc, "bcc")))
    if not recipients:
        raise InvalidMessageError("recipients", "none given; pass an address in to=, cc= or bcc=")
    reply_boxes = _mailboxes(reply_to, "reply_to")
    if not isinstance(subject, str) or mime.BREAKS.search(subject):
        raise InvalidMessageError("subject", f"must be a string that never {INJECTION}")
    utf8(subject, "subject")
    if isinstance(attachments, str | bytes | bytearray | Mapping | Attachment) or not isinstance(
            attachments, Iterable):
        raise InvalidMessageError("attachments", "expected a list of Attachment(...) or "
                                  f"(filename, content[, mimetype]) tuples, got "
                                  f"{type(attachments).__name__}")
    attachments = list(attachments)
    if text is None and html is None and not attachments:
        raise InvalidMessageError("body", "nothing to send; pass text=, html= or attachments=")
    for field, value in (("text", text), ("html", html)):
        if value is not None and not isinstance(value, str):
            raise InvalidMessageError(field, f"expected a string, got {type(value).__name__}")
    domain = addresses.id_domain(from_addr)
    if message_id is None:
        message_id = f"<{uuid.uuid4().hex}@{domain}>"
    else:
        match = _MSG_ID.fullmatch(message_id.strip()) if isinstance(message_id, str) else None
        if not match or len(match[1]) > _MAX_MESSAGE_ID:
            raise InvalidMessageError(
                "message_id", f"{shown(message_id)} is not like <id@example.com> (printable "
                f"ASCII, one '@', at most {_MAX_MESSAGE_ID} characters)")
        message_id = f"<{match[1]}>"
    if date is not None and (isinstance(date, bool) or not isinstance(date, int | float)
                             or not (math.isfinite(date) and _DATES[0] <= date <= _DATES[1])):
        raise InvalidMessageError("date", f"{shown(date)} is not epoch seconds of a year "
                                  "from 1900 to 9999")

    lines = [mime.address_list("From", [mime.mailbox(from_name, from_addr)])]
    if agent is not None:
        lines.append(mime.address_list("Sender", [mime.mailbox(*agent)]))
    if to_boxes:
        lines.append(mime.address_list("To", [mime.mailbox(n, a) for n, a in to_boxes]))
    else:  # Spam filters score a missing To; this is what sendmail writes for Bcc-only mail.
        lines.append("To: undisclosed-recipients:;\r\n")
    if cc_boxes:
        lines.append(mime.address_list("Cc", [mime.mailbox(n, a) for n, a in cc_boxes]))
    if reply_boxes:
        lines.append(mime.address_list("Reply-To", [mime.mailbox(n, a) for n, a in reply_boxes]))
    lines.append(mime.unstructured("Subject", subject))
    lines.append(f"Date: {formatdate(time.time() if date is None else date, usegmt=True)}\r\n")
    lines.append(f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n")
    lines.extend(header_lines(headers))
    part_headers, chunks = _body(text, html, attachments, domain, max_size)
    lines.append(part_headers + "\r\n")
    head = "".join(lines)
    # Subject and header values are always RFC 2047 encoded, so non-ASCII in the head can
    # only be an address; Bcc addresses are only in the envelope.
    smtputf8 = not head.isascii() or not all(a.isascii() for a in recipients)
    data = b"".join([head.encode("utf-8"), *chunks])
    if len(data) > max_size:
        raise _size_error(len(data), max_size)
    return BuiltMessage(from_addr, recipients, data, message_id, len(data), smtputf8)


# --- ready-made messages -----------------------------------------------------------------


def _header_mailboxes(msg: email.message.Message, names: Iterable[str]) -> list[str]:
    found = []
    for name in names:
        for value in msg.get_all(name, []):
            items = addresses.split_addresses(str(value), groups=True)
            found += [addresses.mailbox_of(v, f"{name.lower()}[{i}]")[1]
                      for i, v in enumerate(items)]
    return found


def _serialise(msg: email.message.Message, smtputf8: bool) -> bytes:
    # compat32 messages may hold email.header.Header objects, which the modern policies
    # cannot fold: they keep their own policy, with CRLF.
    policy: email.policy.Policy
    if isinstance(msg.policy, email.policy.EmailPolicy):
        policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
    else:
        policy = msg.policy.clone(linesep="\r\n")
    buffer = io.BytesIO()
    try:
        email.generator.BytesGenerator(buffer, mangle_from_=False, policy=policy).flatten(msg)
    except (email.errors.MessageError, ValueError, LookupError, TypeError) as exc:
        raise InvalidMessageError("message", f"cannot be serialised: {exc}") from None
    return buffer.getvalue()


def from_email_message(
    msg: email.message.Message,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
) -> BuiltMessage:
    """Build from a ready ``email.message.Message`` (Django's ``message()``, EmailMessage).

    The envelope defaults to the headers: Sender (else From), and To + Cc + Bcc. The Bcc
    header is dropped and Message-ID and Date are added when missing on the serialised
    header block, so ``msg`` itself is never modified. ``compat32`` messages (email.mime,
    Django) are written by their own policy, which cannot put a non-ASCII address in a
    header; the envelope is right either way.
    """
    if not isinstance(msg, email.message.Message):
        raise InvalidMessageError(
            "message", f"expected an email.message.EmailMessage, got {type(msg).__name__}; "
            "for raw bytes use email.message_from_bytes(data, policy=email.policy.default)")
    check_headers(msg)
    if sender is None:
        senders = _header_mailboxes(msg, ["Sender"]) or _header_mailboxes(msg, ["From"])
        if len(senders) != 1:
            raise InvalidMessageError(
                "sender", "the message needs exactly one From (or Sender) address, or pass sender="
            )
        from_addr = senders[0]
    else:
        from_addr = validate_address(sender, "sender")
    if recipients is None:
        rcpts = _dedupe(_header_mailboxes(msg, ["To", "Cc", "Bcc"]))
    else:
        rcpts = _dedupe(a for _, a in _mailboxes(recipients, "recipients"))
    if not rcpts:
        raise InvalidMessageError("recipients", "none in To, Cc or Bcc; add some or pass them")
    smtputf8 = not from_addr.isascii() or not all(a.isascii() for a in rcpts)

    head, _, body = _serialise(msg, smtputf8).partition(b"\r\n\r\n")
    check_head(head, msg)
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):  # a new field, not a folded continuation
            dropping = line.partition(b":")[0].strip().lower() in (b"bcc", b"resent-bcc")
        if not dropping:
            kept.append(line)
    existing = msg.get("Message-ID")
    if existing:
        message_id = " ".join(str(existing).split())
    else:
        message_id = f"<{uuid.uuid4().hex}@{addresses.id_domain(from_addr)}>"
        kept.append(f"Message-ID: {message_id}".encode("ascii"))
    if not msg.get("Date"):
        kept.append(f"Date: {formatdate(usegmt=True)}".encode("ascii"))
    smtputf8 = smtputf8 or not all(line.isascii() for line in kept)
    data = b"\r\n".join(kept) + b"\r\n\r\n" + body
    if len(data) > max_size:
        raise _size_error(len(data), max_size)
    return BuiltMessage(from_addr, rcpts, data, message_id, len(data), smtputf8)
