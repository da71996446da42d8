"""RFC 5322 and MIME syntax for :mod:`mailworker.message`: read addresses, write bytes.

Reading: a small strict address parser instead of ``email.utils.getaddresses``, which
before Python 3.13 can read ``alice@example.org)<bob@example.com>`` as two addresses
(CVE-2023-27043) and accepts nearly anything. Quoted local parts (``"john doe"@x.org``)
and comments are refused: nearly always a mistake, and many relays mishandle them.

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
import encodings.idna
import ipaddress
import re
import secrets
import unicodedata
from urllib.parse import quote

from mailworker.errors import MailworkerError, shown

__all__ = [
    "BREAKS",
    "HARD_LIMIT",
    "InvalidMessageError",
    "Part",
    "address_list",
    "attachment_part",
    "base64_size",
    "check_address",
    "encoded_words",
    "fold",
    "id_domain",
    "longest_word",
    "mailbox",
    "mailbox_of",
    "multipart",
    "split_addresses",
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


# --- reading addresses -------------------------------------------------------------------

BREAKS = re.compile(r"[\r\n\0]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The common case in one regex; everything else takes the slow path that explains itself.
_SIMPLE_ADDRESS = re.compile(
    rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
)
_LDH_LABEL = re.compile(_LABEL)
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
)
_MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3: a path is at most 256 octets including "<>".
# RFC 3490 3.1: these full stops separate labels like "." (after NFKC, U+FF0E is "."
# and U+FF61 is U+3002).
_IDEOGRAPHIC_DOT = re.compile("[\u3002\uff0e\uff61]")
# Characters nobody can see or type on purpose in a domain: format (zero-width space,
# joiners, soft hyphen, BOM), control, private-use, unassigned, separators.
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zs", "Zl", "Zp"})
_MAX_LOCAL = 64


def _bad(field: str, value: object, why: str) -> InvalidMessageError:
    return InvalidMessageError(field, f"{shown(value)} is not a valid email address: {why}")


def _normalise_domain(domain: str, field: str, address: str) -> str:
    """A non-ASCII domain as a name server would see it, or an error if it hides anything.

    Full-width and other compatibility forms (a full-width ``EXAMPLE.com``) become their
    ordinary letters (NFKC, as IDNA's own mapping does), ideographic full stops become
    dots, and an invisible character (``ex\u200bample.com``) is refused rather than
    silently dropped or kept: either way the address would not be the one shown.
    """
    if domain.isascii():
        return domain
    hidden = next((c for c in domain if unicodedata.category(c) in _INVISIBLE), None)
    if hidden is not None:
        raise _bad(field, address, f"the domain contains the invisible character "
                                   f"U+{ord(hidden):04X}; remove it")
    return _IDEOGRAPHIC_DOT.sub(".", unicodedata.normalize("NFKC", domain))


def _domain(domain: str, field: str, address: str) -> tuple[str, bool]:
    """Check a domain; return its ASCII (A-label) form, or itself and False if it has none.

    The standard library's IDNA 2003 codec maps some characters to others (``faß`` to
    ``fass``), which would be a different domain: such a label is kept in UTF-8.
    """
    if domain.startswith("["):
        literal = domain[1:-1] if domain.endswith("]") else ""
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise _bad(field, address, "an address literal is [192.0.2.1] or [IPv6:...]") from None
        return domain, True
    if domain.endswith("."):
        raise _bad(field, address, "the domain ends with '.'; remove it")
    labels = domain.split(".")
    converted = []
    stable = True
    for label in labels:
        if not label:
            raise _bad(field, address, "the domain has an empty label (two dots in a row?)")
        if label.isascii():
            if not _LDH_LABEL.fullmatch(label):
                bad = next((c for c in label if not (c.isalnum() or c == "-")), None)
                why = f"contains {bad!r}" if bad else "starts or ends with '-', or is too long"
                raise _bad(field, address, f"domain label {label!r} {why}")
            converted.append(label)
            continue
        try:
            a_label = encodings.idna.ToASCII(label).decode("ascii")
        except UnicodeError:
            a_label = ""
        if not _LDH_LABEL.fullmatch(a_label):
            raise _bad(field, address, f"domain label {label!r} is not a valid international name")
        nfc = unicodedata.normalize("NFC", label.lower())
        stable = stable and encodings.idna.ToUnicode(a_label) == nfc
        converted.append(a_label)
    if len(labels) == 1 and domain.lower() != "localhost":
        raise _bad(field, address, f"the domain has no dot; use a full one such as {domain}.com")
    if labels[-1].isdigit():
        raise _bad(field, address, "an IP address must be written as a literal: [192.0.2.1]")
    return (".".join(converted), True) if stable else (domain, False)


def check_address(address: str, field: str) -> str:
    """Validate a bare addr-spec and return its envelope form.

    With an ASCII local part, a non-ASCII domain becomes its A-label so the message
    needs no SMTPUTF8; a non-ASCII local part needs SMTPUTF8 anyway and is kept as is.
    """
    if (
        _SIMPLE_ADDRESS.fullmatch(address)
        and len(address) <= _MAX_ADDRESS
        and address.index("@") <= _MAX_LOCAL
    ):
        return address
    if not address:
        raise _bad(field, address, "it is empty")
    if address.startswith('"'):
        raise _bad(field, address, "quoted local parts are not supported")
    space = next((c for c in address if c.isspace()), None)
    if space is not None:
        what = "a space" if space == " " else f"the white space or line break U+{ord(space):04X}"
        raise _bad(field, address, f"it contains {what}")
    if "@" not in address:
        raise _bad(field, address, "missing '@' between the name and the domain")
    local, _, domain = address.rpartition("@")
    if not local:
        raise _bad(field, address, "missing the part before '@'")
    if not domain:
        raise _bad(field, address, "missing domain after '@'")
    if "@" in local:
        raise _bad(field, address, "it contains more than one '@'")
    domain = _normalise_domain(domain, field, address)
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _bad(field, address, "the part before '@' starts or ends with '.' or has '..'")
    for c in local:
        if c not in _ATEXT and c != "." and (c.isascii() or not c.isprintable()):
            raise _bad(field, address, f"{c!r} is not allowed before '@'")
    envelope_domain, ascii_ok = _domain(domain, field, address)
    envelope = f"{local}@{envelope_domain if local.isascii() and ascii_ok else domain}"
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise _bad(field, address, f"the part before '@' is over {_MAX_LOCAL} octets")
    if len(envelope.encode("utf-8")) > _MAX_ADDRESS:
        raise _bad(field, address, f"it is over {_MAX_ADDRESS} octets (RFC 5321)")
    return envelope


def split_addresses(value: str, *, groups: bool = False, strict: bool = False) -> list[str]:
    """Split an address list on commas outside quotes, angle brackets and literals.

    With ``groups`` (header values), RFC 5322 group syntax ``name: a, b;`` is flattened,
    so ``undisclosed-recipients:;`` yields nothing. Empty items are dropped. ``strict``
    (a caller's argument, not a parsed header) trims only spaces and tabs, so a line
    break at an item's end is refused by :func:`mailbox_of` instead of silently dropped.
    """
    items: list[str] = []
    start = depth = 0  # depth: inside <...> or [...]
    quoted = escaped = False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            escaped = c == "\\"
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c in "<[":
            depth += 1
        elif c in ">]":
            depth = max(depth - 1, 0)
        elif depth == 0 and (c == "," or (groups and c == ";")):
            items.append(value[start:i])
            start = i + 1
        elif depth == 0 and groups and c == ":":
            start = i + 1  # drop the group's display name
    items.append(value[start:])
    trimmed = (item.strip(" \t") if strict else item.strip() for item in items)
    return [item for item in trimmed if item]


def _angle(text: str) -> int:
    """Index of the '<' that opens the angle address: the first one outside quotes."""
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "<" and not quoted:
            return i
    return -1


def _display_name(name: str, field: str, value: str) -> str:
    if len(name) >= 2 and name[0] == '"' and name[-1] == '"':
        inner = name[1:-1]
        if re.search(r'(?<!\\)"', inner.replace("\\\\", "")):
            raise _bad(field, value, 'a \'"\' inside a quoted display name must be escaped: \\"')
        return re.sub(r"\\(.)", r"\1", inner)
    if '"' in name or ">" in name:
        raise _bad(field, value, 'quote the display name, e.g. "Doe, Jane" <jane@example.com>')
    return name


def mailbox_of(value: object, field: str) -> tuple[str, str]:
    """(display name, envelope address) of one mailbox: ``a@b`` or ``Name <a@b>``."""
    if not isinstance(value, str):
        raise InvalidMessageError(field, f"expected an address string, got {type(value).__name__}")
    if BREAKS.search(value):
        raise _bad(field, value, "it contains a line break or NUL (header injection); remove it")
    text = value.strip(" \t")  # other white space at the ends is refused, not dropped
    if not text.endswith(">"):
        if "<" in text or ">" in text:
            raise _bad(field, value, "'<' without a closing '>'")
        return "", check_address(text, field)
    opening = _angle(text)
    if opening < 0 and "<" in text:
        raise _bad(field, value, 'a \'"\' in the display name is unbalanced; escape it as \\"')
    if opening < 0:
        raise _bad(field, value, "'>' without a matching '<'")
    address = text[opening + 1 : -1].strip()
    if "<" in address or ">" in address:
        raise _bad(field, value, "more than one '<...>'")
    # Whitespace in a display name is not significant, and parsers (Python's among them)
    # collapse it, even inside encoded words: normalise it so what is sent is what is read.
    name = " ".join(_display_name(text[:opening].strip(), field, value).split())
    return name, check_address(address, field)


def id_domain(address: str) -> str:
    """An ASCII domain for generated ids (Message-ID, Content-ID) from an address."""
    domain = address.rpartition("@")[2]
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "mailworker.invalid"


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
_NAME_ATOMS = _ATEXT | {" "}  # atext plus the spaces between atoms
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
