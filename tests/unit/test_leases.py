"""Leases, the heartbeat and the delivery pass in one process (fakeredis + test server)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import fakeredis
import pytest

from mailworker.config import Settings
from mailworker.delivery import Deliverer, invalid_reason
from mailworker.leases import Heartbeat, HeldLeases
from mailworker.relay import parse_relay
from mailworker.smtp import PoolManager
from mailworker.store import Claim, MessageState, RecipientState, Record, Store
from mailworker.testing import Fault, SMTPTestServer
from mailworker.testing.polling import wait_until


def make_record(**kw: object) -> Record:
    now = time.time()
    defaults: dict[str, object] = dict(
        id=uuid.uuid4().hex, queue="transactional", relay="default", sender="a@example.com",
        recipients=[RecipientState("b@example.com")], created_at=now, expires_at=now + 3600,
        size=10,
    )
    defaults.update(kw)
    return Record(**defaults)  # type: ignore[arg-type]


def raw(rec: Record) -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.com\r\nMessage-ID: <{rec.id}@t>\r\n"
            f"Subject: t\r\n\r\nbody\r\n").encode()


@pytest.fixture
def store() -> Store:
    return Store(fakeredis.FakeRedis(), prefix=f"l{uuid.uuid4().hex[:6]}", retention=60)


@pytest.fixture
def server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer() as srv:
        yield srv


def claim(store: Store, rec: Record, token: str = "t1", lease: float = 30) -> Claim:
    store.enqueue_many([(rec, raw(rec))], watchdog=time.time() + 60)
    c = store.claim_many([rec.id], token, lease, time.time() + 60)[rec.id]
    assert isinstance(c, Claim)
    return c


def test_a_lease_taken_over_is_not_usable(store: Store) -> None:
    c = claim(store, make_record())
    held = HeldLeases(store, [c], 30, time.monotonic())
    assert held.usable(c.record.id)
    store.redis.delete(store.key("lease", c.record.id))
    store.claim_many([c.record.id], "other", 30, time.time() + 60)  # another worker
    held.renew()
    assert not held.usable(c.record.id) and held.lost == 1


def test_a_lease_not_renewed_in_time_is_not_usable(store: Store) -> None:
    # Redis unreachable: nothing is acknowledged, so the known validity runs out and no
    # transaction starts on it, although Redis might still hold the lease for us.
    c = claim(store, make_record())
    now = [100.0]
    held = HeldLeases(store, [c], 30, 100.0, clock=lambda: now[0])
    assert held.usable(c.record.id)
    now[0] = 100.0 + 30 * 0.79
    assert held.usable(c.record.id)
    now[0] = 100.0 + 30 * 0.81  # within the lease, but inside the safety margin
    assert not held.usable(c.record.id)


def test_heartbeat_renews_while_registered_and_stops_after(store: Store) -> None:
    c = claim(store, make_record(), lease=0.6)
    held = HeldLeases(store, [c], 0.6, time.monotonic())
    beats = {"n": 0}
    renew = held.renew

    def counting() -> None:
        beats["n"] += 1
        renew()

    held.renew = counting  # type: ignore[method-assign]
    hb = Heartbeat()
    hb.register(held)
    wait_until(lambda: beats["n"] >= 5, 10, message="five heartbeats")
    assert store.redis.exists(store.key("lease", c.record.id))  # 1 s+ later: still ours
    assert held.usable(c.record.id)
    hb.unregister(held)
    stopped = beats["n"]
    wait_until(lambda: not store.redis.exists(store.key("lease", c.record.id)), 5,
               message="the lease to expire once the batch is done")
    assert beats["n"] <= stopped + 1


class _Beats:
    """A HeldLeases stand-in that records when the heartbeat renewed it."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.at: list[float] = []

    def renew(self) -> None:
        self.at.append(time.monotonic())


class _CountingEvent:
    def __init__(self, wrapped: object) -> None:
        self.wrapped, self.sets = wrapped, 0

    def set(self) -> None:
        self.sets += 1
        self.wrapped.set()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)


def test_heartbeat_wakes_only_for_a_lease_due_before_its_next_planned_beat() -> None:
    hb = Heartbeat()
    long, short, later = _Beats(300.0), _Beats(0.6), _Beats(300.0)
    hb.register(long)  # type: ignore[arg-type]  # starts the thread; first beat in 100 s
    wait_until(lambda: hb._next_wake > 0, 5, message="the thread to plan its next beat")
    event = hb._wake = _CountingEvent(hb._wake)  # type: ignore[assignment]
    hb.register(later)  # type: ignore[arg-type]  # due after the planned beat: no wake-up
    assert event.sets == 0
    hb.register(short)  # type: ignore[arg-type]  # due in 0.2 s, long before: wake it
    assert event.sets == 1
    wait_until(lambda: len(short.at) >= 3, 10, message="three beats of the short lease")
    assert long.at == [] and later.at == []
    for held in (long, short, later):
        hb.unregister(held)  # type: ignore[arg-type]


def test_heartbeat_plans_the_first_renewal_from_registration_not_from_its_wake_up() -> None:
    hb = Heartbeat()
    first = _Beats(0.9)
    hb.register(first)  # type: ignore[arg-type]
    wait_until(lambda: hb._next_wake > 0, 5, message="the thread to plan its next beat")
    second = _Beats(0.9)  # due after first's beat: registered without a wake-up
    before = time.monotonic()
    hb.register(second)  # type: ignore[arg-type]
    after = time.monotonic()
    # The first renewal is planned lease/3 after registering (not lease/3 after the
    # thread next wakes, which could be up to lease/3 later: past the lease's margin),
    # and the thread is planned to wake no later than that.
    due = hb._held[id(second)][2]
    assert before + 0.3 <= due <= after + 0.3
    with hb._lock:
        assert hb._next_wake <= due  # 0.0 while it is awake and reading _held
    wait_until(lambda: len(second.at) >= 2, 10, message="two beats of the second lease")
    for held in (first, second):
        hb.unregister(held)  # type: ignore[arg-type]


def settings(server: SMTPTestServer) -> Settings:
    return Settings(relays={"default": parse_relay("default", server.dsn())})


def test_deliverer_sets_poison_aside_and_delivers_the_rest(
    store: Store, server: SMTPTestServer
) -> None:
    recs = [make_record() for _ in range(4)]
    store.enqueue_many([(r, raw(r)) for r in recs], watchdog=time.time() + 60)
    store.redis.hset(store.key("m", recs[1].id), "doc", json.dumps({"id": "?"}))
    bad = recs[2].to_dict()
    bad["expires_at"] = None
    store.redis.hset(store.key("m", recs[2].id), "doc", json.dumps(bad))
    pools = PoolManager()
    try:
        report = Deliverer(settings(server), store, pools).run([r.id for r in recs])
    finally:
        pools.close_all()
    assert report.quarantined == 2 and report.states == {"delivered": 2}
    got = store.get_many([r.id for r in recs])
    assert [g.state if g else None for g in got] == [
        MessageState.DELIVERED, MessageState.DEAD, MessageState.DEAD, MessageState.DELIVERED]
    assert len(server.messages) == 2


def test_a_message_whose_lease_was_taken_is_not_sent(
    store: Store, server: SMTPTestServer
) -> None:
    # Another worker takes message 3 of 5 while message 1 is slow at the relay: the first
    # worker learns it at its next window mark, before that message's MAIL FROM.
    server.add_fault(Fault.delay("DOT", 0.3, times=1))
    recs = [make_record() for _ in range(5)]
    store.enqueue_many([(r, raw(r)) for r in recs], watchdog=time.time() + 60)
    s = settings(server)
    pools = PoolManager()
    deliverer = Deliverer(s, store, pools)
    stolen = recs[3].id
    original = store.mark_sending

    def steal_then_mark(claims: list[Claim], lease: float) -> list[bool]:
        if any(c.record.id == stolen for c in claims):
            store.redis.set(store.key("lease", stolen), "other-worker")
        return original(claims, lease)

    store.mark_sending = steal_then_mark  # type: ignore[method-assign]
    import mailworker.delivery as delivery

    window = delivery.MARK_WINDOW
    delivery.MARK_WINDOW = 2  # windows [0,1] [2,3] [4]: message 3 is marked at index 2
    try:
        report = deliverer.run([r.id for r in recs])
    finally:
        delivery.MARK_WINDOW = window
        pools.close_all()
    sent = {m.message_id for m in server.messages}
    assert f"<{stolen}@t>" not in sent
    assert len(sent) == 3  # 0, 1 and 2; the gate stops at 3, and 4 waits for a new pass
    assert report.states == {"delivered": 3, "queued": 1} and report.lost_leases == 1
    rest = store.get(recs[4].id)
    assert rest is not None and rest.state is MessageState.QUEUED


def test_invalid_reason_names_the_field() -> None:
    assert invalid_reason(make_record()) is None
    assert "expires_at" in (invalid_reason(make_record(expires_at=float("nan"))) or "")
    assert "recipient" in (invalid_reason(make_record(recipients=[])) or "")
