"""Store transitions on fakeredis (fast) and on a real Redis (the same tests, parametrized)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis

from mailworker.store import (
    Claim,
    MessageState,
    RcptState,
    RecipientState,
    Record,
    Store,
    Unreadable,
)


def make_record(**kw: object) -> Record:
    now = time.time()
    defaults: dict[str, object] = dict(
        id=uuid.uuid4().hex, queue="transactional", relay="default", sender="a@example.com",
        recipients=[RecipientState("b@example.com"), RecipientState("c@example.com")],
        created_at=now, expires_at=now + 3600, size=100,
    )
    defaults.update(kw)
    return Record(**defaults)  # type: ignore[arg-type]


@pytest.fixture(params=["fake", "real"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "fake":
        client = fakeredis.FakeRedis()
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield Store(client, prefix=f"u{uuid.uuid4().hex[:6]}", retention=60, dead_retention=600)


def test_enqueue_and_read_back(store: Store) -> None:
    rec = make_record()
    [mid] = store.enqueue_many([(rec, b"raw")], watchdog=time.time() + 60)
    assert mid == rec.id
    back = store.get(mid)
    assert back is not None and back.recipients[1].address == "c@example.com"
    assert store.raw(mid) == b"raw"
    assert store.counts() == {"in_flight": 1, "deferred": 0, "dead": 0}


def test_idempotency_key_returns_first_id(store: Store) -> None:
    a, b = make_record(idempotency_key="k1"), make_record(idempotency_key="k1")
    ids = store.enqueue_many([(a, b"1"), (b, b"2")], watchdog=time.time() + 60)
    assert ids == [a.id, a.id]
    assert store.get(b.id) is None


def test_send_at_goes_to_deferred(store: Store) -> None:
    rec = make_record(send_at=time.time() + 100, state=MessageState.DEFERRED)
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    assert store.counts()["deferred"] == 1
    assert store.promote_due(time.time(), 10, time.time() + 60) == []
    assert store.promote_due(time.time() + 101, 10, time.time() + 60) == [rec.id]
    assert store.counts() == {"in_flight": 1, "deferred": 0, "dead": 0}


def test_lease_is_exclusive_and_commit_needs_it(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    first = store.claim_many([rec.id], "t1", 30, time.time() + 60)[rec.id]
    second = store.claim_many([rec.id], "t2", 30, time.time() + 60)[rec.id]
    assert second == "locked"
    assert not isinstance(first, str)
    first.record.state = MessageState.DELIVERED
    for r in first.record.recipients:
        r.state = RcptState.DELIVERED
    stolen = type(first)(first.record, first.raw, "not-the-token")
    assert store.commit_many([(stolen, time.time(), {})]) == [False]
    assert store.commit_many([(first, time.time(), {"delivered": 2})]) == [True]
    assert store.get(rec.id).state is MessageState.DELIVERED  # type: ignore[union-attr]
    assert store.counts()["in_flight"] == 0
    assert store.relay_stats()["default"]["delivered"] == 2
    assert 0 < store.redis.ttl(store.key("m", rec.id)) <= 60  # retention applies


def test_interrupted_send_is_reported_to_next_holder(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    first = store.claim_many([rec.id], "t1", 30, time.time() + 60)[rec.id]
    assert isinstance(first, Claim)
    store.mark_sending([first], 30)  # its transaction started, then the holder "dies"
    store.redis.delete(store.key("lease", rec.id))  # lease expired
    claim = store.claim_many([rec.id], "t2", 30, time.time() + 60)[rec.id]
    assert isinstance(claim, Claim) and claim.interrupted_at is not None


def test_release_clears_sending_marker(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    c = store.claim_many([rec.id], "t1", 30, time.time() + 60)[rec.id]
    assert isinstance(c, Claim)
    store.mark_sending([c], 30)
    store.release_many([c])
    again = store.claim_many([rec.id], "t2", 30, time.time() + 60)[rec.id]
    assert not isinstance(again, str) and again.interrupted_at is None


def test_sweep_finds_unleased_records_past_watchdog(store: Store) -> None:
    now = time.time()
    a, b = make_record(), make_record()
    store.enqueue_many([(a, b"x"), (b, b"y")], watchdog=now - 1)
    store.claim_many([b.id], "t", 30, now - 1)  # b is being worked on
    assert store.sweep(now, 10, 60) == [a.id]
    assert store.sweep(now, 10, 60) == []  # watchdog bumped
    assert store.sweep(now + 61, 10, 60) == [a.id]  # still nobody: woken again ...
    assert store.sweep(now + 121, 10, 60) == []  # ... but the next look waits twice as long
    assert store.sweep(now + 182, 10, 60) == [a.id]


def test_dead_letters_and_purge(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    c = store.claim_many([rec.id], "t", 30, time.time() + 60)[rec.id]
    assert not isinstance(c, str)
    c.record.state = MessageState.DEAD
    store.commit_many([(c, time.time(), {"dead": 1})])
    assert store.dead_ids() == [rec.id]
    assert 60 < store.redis.ttl(store.key("m", rec.id)) <= 600  # dead_retention, not retention
    assert store.purge([rec.id]) == 1
    assert store.get(rec.id) is None and store.dead_ids() == []


def test_relay_pause(store: Store) -> None:
    assert store.relay_pause("r") is None
    store.pause_relay("r", 30, "535 auth failed")
    reason, left = store.relay_pause("r")  # type: ignore[misc]
    assert reason == "535 auth failed" and 0 < left <= 30
    store.resume_relay("r")
    assert store.relay_pause("r") is None


def test_record_json_round_trip() -> None:
    rec = make_record(metadata={"k": "v"})
    rec.recipients[0].state = RcptState.FAILED
    assert Record.from_json(rec.to_json()) == rec


def test_scripts_reload_after_redis_forgets_them(store: Store) -> None:
    rec = make_record()
    store.redis.script_flush()  # as after a Redis restart or failover
    assert store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60) == [rec.id]
    assert store.get(rec.id) is not None


def test_purge_leaves_a_record_that_is_no_longer_dead(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    assert store.purge([rec.id]) == 0  # queued, not dead: an operator's retry won the race
    assert store.get(rec.id) is not None


def test_renew_and_commit_after_lease_expiry(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    c = store.claim_many([rec.id], "t1", 30, time.time() + 60)[rec.id]
    assert isinstance(c, Claim)
    assert store.renew_many([c], 30) == [True]
    assert store.mark_sending([c], 30) == [True]  # its transaction is about to start
    store.redis.delete(store.key("lease", rec.id))  # expired during a slow attempt ...
    assert store.renew_many([c], 30) == [False]
    c.record.state = MessageState.DELIVERED
    assert store.commit_many([(c, time.time(), {})]) == [True]  # ... nobody took it: saved
    other = make_record()
    store.enqueue_many([(other, b"x")], watchdog=time.time() + 60)
    c1 = store.claim_many([other.id], "t1", 30, time.time() + 60)[other.id]
    store.redis.delete(store.key("lease", other.id))
    store.claim_many([other.id], "t2", 30, time.time() + 60)  # another worker took it
    assert isinstance(c1, Claim)
    assert store.commit_many([(c1, time.time(), {})]) == [False]


def test_commit_after_expiry_needs_our_sending_mark(store: Store) -> None:
    # A record whose transaction never started (no mark) and whose lease ran out is not
    # ours to save any more: the sweeper wakes it and its next holder decides.
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    c = store.claim_many([rec.id], "t1", 30, time.time() + 60)[rec.id]
    assert isinstance(c, Claim)
    store.redis.delete(store.key("lease", rec.id))
    assert store.commit_many([(c, time.time(), {})]) == [False]


def test_claim_flags_only_records_whose_window_started(store: Store) -> None:
    a, b = make_record(), make_record()
    store.enqueue_many([(a, b"x"), (b, b"y")], watchdog=time.time() + 60)
    claims = store.claim_many([a.id, b.id], "dead-worker", 30, time.time() + 60)
    ca = claims[a.id]
    assert isinstance(ca, Claim) and ca.interrupted_at is None
    assert store.mark_sending([ca], 30) == [True]  # a's window started; b's never did
    for mid in (a.id, b.id):  # the worker is killed: its leases run out
        store.redis.delete(store.key("lease", mid))
    again = store.claim_many([a.id, b.id], "t2", 30, time.time() + 60)
    ra, rb = again[a.id], again[b.id]
    assert isinstance(ra, Claim) and ra.interrupted_at is not None
    assert isinstance(rb, Claim) and rb.interrupted_at is None


def test_mark_refuses_a_lease_taken_over(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    c1 = store.claim_many([rec.id], "t1", 30, time.time() + 60)[rec.id]
    store.redis.delete(store.key("lease", rec.id))
    store.claim_many([rec.id], "t2", 30, time.time() + 60)
    assert isinstance(c1, Claim)
    assert store.mark_sending([c1], 30) == [False]
    assert store.renew_many([c1], 30) == [False]


def test_s2_07_unreadable_record_is_quarantined_alone(store: Store) -> None:
    good, bad = make_record(), make_record()
    store.enqueue_many([(good, b"g"), (bad, b"raw bytes kept")], watchdog=time.time() + 60)
    store.redis.hset(store.key("m", bad.id), "doc", '{"id": "x", "new_field_from_v9": 1}')
    claims = store.claim_many([good.id, bad.id], "t1", 30, time.time() + 60)
    assert isinstance(claims[good.id], Claim)
    poison = claims[bad.id]
    assert isinstance(poison, Unreadable) and "KeyError" in poison.error
    assert store.quarantine_many([(bad.id, "t1", "unreadable record: x")]) == [True]
    assert store.redis.zscore(store.dead_key, bad.id) is not None
    assert store.redis.zscore(store.inflight_key, bad.id) is None
    assert store.raw(bad.id) == b"raw bytes kept"
    assert 60 < store.redis.ttl(store.key("m", bad.id)) <= 600  # kept like any dead letter
    shown = store.get(bad.id)
    assert shown is not None and shown.state is MessageState.DEAD
    assert shown.dead_reason == "unreadable record: x"
    assert store.get_many([good.id])[0] == good


def test_one_enqueue_script_honours_idempotency_keys_inside_its_batch(store: Store) -> None:
    # The batch is one script call (all or nothing under maxmemory: shown with a real
    # full Redis in tests/unit/test_api_redis.py); keys repeated inside it still dedupe.
    recs = [make_record() for _ in range(5)]
    items = [(r, b"x") for r in recs]
    items.append((make_record(id=recs[0].id, idempotency_key="k"), b"y"))
    ids = store.enqueue_many(items, watchdog=time.time() + 60)
    assert ids[:5] == [r.id for r in recs]
    dup = make_record(idempotency_key="k")
    again = store.enqueue_many([(dup, b"z"), (make_record(idempotency_key="k"), b"w")],
                               watchdog=time.time() + 60)
    assert again == [recs[0].id, recs[0].id]  # the key's first id, twice; nothing written
    assert store.get(dup.id) is None


def test_record_ids_lists_every_record_of_this_prefix_only(store: Store) -> None:
    recs = [make_record() for _ in range(3)]
    store.enqueue_many([(r, b"x") for r in recs], watchdog=time.time() + 60)
    other = Store(store.redis, prefix=store.prefix + "x")
    other.enqueue_many([(make_record(), b"y")], watchdog=time.time() + 60)
    assert store.record_ids() == sorted(r.id for r in recs)


def test_routes_without_parsing_records(store: Store) -> None:
    rec = make_record(queue="bulk", relay="ses")
    store.enqueue_many([(rec, b"x")], watchdog=time.time() + 60)
    assert store.routes([rec.id, "missing"]) == [("bulk", "ses"), None]


def _dead_letter(store: Store, rec: Record, at: float) -> None:
    store.enqueue_many([(rec, b"x")], watchdog=at + 60)
    c = store.claim_many([rec.id], "t", 30, at + 60)[rec.id]
    assert isinstance(c, Claim)
    c.record.state = MessageState.DEAD
    assert store.commit_many([(c, at, {"dead": 1})]) == [True]


def test_dead_retention_bounds_dead_letters_and_a_retry_lifts_it(store: Store) -> None:
    rec = make_record()
    _dead_letter(store, rec, time.time())
    key = store.keys.record(rec.id)
    assert 60 < store.redis.ttl(key) <= 600
    # An operator's retry (dlq retry commits it queued): live again, with no expiry ...
    c = store.claim_many([rec.id], "op", 30, time.time() + 60)[rec.id]
    assert isinstance(c, Claim)
    c.record.state = MessageState.QUEUED
    assert store.commit_many([(c, time.time() + 60, {})]) == [True]
    assert store.redis.ttl(key) == -1 and store.dead_ids() == []
    # ... and once delivered, it keeps `retention` like any finished record.
    c = store.claim_many([rec.id], "w", 30, time.time() + 60)[rec.id]
    assert isinstance(c, Claim)
    c.record.state = MessageState.DELIVERED
    assert store.commit_many([(c, time.time(), {})]) == [True]
    assert 0 < store.redis.ttl(key) <= 60


def test_dead_set_forgets_letters_past_dead_retention(store: Store) -> None:
    old, new = make_record(), make_record()
    now = time.time()
    _dead_letter(store, old, now - 601)  # its record has expired by now
    _dead_letter(store, new, now)
    assert store.dead_ids() == [new.id]  # the index is bounded like the records


def test_dead_retention_zero_keeps_dead_letters(store: Store) -> None:
    keep = Store(store.redis, prefix=store.prefix, retention=60, dead_retention=0)
    rec = make_record()
    _dead_letter(keep, rec, time.time())
    assert keep.redis.ttl(keep.keys.record(rec.id)) == -1


def test_scheduler_lock_is_held_by_one_holder(store: Store) -> None:
    assert store.hold_scheduler_lock("a", 5)
    assert store.hold_scheduler_lock("a", 5)  # extended: still ours
    assert not store.hold_scheduler_lock("b", 5)
    store.redis.delete(store.keys.scheduler_lock)  # a's lock lapsed
    assert store.hold_scheduler_lock("b", 5)
    assert 0 < store.redis.pttl(store.keys.scheduler_lock) <= 5000


def test_relay_state_failures_and_fleet_slots(store: Store) -> None:
    relays = store.relays
    assert [relays.failed("r"), relays.failed("r")] == [1, 2]
    assert 0 < store.redis.ttl(store.keys.relay_failures("r")) <= 3600
    relays.succeeded("r")
    assert relays.failed("r") == 1
    slot = {"ceiling": 3, "initial": 1, "hold_seconds": 30}
    assert relays.take_slot("r", "w1", **slot) == (True, 1, 1.0)
    assert relays.take_slot("r", "w2", **slot) == (False, 1, 1.0)  # the window is 1
    relays.release("r", "w1")
    assert relays.take_slot("r", "w2", **slot)[0]
    relays.renew_slots([("r", "w2"), ("r", "gone")], 60)
    assert store.redis.zcard(store.keys.slots("r")) == 1  # a slot not held is not made


def test_dead_retention_setting_reaches_the_store() -> None:
    from mailworker import runtime
    from mailworker.config import load_settings

    settings = load_settings(environ={"MAILWORKER_DEAD_RETENTION": "45d"})
    assert settings.dead_retention == 45 * 86400 and settings.retention == 7 * 86400
    try:
        rt = runtime.configure(settings, redis_client=fakeredis.FakeRedis())
        assert (rt.store.dead_retention, rt.store.retention) == (45 * 86400, 7 * 86400)
    finally:
        runtime.reset_runtime()
    assert load_settings(environ={}).dead_retention == 30 * 86400
