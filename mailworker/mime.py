"""RFC 5322 and MIME syntax for :mod:`mailworker.message`: write header lines and parts.

Also home of :class:`InvalidMessageError`, which every checker raises. Addresses are read
by :mod:`mailworker.addresses`.

Writing: header lines and MIME parts by hand instead of ``email.message.EmailMessage``,
which parses every header into an object and refolds it on output, about half a
millisecond for a 2 KB message; ``send()`` has a millisecond in total. Output uses CRLF
and reads back exactly through ``email.message_from_bytes(data, policy=default)``; the
unit tests check that with hypothesis. The writers trust their input: the caller has
already rejected line breaks, over-long words and bad addresses.

Import the public names from :mod:`mailworker.message`; this module is its internals.
"""

from __future__ import annotations

import binascii
import re
import secrets
from urllib.parse import quote

from mailworker.errors import MailworkerError

__all__ = [
    "ATEXT",
    "BREAKS",
    "HARD_LIMIT",
    "InvalidMessageError",
    "Part",
    "address_list",
    "attachment_part",
    "base64_size",
    "encoded_words",
    "fold",
    "longest_word",
    "mailbox",
    "multipart",
    "text_part",
    "unstructured",
]


_MAX_REASON = 500


class InvalidMessageError(MailworkerError, ValueError):
    """Bad input at enqueue: says what is wrong (``reason``) and where (``field``).

    ``field`` is e.g. ``"to[2]"``, ``"headers[X-Foo]"``, ``"subject"``, ``"size"``.
    ``args`` is ``(field, reason)`` so the error pickles and crosses process boundaries.
    A ``ValueError`` for callers that caught that before :class:`MailworkerError` existed.
    """

    def __init__(self, field: str, reason: str) -> None:
        # A safety net under errors.shown(): the text goes into HTTP 400 bodies and logs.
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 15] + "... (truncated)"
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


BREAKS = re.compile(r"[\r\n\0]")
ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
)


# --- writing headers ---------------------------------------------------------------------

#: A MIME entity: its own header lines (each ending in CRLF) and its body as chunks,
#: joined once at the very end so nested multiparts never copy a body twice.
Part = tuple[str, list[bytes]]

_SOFT_LIMIT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters...
HARD_LIMIT = 998  # ... and MUST be at most 998 octets.
# 42 UTF-8 octets become 56 base64 characters: "=?utf-8?b?" + 56 + "?=" is 68, so even
# "Subject: " and one encoded word stay within 78 characters.
_WORD_OCTETS = 42
_B64_LINE = 57  # 57 octets encode to one 76-character base64 line (RFC 2045 6.8).
_NAME_ATOMS = ATEXT | {" "}  # atext plus the spaces between atoms
# Filename characters that every client reads back verbatim from a quoted parameter;
# a filename with anything else is written RFC 2231 percent-encoded.
_PARAM_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#$%&'()*+,-./:;<>?@[]^_`{|}~"
)


def encoded_words(value: str) -> str:
    """RFC 2047 ``B`` encoded words for ``value``, folded one word per line.

    Splits only between whole UTF-8 characters, because a decoder may decode each word
    on its own. Decoders drop the whitespace between adjacent encoded words, so the
    folding adds nothing to the value.
    """
    raw = value.encode("utf-8")
    words = []
    start, end = 0, len(raw)
    while start < end:
        stop = min(start + _WORD_OCTETS, end)
        while stop < end and raw[stop] & 0xC0 == 0x80:  # inside a multi-byte character
            stop -= 1
        chunk = binascii.b2a_base64(raw[start:stop], newline=False).decode("ascii")
        words.append(f"=?utf-8?b?{chunk}?=")
        start = stop
    return "\r\n ".join(words)


def _plain_ok(value: str) -> bool:
    """Whether a value can be written as is and read back unchanged.

    Parsers drop leading whitespace and decode anything that looks like an encoded word,
    so such values are encoded even when they are ASCII.
    """
    return value.isascii() and value.isprintable() and value[:1] != " " and "=?" not in value


def fold(value: str, used: int) -> str:
    """Fold an ASCII value at spaces so lines stay near 78 characters.

    ``used`` is what the header name takes of the first line. A fold goes *before* an
    existing space, so unfolding (removing CRLF) restores the value exactly.
    """
    if used + len(value) <= _SOFT_LIMIT:
        return value
    words = value.split(" ")
    lines = []
    line = words[0]
    width = used + len(line)
    for word in words[1:]:
        # Never fold before an empty word: a line of only whitespace is obsolete syntax.
        if word and width + 1 + len(word) > _SOFT_LIMIT and line.strip():
            lines.append(line)
            line = " " + word
            width = len(line)
        else:
            line += " " + word
            width += 1 + len(word)
    lines.append(line)
    return "\r\n".join(lines)


def longest_word(value: str) -> int:
    """Length of the longest run without a space: the part folding cannot shorten."""
    return max(map(len, value.split(" ")))


def unstructured(name: str, value: str) -> str:
    """A complete ``Name: value`` line (CRLF included) for free text such as Subject."""
    if _plain_ok(value) and longest_word(value) <= HARD_LIMIT - len(name) - 4:
        return f"{name}: {fold(value, len(name) + 2)}\r\n"
    return f"{name}: {encoded_words(value)}\r\n"


def _phrase(name: str) -> str:
    """A display name with non-ASCII as encoded words and plain words left readable.

    Consecutive words that need encoding share one encoded run, spaces included: RFC
    2047 decoders drop the whitespace *between* encoded words. A run over 42 octets is
    split at a character boundary, which RFC 2047 readers join exactly; Python's own
    parser (3.11) wrongly inserts a space there, for its own generator's output too.
    """
    out: list[str] = []
    run: list[str] = []
    for word in name.split(" "):
        if _NAME_ATOMS.issuperset(word) and "=?" not in word:
            if run:
                out.append(encoded_words(" ".join(run)))
                run = []
            out.append(word)
        else:
            run.append(word)
    if run:
        out.append(encoded_words(" ".join(run)))
    return " ".join(out)


def mailbox(name: str, address: str) -> str:
    """``Name <address>``; the name (whitespace-normalised) as atoms, quoted or encoded."""
    if not name:
        return address
    if not _plain_ok(name):
        return f"{_phrase(name)} <{address}>"
    if _NAME_ATOMS.issuperset(name):
        return f"{name} <{address}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'


def address_list(name: str, mailboxes: list[str]) -> str:
    """A complete address header line; one address per line once it passes 78."""
    joined = ", ".join(mailboxes)
    if len(name) + 2 + len(joined) > _SOFT_LIMIT:
        joined = ",\r\n ".join(mailboxes)
    return f"{name}: {joined}\r\n"


# --- writing parts -----------------------------------------------------------------------


def _seven_bit_ok(text: str) -> bool:
    """Whether LF text may go as 7bit: ASCII, no NUL, every line within 998 octets."""
    if not text.isascii() or "\0" in text:
        return False
    return len(text) <= HARD_LIMIT - 2 or max(map(len, text.split("\n"))) <= HARD_LIMIT


def text_part(subtype: str, text: str) -> Part:
    """A ``text/<subtype>`` part: 7bit when the text allows it, else quoted-printable.

    Any mix of CRLF, CR and LF line endings becomes CRLF. Quoted-printable rather than
    8bit keeps the message deliverable through relays without 8BITMIME and keeps every
    line under 77 characters.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _seven_bit_ok(text):
        return (
            f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n",
            [text.replace("\n", "\r\n").encode("ascii")],
        )
    # From LF input b2a_qp writes LF line breaks and "=\n" soft breaks, and escapes every
    # other control character, so each LF in its output becomes CRLF. It also encodes
    # trailing whitespace, which relays would otherwise strip.
    encoded = binascii.b2a_qp(text.encode("utf-8"), quotetabs=False, istext=True, header=False)
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n",
        [encoded.replace(b"\n", b"\r\n")],
    )


def base64_size(length: int) -> int:
    """The exact size of an attachment's base64 body, without encoding it."""
    lines = -(-length // _B64_LINE)
    return 4 * -(-length // 3) + 2 * max(lines - 1, 0)


def _filename_param(filename: str) -> str:
    """``filename="..."`` when plain ASCII, else RFC 2231 ``filename*=utf-8''...``."""
    if _PARAM_SAFE.issuperset(filename) and _plain_ok(filename):
        return f'filename="{filename}"'
    return "filename*=utf-8''" + quote(filename, safe="")


def attachment_part(
    filename: str, data: bytes, content_type: str, inline: bool, content_id: str | None
) -> Part:
    """A base64 part with its disposition; ``content_type`` may carry parameters."""
    disposition = "inline" if inline else "attachment"
    headers = (
        f"Content-Type: {content_type}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: {disposition};\r\n {_filename_param(filename)}\r\n"
    )
    if content_id is not None:
        headers += f"Content-ID: <{content_id}>\r\n"
    b2a = binascii.b2a_base64
    lines = [b2a(data[i : i + _B64_LINE], newline=False) for i in range(0, len(data), _B64_LINE)]
    return headers, [b"\r\n".join(lines)]


def multipart(subtype: str, parts: list[Part]) -> Part:
    """A ``multipart/<subtype>`` part holding ``parts``.

    The boundary starts with ``=_``, which occurs neither in quoted-printable nor in
    base64; in 7bit text, 128 random bits make a collision negligible.
    """
    boundary = "=_" + secrets.token_hex(16)
    delimiter = f"--{boundary}\r\n".encode("ascii")
    chunks: list[bytes] = []
    for headers, body in parts:
        chunks.append(delimiter)
        chunks.append(headers.encode("ascii"))
        chunks.append(b"\r\n")
        chunks.extend(body)
        chunks.append(b"\r\n")  # the CRLF before a delimiter belongs to the delimiter
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n', chunks
