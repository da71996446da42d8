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
