"""Small output helpers for the CLI: errors with hints, tables, JSON, safe terminal text.

Much of what the CLI prints comes from outside: a relay's reply text (or a remote server's,
passed on by a smarthost), subjects, addresses, error messages, relay names read back from
Redis. Printed raw, an escape sequence in any of them can clear the operator's screen,
retitle the terminal or fake a line such as "All messages delivered OK". So every text
path goes through :func:`clean`: ANSI/OSC sequences are removed and any other control
character is shown escaped (``\\x07``). JSON output needs no cleaning: the encoder
escapes control characters itself.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["CLIError", "clean", "print_json", "say", "table"]

# ESC-introduced sequences: CSI (ESC [ ... final byte), OSC/DCS/APC/PM/SOS strings (ended by
# BEL or ST), and two-byte escapes. The 8-bit C1 forms (0x9b CSI, 0x9d OSC) likewise.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]P^_X]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
)
# Remaining C0 and C1 controls, DEL, and the bidirectional overrides that reorder what
# is shown ("Trojan Source"). Newline and tab are kept where the caller allows them.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_LINE = re.compile(r"[\n\t]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def clean(value: object, *, newlines: bool = True) -> str:
    """*value* as text that cannot drive the terminal.

    Escape sequences are dropped; other control characters are shown escaped, so a reply
    that carried one stays visibly odd instead of silently altered. With
    ``newlines=False`` (table cells, one-line fields) newline and tab become spaces.
    """
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable():
        return text  # the common case: nothing to do
    text = _SEQUENCE.sub("", text)
    if not newlines:
        text = _LINE.sub(" ", text)
    return _CONTROL.sub(_escape, text)


def say(text: object = "", *, file: Any = None) -> None:
    """``print`` for text that may hold untrusted parts (see :func:`clean`)."""
    print(clean(text), file=file)


class CLIError(Exception):
    """An error the CLI reports as one line plus a hint, with a documented exit code."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


def print_json(value: Any) -> None:
    # ensure_ascii (the default) writes every control character as \uXXXX: terminal-safe.
    json.dump(value, sys.stdout, indent=2, default=str, sort_keys=True)
    sys.stdout.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (no dependency; fits in a log or a terminal).

    Cells are cleaned (:func:`clean`, one line each), so a table is safe to print.
    """
    cells = [[clean(h, newlines=False) for h in headers]]
    cells += [["" if c is None else clean(c, newlines=False) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
