"""Hand-written MIME serialisation for :func:`mailworker.message.build_message`.

Why not ``email.message.EmailMessage``: it parses every header into an object and refolds
it on output, which costs about half a millisecond for a 2 KB message, and ``send()`` has
a millisecond in total. The handful of shapes ``build_message`` produces (text, html,
alternative, related, mixed) are simple enough to write directly as bytes.

Everything here trusts its input: :mod:`mailworker.message` has already rejected line
breaks in headers, over-long words and bad addresses. Output uses CRLF throughout and is
what ``email.message_from_bytes(data, policy=email.policy.default)`` reads back exactly
(the unit tests check that with hypothesis).
"""

from __future__ import annotations

import binascii
import secrets
from urllib.parse import quote

__all__ = [
    "Part",
    "address_list",
    "attachment_part",
    "encoded_words",
    "mailbox",
    "multipart",
    "text_part",
    "unstructured",
]

#: A MIME entity: its own header lines (each ending in CRLF) and its body as chunks,
#: joined once at the very end so nested multiparts never copy the body twice.
Part = tuple[str, list[bytes]]

_SOFT_LIMIT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters.
_HARD_LINE = 998  # ... and MUST be at most 998 octets.
# 42 UTF-8 octets become 56 base64 characters: "=?utf-8?b?" + 56 + "?=" = 68, so that
# even "Subject: " + one encoded word stays inside 78 characters.
_WORD_OCTETS = 42
_B64_LINE = 57  # 57 octets encode to one 76-character base64 line (RFC 2045 6.8).
# Characters that may appear unquoted in a display name (RFC 5322 atext plus space).
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~ "
)
# Filename characters safe inside a quoted parameter that every client reads back
# verbatim; anything else goes through RFC 2231 percent-encoding.
_PARAM_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#$%&'()*+,-./:;<>?@[]^_`{|}~"
)


def encoded_words(value: str) -> str:
    """RFC 2047 ``B`` encoded words for ``value``, folded one word per line.

    Splits only between whole UTF-8 characters, because a decoder may decode each word
    on its own. Whitespace between adjacent encoded words is dropped by decoders, so the
    folding adds nothing to the decoded value.
    """
    raw = value.encode("utf-8")
    words = []
    start, end = 0, len(raw)
    while start < end:
        stop = min(start + _WORD_OCTETS, end)
        while stop < end and raw[stop] & 0xC0 == 0x80:  # inside a multi-byte character
            stop -= 1
        words.append("=?utf-8?b?" + binascii.b2a_base64(raw[start:stop], newline=False).decode() + "?=")
        start = stop
    return "\r\n ".join(words)


def _plain_ok(value: str) -> bool:
    """Whether an unstructured value can be written as is and read back unchanged.

    A parser drops leading whitespace and decodes anything that looks like an encoded
    word, so such values are encoded even when they are ASCII.
    """
    return value.isascii() and value.isprintable() and value[:1] != " " and "=?" not in value


def unstructured(name: str, value: str) -> str:
    """A complete ``Name: value`` header line (CRLF included) for free text such as Subject."""
    if not _plain_ok(value) or max(map(len, value.split(" "))) > _HARD_LINE - len(name) - 4:
        return f"{name}: {encoded_words(value)}\r\n"
    return f"{name}: {fold(value, len(name) + 2)}\r\n"


def fold(value: str, used: int) -> str:
    """Fold an ASCII value at spaces so lines stay near 78 characters.

    ``used`` is how much of the first line the header name already takes. A fold goes
    *before* an existing space, so unfolding (removing CRLF) restores the value exactly.
    """
    if used + len(value) <= _SOFT_LIMIT:
        return value
    words = value.split(" ")
    lines = []
    line = words[0]
    width = used + len(line)
    for word in words[1:]:
        # Never fold before an empty word: a folded line of only whitespace is obsolete syntax.
        if word and width + 1 + len(word) > _SOFT_LIMIT and line.strip():
            lines.append(line)
            line = " " + word
            width = len(line)
        else:
            line += " " + word
            width += 1 + len(word)
    lines.append(line)
    return "\r\n".join(lines)


def mailbox(name: str, address: str) -> str:
    """``Name <address>``, with the name as atoms, a quoted string or encoded words."""
    if not name:
        return address
    if _plain_ok(name) and name[-1] != " ":
        if _ATEXT.issuperset(name) and "  " not in name:
            return f"{name} <{address}>"
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{address}>'
    return f"{encoded_words(name)} <{address}>"


def address_list(name: str, mailboxes: list[str]) -> str:
    """A complete address header line; one address per line once it grows past 78."""
    joined = ", ".join(mailboxes)
    if len(name) + 2 + len(joined) > _SOFT_LIMIT:
        joined = ",\r\n ".join(mailboxes)
    return f"{name}: {joined}\r\n"


def _crlf(text: str) -> str:
    """Any mix of CRLF, CR and LF line endings, as CRLF."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "\r\n")


def _seven_bit_ok(text: str) -> bool:
    """Whether CRLF text may go as 7bit: ASCII, no NUL, every line within 998 octets."""
    if not text.isascii() or "\0" in text:
        return False
    if len(text) <= _HARD_LINE:
        return True
    return max(map(len, text.split("\r\n"))) <= _HARD_LINE


def text_part(subtype: str, text: str) -> Part:
    """A ``text/<subtype>`` part: 7bit when the text allows it, else quoted-printable.

    Quoted-printable (not 8bit) keeps the message deliverable through relays without
    8BITMIME and keeps every line under 76 characters.
    """
    body = _crlf(text)
    if _seven_bit_ok(body):
        return (
            f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n",
            [body.encode("ascii")],
        )
    # istext=True with CRLF input makes b2a_qp keep CRLF as the line break and encode
    # trailing whitespace, which transport would otherwise strip.
    encoded = binascii.b2a_qp(body.encode("utf-8"), quotetabs=False, istext=True, header=False)
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n",
        [encoded],
    )


def base64_body(data: bytes) -> bytes:
    """Base64 in 76-character CRLF-separated lines (RFC 2045 6.8)."""
    b2a = binascii.b2a_base64
    return b"\r\n".join(
        [b2a(data[i : i + _B64_LINE], newline=False) for i in range(0, len(data), _B64_LINE)]
    )


def base64_size(length: int) -> int:
    """The exact size of :func:`base64_body` for ``length`` octets, without encoding them."""
    lines = -(-length // _B64_LINE)
    return 4 * -(-length // 3) + 2 * max(lines - 1, 0)


def _filename_param(filename: str) -> str:
    """``filename="..."`` when plain ASCII, else RFC 2231 ``filename*=utf-8''...``."""
    if _PARAM_SAFE.issuperset(filename) and "=?" not in filename and filename[:1] != " ":
        return f'filename="{filename}"'
    return "filename*=utf-8''" + quote(filename, safe="")


def attachment_part(
    filename: str, data: bytes, content_type: str, disposition: str, content_id: str | None
) -> Part:
    """A base64 attachment part; ``content_type`` may carry parameters (``; charset=...``)."""
    headers = (
        f"Content-Type: {content_type}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: {disposition};\r\n {_filename_param(filename)}\r\n"
    )
    if content_id is not None:
        headers += f"Content-ID: <{content_id}>\r\n"
    return headers, [base64_body(data)]


def multipart(subtype: str, parts: list[Part]) -> Part:
    """A ``multipart/<subtype>`` part holding ``parts``.

    The boundary starts with ``=_``, which can occur neither in quoted-printable nor in
    base64 output; for 7bit text, 128 random bits make a collision negligible.
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
