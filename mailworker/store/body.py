"""How a record is laid out in Redis to cost little memory: the body, compressed when that
pays, and the document without the fields that only repeat their defaults.

Measured with ``benchmarks/bench_memory.py`` (Redis 7, jemalloc): a record hash costs
about 600 bytes of structure beyond its values, so a 2 KB message's bytes beyond its
MIME size were mostly the JSON document (about 660 bytes while queued, rounded up to a
768-byte allocation), half of it ``null``, ``false``, ``0``, ``[]`` and ``{}``. Large
bodies are rounded up too (jemalloc's classes above 64 KiB are a quarter of a power of
two apart: a 104,680-byte body takes 114,688), and compressing them saves that and more.

The body is stored in one of two fields, so a reader never has to guess:

* ``raw``: the MIME bytes as accepted (every record written before compression existed,
  and every body too small or too random to shrink);
* ``zraw``: the same bytes compressed with zlib (:func:`pack`), whose own checksum
  (Adler-32) makes a damaged body an unreadable record, never different mail.

Either way :func:`body_of` gives back exactly the bytes accepted; a retry, a dead letter's
retry and a crash all send those.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import MISSING, fields
from typing import Any

import orjson

from mailworker.record import Attempt, RecipientState, Record

__all__ = ["COMPRESS_MIN", "HUFFMAN_MIN", "LEVEL", "body_of", "compact_json", "pack"]

#: Bodies shorter than this are stored as they are: below it compression saves a few
#: hundred bytes at most. A 2 KB message of mail text compresses to about 50% at level 1
#: (about 15 us to compress at enqueue, 5 us to decompress at claim), which takes its
#: record from about 1,100 bytes beyond its MIME size to about 100: the record's own
#: structure (hash, sorted-set entry, compact document, allocation rounding) is about
#: 1,100 bytes, so without compressing the body a 2 KB message stays over 1 KB of it.
COMPRESS_MIN = 1024
#: From this size on, Huffman coding only (no LZ77 matching). Large messages are mostly
#: attachments, base64 of data that is compressed already, where matching finds nothing:
#: on a 100 KB message with a 75 KB random attachment it costs 2.2 ms for a 23% saving,
#: Huffman alone 0.6 ms for 24% (and decompresses in 0.3 ms instead of 0.45).
HUFFMAN_MIN = 65536
#: zlib level: 1 is within a few percent of 6 on mail text, at a fraction of the CPU on
#: larger bodies (32 KB of text: 0.15 ms at 1, 1.6 ms at 6).
LEVEL = 1


def pack(raw: bytes) -> tuple[str, bytes]:
    """The hash field and value that store *raw*: ``("zraw", compressed)`` when the body
    is large enough and compression saves at least 1/16 of it, else ``("raw", raw)``."""
    if len(raw) < COMPRESS_MIN:
        return "raw", raw
    strategy = zlib.Z_HUFFMAN_ONLY if len(raw) >= HUFFMAN_MIN else zlib.Z_DEFAULT_STRATEGY
    # A window no larger than the body, and a hash table to match: setting up zlib's
    # largest ones (about 256 KB, cleared each time) cost more than compressing a small
    # body (2 KB: 17 us with a 4 KB window instead of 70 us, for the same size).
    # zlib.decompress reads any window size.
    wbits = min(15, max(9, (len(raw) - 1).bit_length()))
    z = zlib.compressobj(LEVEL, zlib.DEFLATED, wbits, max(1, wbits - 7), strategy)
    packed = z.compress(raw) + z.flush()
    if len(packed) > len(raw) - len(raw) // 16:  # never store a body that did not shrink
        return "raw", raw
    return "zraw", packed


def body_of(raw: Any, zraw: Any) -> bytes | None:
    """The MIME bytes from a record's ``raw`` or ``zraw`` field (None: neither stored).
    Raises ``zlib.error`` on a damaged compressed body, and ``ValueError`` when both
    fields are stored: mailworker never writes both (something else wrote one beside
    the other, e.g. a body "fixed" by hand), so which bytes were meant is unknown and
    the record is set aside rather than either body sent."""
    if zraw is not None and raw is not None:
        raise ValueError("both raw and zraw are stored: which is the message is unknown")
    if zraw is not None:
        return zlib.decompress(zraw if isinstance(zraw, bytes) else bytes(zraw))
    if raw is None:
        return None
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _droppable(cls: type, keep: frozenset[str]) -> dict[str, Any]:
    """Fields of *cls* with a plain default, which the stored form may leave out (a
    reader's dataclass fills them in). *keep* are written always: the readers of older
    versions index them directly."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in keep:
            continue
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


_RECORD = _droppable(Record, frozenset({"state"}))
_RECIPIENT = _droppable(RecipientState, frozenset({"state"}))
_ATTEMPT = _droppable(Attempt, frozenset())


def _strip(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    # `type(v) is type(default)`: 0 == False and 0.0 == 0 must not drop a different value.
    return {k: v for k, v in d.items()
            if k not in defaults or v != defaults[k] or type(v) is not type(defaults[k])}


def compact_json(rec: Record) -> bytes:
    """The record's stored document: :meth:`Record.to_json` without the fields that hold
    their default (``null``, ``false``, ``0``, ``[]``, ``{}``), which
    :meth:`Record.from_json` (this version's and the previous ones') fills in again.
    About half the size of a queued record's full JSON. Bytes, as Redis takes them (no
    decode here and encode again in the client)."""
    d = _strip(rec.to_dict(), _RECORD)
    d["recipients"] = [_strip(r, _RECIPIENT) for r in d["recipients"]]
    if "history" in d:
        d["history"] = [_strip(a, _ATTEMPT) for a in d["history"]]
    try:
        return orjson.dumps(d)
    except TypeError:
        # What only the json module writes (and Record.from_json reads back through it):
        # a lone surrogate, an integer past 64 bits, in a document an earlier version
        # wrote with json.dumps. Raising here failed the commit of a whole chunk after it
        # was sent (sent again, that record forever).
        return json.dumps(d).encode()
