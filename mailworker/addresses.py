"""Reading addresses: a small strict parser for what callers and headers give us.

Used instead of ``email.utils.getaddresses``, which before Python 3.13 can read
``alice@example.org)<bob@example.com>`` as two addresses (CVE-2023-27043) and accepts
nearly anything. Quoted local parts (``"john doe"@x.org``) and comments are refused:
nearly always a mistake, and many relays mishandle them. Non-ASCII domains are checked
and converted as IDNA does (see :func:`check_address`).

Import the public names from :mod:`mailworker.message`; this module is its internals.
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
import unicodedata

from mailworker.errors import shown
from mailworker.mime import ATEXT, BREAKS, InvalidMessageError

__all__ = ["check_address", "id_domain", "mailbox_of", "split_addresses"]

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The common case in one regex; everything else takes the slow path that explains itself.
_SIMPLE_ADDRESS = re.compile(
    rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?"
)
_LDH_LABEL = re.compile(_LABEL)
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
        if c not in ATEXT and c != "." and (c.isascii() or not c.isprintable()):
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
