"""Deliver once, never stall: leases against a slow relay, poison records, with real workers.

Timings are scaled down (leases of a few seconds instead of 15) so the runs stay short;
the relations between them are the defaults' (heartbeat every lease / 3).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

import mailworker
from mailworker.store import MessageState
from mailworker.testing import Fault
from tests.conftest import WorkerProcess
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration
StartWorker = Callable[..., WorkerProcess]


def test_s2_01_slow_honest_relay_gets_each_message_once(
    mw: Env, start_worker: StartWorker, mw_env: dict[str, str]
) -> None:
    # The review's relay, scaled down: every final dot is answered after 1 s, so one batch
    # of 12 takes about 12 s, four leases long. Before the heartbeat, the sweeper woke the
    # ids while the first thread still sent them and other threads sent them again.
    mw.server.add_fault(Fault.delay("DOT", 1.0))
    mw_env.update(MAILWORKER_RELAY_DEFAULT=mw.server.dsn(deadline=8, timeout=5),
                  MAILWORKER_LEASE_SECONDS="3", MAILWORKER_STUCK_AFTER="1",
                  MAILWORKER_BATCH_SIZE="50")
    worker = start_worker("-c", "4", env=mw_env)
    ids = mailworker.send_many(
        [{"to": "a@example.com", "subject": f"m{i:02d}", "text": "t"} for i in range(12)])
    recs = mw.final(ids, timeout=90)
    got = mw.server.deliveries()
    copies = {r.id: got[(r.message_id, "a@example.com")] for r in recs}
    print(f"\nS2-01: copies at the relay per message: {sorted(copies.values())}")
    assert all(r.state is MessageState.DELIVERED for r in recs)
    assert all(n == 1 for n in copies.values()), copies
    assert not any(r.possible_duplicate for r in recs)
    log = worker.log.read_text()
    assert "delivery.lease_lost" not in log


def test_s2_07_poison_record_never_blocks_its_batch_mates(
    mw: Env, start_worker: StartWorker
) -> None:
    ids = mailworker.send_many(
        [{"to": f"u{i}@example.com", "subject": f"p{i}", "text": "t"} for i in range(6)])
    # Two records go bad before any worker sees them: one unparsable (a field from a
    # newer version), one with a stored expiry that is not a number.
    r = mw.store.redis
    r.hset(mw.store.key("m", ids[1]), "doc", json.dumps({"id": ids[1], "from_v9": True}))
    doc = json.loads(r.hget(mw.store.key("m", ids[3]), "doc"))
    doc["expires_at"] = None
    r.hset(mw.store.key("m", ids[3]), "doc", json.dumps(doc))
    raw_before = mw.store.raw(ids[1])
    start_worker()
    mw.final(ids, timeout=30)
    recs = mw.store.get_many(ids)
    states = [rec.state if rec else None for rec in recs]
    assert states == [MessageState.DELIVERED, MessageState.DEAD, MessageState.DELIVERED,
                      MessageState.DEAD, MessageState.DELIVERED, MessageState.DELIVERED]
    assert recs[1] is not None and (recs[1].dead_reason or "").startswith("unreadable record")
    assert recs[3] is not None and "expires_at is None" in (recs[3].dead_reason or "")
    assert mw.store.raw(ids[1]) == raw_before  # kept for the operator
    assert set(mw.store.dead_ids()) == {ids[1], ids[3]}
    status = mailworker.status(ids[1])
    assert status is not None and status["state"] == "dead"


def test_killed_worker_mail_moves_again_within_the_lease(
    mw: Env, start_worker: StartWorker, mw_env: dict[str, str]
) -> None:
    # A worker killed while the relay holds its batch: the mail is retried by the other
    # worker within lease + stuck_after (+ a tick), not after minutes.
    mw.server.add_fault(Fault.delay("DOT", 0.5))
    mw_env.update(MAILWORKER_LEASE_SECONDS="3", MAILWORKER_STUCK_AFTER="1",
                  MAILWORKER_BATCH_SIZE="20")
    victim = start_worker("-c", "1", env=mw_env)
    ids = mailworker.send_many(
        [{"to": "k@example.com", "subject": f"k{i}", "text": "t"} for i in range(20)])
    from tests.conftest import wait_until

    wait_until(lambda: len(mw.server.messages) >= 2, 30, message="the batch under way")
    victim.kill()
    killed_at = time.monotonic()
    start_worker("-c", "2", env=mw_env)
    recs = mw.final(ids, timeout=60)
    took = time.monotonic() - killed_at
    print(f"\nall 20 final {took:.1f} s after the kill (lease 3 s, stuck_after 1 s)")
    got = mw.server.deliveries()
    flagged = [r for r in recs if r.possible_duplicate]
    dupes = [r for r in recs if got[(r.message_id, "k@example.com")] > 1]
    assert all(r.state is MessageState.DELIVERED for r in recs)
    assert all(r in flagged for r in dupes)  # every second copy is flagged
    assert len(flagged) <= 8  # only the killed window, not the whole batch of 20
