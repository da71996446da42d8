"""Reading a message's content after DATA in bulk, for :meth:`FaultySMTP.smtp_DATA`.

aiosmtpd reads the content one line at a time (a ``readuntil`` and a few checks in Python
per line), about 33 us of CPU per KB. These functions do the same job with a handful of
calls per message, with the same results:

* the content ends at the first line that is a lone dot, that is at the first
  ``CRLF . CRLF`` in the stream with a CRLF put in front of it (the content may be empty:
  just ``.\\r\\n``); whatever follows it stays in the reader, for the command loop
  (a pipelining client sends its next MAIL, RCPT and DATA right behind the dot);
* lines are CRLF-delimited (a bare CR or LF is part of a line, as for aiosmtpd), and a line
  of ``line_length_limit - 1`` octets or more, not counting its CRLF, makes aiosmtpd
  refuse the message with ``500 Line too long``: :func:`has_long_line` finds those;
* :func:`unstuff` removes the first dot of every line that starts with one (RFC 5321
  4.5.2).
"""

from __future__ import annotations

import asyncio
import re

__all__ = ["LINE_TOO_LONG", "has_long_line", "read_content", "unstuff"]

#: aiosmtpd's reply, after the final dot, to content with an over-long line.
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"

_DOT_LINE = b".\r\n"
_CRLF = b"\r\n"
_STUFFED = re.compile(rb"\r\n\.")  # a line's first dot; not (?m)^ , which a bare LF matches


async def read_content(reader: asyncio.StreamReader) -> bytes:
    """Read the content up to its lone-dot line; return it still dot-stuffed, without
    that line (so it ends with CRLF, or is empty). Bytes after the dot line stay unread.

    The reader is searched for ``.\\r\\n``, the end of the terminator: each occurrence is
    the end of a terminator exactly when the two bytes before its dot are CRLF (or it is
    the first thing in the content). ``.\\r\\n`` cannot overlap itself, so successive
    ``readuntil`` calls meet its occurrences in order and the first terminator ends the
    loop without reading past it; a terminator whose CRLF was returned by the previous
    call is found by remembering the last two bytes read. Only content lines that end
    with a dot cost a call of their own.
    """
    chunks: list[bytes] = []
    last_two = _CRLF  # the content starts at the beginning of a line
    while True:
        try:
            chunk = await reader.readuntil(_DOT_LINE)
        except asyncio.LimitOverrunError as error:
            # No ".\r\n" within the reader's limit (aiosmtpd's line length limit), or only
            # further on: take the bytes before it, which cannot hold the end of the
            # terminator (for a ".\r\n" not found, the reader leaves the last two bytes).
            # (readexactly: the bytes are there, and it copies them once, read() twice.)
            chunk = await reader.readexactly(error.consumed)
        else:
            before_dot = chunk[-5:-3] if len(chunk) >= 5 else (last_two + chunk[:-3])[-2:]
            if before_dot == _CRLF:
                if len(chunk) > 3:
                    chunks.append(chunk[:-3])
                return b"".join(chunks)  # a single chunk is returned as it is, uncopied
        chunks.append(chunk)
        last_two = chunk[-2:] if len(chunk) >= 2 else (last_two + chunk)[-2:]


def has_long_line(raw: bytes, length: int) -> bool:
    """Whether a CRLF-delimited line of *raw* has *length* octets or more (CRLF excluded).

    From each line start, one ``rfind`` looks for the last CRLF within the next
    *length* + 1 bytes: if there is none, the line there is too long; if there is one,
    every line up to it is short enough, and the search goes on after it. That skips
    nearly a window at a time instead of walking the lines.
    """
    start, end = 0, len(raw)
    while end - start >= length:
        cut = raw.rfind(_CRLF, start, start + length + 1)
        if cut == -1:
            return True
        start = cut + 2
    return False


def unstuff(raw: bytes) -> bytes:
    """Undo dot-stuffing: drop the first dot of each CRLF-delimited line starting with one.

    ``CRLF .`` cannot overlap itself, so one substitution treats every line once, leaving
    the rest of a line that starts with several dots; the first line has no CRLF in
    front and is handled on its own. (A regular expression rather than ``bytes.replace``:
    its literal search is about twice as fast on text with a CRLF every 80 bytes.)
    """
    content = _STUFFED.sub(_CRLF, raw)  # returns raw itself when there is no match
    return content[1:] if content[:1] == b"." else content
