"""One wake-up rule for ``send()``, ``dlq retry`` and the scheduler: batches per
(queue, relay), and a failed publish left to the sweeper, never raised to the caller."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence

import fakeredis
import pytest

import mailworker
from mailworker import broker, dlq, runtime
from mailworker.config import Settings
from mailworker.publish import batches, wake
from mailworker.record import MessageState, RecipientState, Record
from mailworker.relay import parse_relay
from mailworker.scheduler import Scheduler
from mailworker.store import Claim

RELAYS = {name: parse_relay(name, "smtp://127.0.0.1:2525") for name in ("default", "other")}


class Broker:
    """A publisher that records batches and fails the ones it is told to."""

    def __init__(self, fail_from: int | None = None) -> None:
        self.sent: list[tuple[list[str], str]] = []
        self.fail_from = fail_from
        self.calls = 0

    def __call__(self, ids: Sequence[str], queue: str) -> None:
        self.calls += 1
        if self.fail_from is not None and self.calls > self.fail_from:
            raise ConnectionRefusedError(111, "broker down")
        self.sent.append((list(ids), queue))


@pytest.fixture
def pub() -> Iterator[Broker]:
    b = Broker()
    runtime.configure(Settings(relays=RELAYS, default_sender="app@example.com", batch_size=2),
                      redis_client=fakeredis.FakeRedis(), publisher=b)
    yield b
    runtime.reset_runtime()


def test_batches_group_by_queue_and_relay_in_order() -> None:
    routed = [("a", "q1", "r1"), ("b", "q1", "r2"), ("c", "q1", "r1"), ("d", "q2", "r1"),
              ("e", "q1", "r1")]
    assert batches(routed, 2) == [("q1", ["a", "c"]), ("q1", ["e"]), ("q1", ["b"]),
                                  ("q2", ["d"])]


def test_wake_stops_at_the_first_failure_and_returns_the_rest() -> None:
    b = Broker(fail_from=1)
    left = wake(b, [("a", "q", "r1"), ("b", "q", "r2"), ("c", "q", "r3")], 10)
    assert b.sent == [(["a"], "q")] and b.calls == 2  # no third try on a dead broker
    assert left == ["b", "c"]
    assert wake(Broker(), [("a", "q", "r")], 10) == []


def test_runtime_publisher_defaults_to_celery_and_can_be_swapped() -> None:
    try:
        rt = runtime.configure(Settings(), redis_client=fakeredis.FakeRedis())
        assert rt.publisher is broker.publish
        mine = Broker()
        assert runtime.configure(Settings(), redis_client=fakeredis.FakeRedis(),
                                 publisher=mine).publisher is mine
    finally:
        runtime.reset_runtime()


def test_send_batches_per_relay_and_survives_a_broker_outage(pub: Broker) -> None:
    ids = mailworker.send_many([{"to": f"u{i}@example.com", "relay": relay, "text": "t"}
                                for i, relay in enumerate(["default", "other"] * 3)])
    assert sorted(len(b) for b, _ in pub.sent) == [1, 1, 2, 2]  # batch_size 2, per relay
    assert {mid for b, _ in pub.sent for mid in b} == set(ids)
    pub.fail_from = pub.calls  # the broker goes down
    mid = mailworker.send(to="late@example.com", text="t")  # accepted: no error for the caller
    store = runtime.get_runtime().store
    assert store.get(mid) is not None
    assert store.redis.zscore(store.keys.inflight, mid) is not None  # the sweeper's to wake


def _dead(store_rt: runtime.Runtime, relay: str) -> str:
    now = time.time()
    rec = Record(id=uuid.uuid4().hex, queue="transactional", relay=relay,
                 sender="a@example.com", recipients=[RecipientState("b@example.com")],
                 created_at=now, expires_at=now + 60, size=1)
    store = store_rt.store
    store.enqueue_many([(rec, b"x")], watchdog=now + 60)
    claim = store.claim_many([rec.id], "t", 30, now + 60)[rec.id]
    assert isinstance(claim, Claim)
    claim.record.state = MessageState.DEAD
    assert store.commit_many([(claim, now, {})]) == [True]
    return rec.id


def test_dlq_retry_reports_the_retry_even_when_the_broker_is_down(pub: Broker) -> None:
    rt = runtime.get_runtime()
    ids = [_dead(rt, "default"), _dead(rt, "other"), _dead(rt, "default")]
    pub.fail_from = 0
    assert sorted(dlq.retry(ids)) == sorted(ids)  # requeued is requeued: no exception
    assert all(r is not None and r.state is MessageState.QUEUED
               for r in rt.store.get_many(ids))
    pub.fail_from = None
    assert dlq.retry([_dead(rt, "other")]) and len(pub.sent) == 1


def test_scheduler_wakes_per_relay_and_keeps_ticking_through_an_outage(pub: Broker) -> None:
    rt = runtime.get_runtime()
    now = time.time()
    ids = mailworker.send_many([{"to": "x@example.com", "relay": r, "delay": 30, "text": "t"}
                                for r in ("default", "other", "default")])
    assert pub.sent == []  # not due yet
    sched = Scheduler(rt.settings, rt.store, publish=rt.publisher, clock=lambda: now + 31)
    pub.fail_from = 0
    assert sched.tick() == 3  # promoted; the failed publish is logged, not raised
    assert rt.store.counts()["in_flight"] == 3
    pub.fail_from = None
    later = Scheduler(rt.settings, rt.store, publish=rt.publisher,
                      clock=lambda: now + 31 + rt.settings.stuck_after + 1)
    assert later.tick() == 3  # the sweeper wakes what the outage left
    assert sorted(sorted(b) for b, _ in pub.sent) == sorted(
        [sorted([ids[0], ids[2]]), [ids[1]]])
