"""BDAT pipelining end to end: a real worker, real Redis, and a relay (SMTPTestServer with
CHUNKING) that drops the connection in the middle of a pipelined window.

The fault: after reading the k-th ``BDAT ... LAST`` of the run, the server records that
message (unacknowledged) and closes the connection without a reply. At that moment the
client has up to ``pipeline_window`` transactions in flight: the earlier ones' final
replies were written (and may or may not have been read before the close), the k-th got
none, and the later ones were never read by the server. What must hold:

* nothing is lost: every message ends up delivered;
* no message reaches the relay more often than ``1 + (1 if flagged possible_duplicate)``;
* the flagged ones are exactly those in flight whose final reply was not read: the k-th
  is flagged; the others flagged (at most a window) were never read by the server, so
  their one copy is the retry's; a message the server answered on the dropped connection
  before hanging up is not flagged (its reply was sent, and the client reads it); every
  unflagged message reached the relay exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import mailworker
from mailworker.relay import parse_relay
from mailworker.store import MessageState
from mailworker.testing import Fault
from tests.conftest import WorkerProcess
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration

#: The relay's default window, which the worker uses here.
WINDOW = parse_relay("default", "smtp://127.0.0.1:25").pipeline_window


@pytest.fixture
def mw_server_options() -> dict[str, Any]:
    """The ``mw`` fixture's relay offers CHUNKING (and PIPELINING)."""
    return {"chunking": True}


@pytest.mark.parametrize("k", [1, 5, 12])
def test_a_connection_dropped_mid_window_loses_nothing_and_flags_the_unread(
        mw: Env, start_worker: Callable[..., WorkerProcess], k: int) -> None:
    mw.server.add_fault(Fault.drop_after_dot(nth=k, times=1))
    ids = mailworker.send_many([{"to": f"user{i}@example.com", "subject": f"s{i}",
                                 "text": f"message {i}\n" * 50} for i in range(40)])
    start_worker()
    records = mw.final(ids, timeout=90)

    assert all(r.state is MessageState.DELIVERED for r in records), \
        [(r.id, r.state) for r in records if r.state is not MessageState.DELIVERED]
    (dropped_conn,) = [c for c, f in mw.server.faults_triggered
                       if f.kind == "drop_after_dot"]
    messages = mw.server.messages
    copies = Counter(m.message_id for m in messages)
    acked = mw.server.deliveries()
    on_dropped = {m.message_id for m in messages if m.connection_id == dropped_conn}
    (unanswered,) = [m.message_id for m in messages if not m.acknowledged]
    flagged = {r.message_id for r in records if r.possible_duplicate}

    assert any("BDAT" in line for _, line in mw.server.commands), "the worker used BDAT"
    for rec in records:
        mid = rec.message_id
        assert acked[(mid, rec.recipients[0].address)] >= 1, f"{mid} was never delivered"
        assert copies[mid] <= 1 + (1 if rec.possible_duplicate else 0), (
            f"{mid}: {copies[mid]} copies, possible_duplicate={rec.possible_duplicate}")
        if not rec.possible_duplicate:
            assert copies[mid] == 1
    assert unanswered in flagged, "the message whose reply never came is flagged"
    assert len(flagged) <= WINDOW, "only transactions in flight can be flagged"
    # Every other flagged message was in flight and never read by the server: its only
    # copy is the retry's. A message the server answered before it hung up is not flagged
    # (the client reads the replies that arrived before the connection went away).
    for mid in flagged - {unanswered}:
        assert mid not in on_dropped and copies[mid] == 1, mid
