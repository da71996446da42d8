"""Adversarial review of BDAT pipelining: "deliver once, never stall" against hostile relays.

Each test is a finding's repro (or a confirmation that a suspected hole holds): which
transactions are uncertain, NotAttempted or refused when a relay misbehaves at every
position of a window, and that nothing possibly sent is ever sent again without the
uncertainty travelling with it.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from mailworker.smtp import (
    Connection,
    DeliveryUncertain,
    Envelope,
    NotAttempted,
    Pool,
    SendResult,
    Stage,
    failure_of,
)
from mailworker.smtp.connection import prepare

from .helpers import envelope, relay_for
from .test_bdat import CLOSE, BdatServer, bdat_server, kind, send

__all__ = ["bdat_server"]  # the fixture, re-used from test_bdat


def copies(server: Any) -> dict[str, int]:
    """How many times the test server recorded each Message-ID."""
    out: dict[str, int] = {}
    for m in server.messages:
        out[m.message_id] = out.get(m.message_id, 0) + 1
    return out


# -- a reply to the first MAIL of a window on a reused connection ------------------------------

def test_pool_never_resends_a_window_it_marked_uncertain(make_server: Any) -> None:
    """A 421 to the first MAIL of a window looks like a stale connection, but the rest of
    the window was written (content included): those transactions are uncertain and the
    pool must not send them again on a fresh connection as if nothing had gone out."""
    from mailworker.testing import Fault

    server = make_server(chunking=True)
    # The 2nd MAIL the server sees (the first of the second batch) gets 421, but the server
    # carries on (a hostile relay): the rest of that window is taken and queued.
    server.add_fault(Fault.reply("MAIL", 421, "4.3.2 busy", nth=2, times=1))
    pool = Pool(relay_for(server, pipeline_window=8))
    try:
        assert isinstance(pool.send(envelope(100)), SendResult)
        entries = pool.send_many([envelope(i) for i in range(4)])
    finally:
        pool.close()
    counts = copies(server)
    for i, entry in enumerate(entries):
        mid = f"<m{i}@example.test>"
        if isinstance(entry, SendResult):  # reported delivered: exactly once, unflagged
            assert counts.get(mid, 0) == 1, (i, counts)
        else:
            assert counts.get(mid, 0) <= 1
    assert kind(entries[0]) == "mail 421"
    assert [kind(e) for e in entries[1:]] == ["uncertain"] * 3


# -- a 452 split waiting while the connection dies ------------------------------------------------

def test_split_part_not_written_keeps_the_accepted_part(bdat_server: Any) -> None:
    """Envelope 0: a accepted, b 452 (split into a later transaction). The connection dies
    on message 1 before the split part goes out: envelope 0 must not be NotAttempted (the
    caller would send it again, a second copy for a) but a failure that carries a's
    acceptance, with b left to retry."""
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "RCPT" and n == 0 and "b@" in line:
            return b"452 4.5.3 too many recipients\r\n"
        return CLOSE if verb == "RCPT" and n == 1 else None

    server = bdat_server(script)
    envs = [envelope(0, ("a@example.test", "b@example.test")), envelope(1), envelope(2)]
    entries, _ = send(server, envs, pipeline_window=2)
    first = entries[0]
    assert not isinstance(first, NotAttempted), first
    assert isinstance(first, BaseException)
    partial = failure_of(first).partial
    assert partial is not None
    assert [r.recipient for r in partial.accepted] == ["a@example.test"]
    assert kind(entries[1]) == "uncertain"
    assert kind(entries[2]) == "not-attempted"
