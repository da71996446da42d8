"""The worker's hot path in few Redis round trips, with its guarantees kept: a window's
"sending" mark is in Redis before its first MAIL FROM, a record held without being sent
keeps no mark, and a batch of 50 costs a bounded number of round trips (counted, on a
real Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.connection

from mailworker.delivery import CHUNK, MARK_WINDOW
from mailworker.testing.local import LocalDelivery
from tests.unit.conftest import MakeLocal


def mail(i: int) -> dict[str, Any]:
    return {"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hello"}


@pytest.fixture
def real(make_local: MakeLocal, redis_url: str) -> LocalDelivery:
    return make_local(redis_client=redis.Redis.from_url(redis_url),
                      key_prefix=f"rt{uuid.uuid4().hex[:8]}")


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Requests written to Redis (a pipeline is one)."""
    count = [0]
    original = redis.connection.Connection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    yield count


def test_every_window_is_marked_in_redis_before_its_first_mail_from(
        real: LocalDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = real.send_many([mail(i) for i in range(40)])
    pool = real.pools.get(real.settings.relay("default"))
    send_many = pool.send_many
    checked: list[str] = []

    def watching(envelopes: Any, gate: Any = None, **kw: Any) -> Any:
        def checking_gate(i: int) -> bool:
            ok = bool(gate(i))
            if ok:  # about to write MAIL FROM: its mark must be in Redis already
                mid = envelopes[i].message_id
                assert real.redis.hget(real.store.keys.record(mid), "sending")
                checked.append(mid)
            return ok
        return send_many(envelopes, gate=checking_gate, **kw)

    monkeypatch.setattr(pool, "send_many", watching)
    real.run_until_idle()
    assert sorted(checked) == sorted(ids)
    assert {real.status(m)["state"] for m in ids} == {"delivered"}  # type: ignore[index]


def test_records_held_by_a_paused_relay_keep_no_sending_mark(real: LocalDelivery) -> None:
    ids = real.send_many([mail(i) for i in range(12)])
    real.store.pause_relay("default", 60, "maintenance")
    real.run_until_idle()
    assert real.server is not None and real.server.messages == []
    for mid in ids:
        rec = real.record(mid)
        assert rec is not None and rec.state.value == "deferred" and rec.attempts == 0
        assert real.redis.hget(real.store.keys.record(mid), "sending") is None
        assert not rec.possible_duplicate


def test_a_batch_of_50_costs_few_round_trips(real: LocalDelivery,
                                             round_trips: list[int]) -> None:
    real.run_until_idle()  # warm: the connection and its fleet slot, the scripts loaded
    real.deliver(real.send_many([mail(0)]))
    ids = real.send_many([mail(i) for i in range(50)])
    before = round_trips[0]
    report = real.deliver(ids)
    assert report.states == {"delivered": 50}
    chunks = -(-50 // CHUNK)
    mid_chunk_windows = sum(1 for j in range(0, 50, MARK_WINDOW) if j % CHUNK)
    # claim, pause and rate (with the first window's marks), the windows that start
    # inside a chunk, one commit per chunk (with feedback and the next chunk's marks)
    assert round_trips[0] - before <= 2 + mid_chunk_windows + chunks


@pytest.mark.parametrize("place", ["inflight", "deferred", "dead"])
def test_a_commit_takes_the_record_out_of_whatever_set_it_was_in(
        real: LocalDelivery, place: str) -> None:
    """The claim says whether the record was in flight; the commit then skips the other
    sets, and still cleans them when it was anywhere else (a stale wake-up of a deferred
    record, a dead letter retried)."""
    import time

    from mailworker.record import MessageState
    from mailworker.store import Claim

    store, k = real.store, real.store.keys
    [mid] = real.send_many([mail(0)])
    real.drop_wakeups()
    if place != "inflight":
        real.redis.zrem(k.inflight, mid)
        real.redis.zadd(getattr(k, place), {mid: time.time() + 600})
    [claim] = store.claim_many([mid], "tok", 30, time.time() + 60).values()
    assert isinstance(claim, Claim) and claim.in_flight is (place == "inflight")
    claim.record.state = MessageState.DELIVERED
    assert store.commit_many([(claim, 0.0, {"delivered": 1})]) == [True]
    for key in (k.inflight, k.deferred, k.dead):
        assert real.redis.zscore(key, mid) is None, key
