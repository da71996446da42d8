"""One bad record never blocks the others, and is never sent by a stale wake-up.

Records go bad in Redis (a hand edit, another version's writer, a bug): each case below
corrupts one record of a batch and checks that it alone is set aside, with its raw bytes,
that its batch-mates are delivered once each, and that nothing loops.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mailworker import dlq
from mailworker.delivery import Deliverer
from mailworker.store import Store
from mailworker.testing.local import LocalDelivery
from tests.unit.conftest import MakeLocal


def mail(i: int) -> dict[str, Any]:
    return {"to": f"u{i}@example.com", "subject": f"m{i}", "text": "hi\n"}


def edit(store: Store, mid: str, **changes: Any) -> None:
    key = store.keys.record(mid)
    doc = json.loads(store.redis.hget(key, "doc"))
    doc.update(changes)
    store.redis.hset(key, "doc", json.dumps(doc))


def copies(local: LocalDelivery) -> list[int]:
    assert local.server is not None
    return sorted(local.server.deliveries().values())


@pytest.mark.parametrize("changes", [
    {"attempts": "x"},                      # a counter that is not a number
    {"next_attempt_at": "soon"},            # a time that is not a number
    {"id": "someone-else"},                 # a document that is not its key's
    {"recipients": [{"address": "u1@example.com", "state": "pending", "attempts": None}]},
    {"expires_at": None},
])
def test_a_corrupt_record_is_set_aside_alone(make_local: MakeLocal,
                                             changes: dict[str, Any]) -> None:
    local = make_local()
    ids = local.send_many([mail(i) for i in range(4)])
    raw = local.store.raw(ids[1])
    edit(local.store, ids[1], **changes)
    local.run_until_idle()
    states = [local.status(i)["state"] for i in ids]  # type: ignore[index]
    assert states == ["delivered", "dead", "delivered", "delivered"]
    assert copies(local) == [1, 1, 1]
    bad = local.record(ids[1])
    assert bad is not None and (bad.dead_reason or "").startswith(
        ("invalid record", "unreadable record"))
    assert local.store.raw(ids[1]) == raw
    assert local.store.quarantined(ids) == [False, True, False, False]


def test_a_failure_after_the_send_sets_aside_that_record_and_saves_the_rest(
    make_local: MakeLocal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Something no check foresaw breaks while one record's outcome is folded in, after
    # its mail went out: it is set aside (the reason says what the relay accepted) and the
    # rest of its chunk is saved, instead of the whole chunk being sent again and again.
    import mailworker.delivery as delivery

    local = make_local()
    ids = local.send_many([mail(i) for i in range(4)])
    real = delivery.apply_result

    def flaky(record: Any, *args: Any, **kw: Any) -> Any:
        if record.id == ids[2]:
            raise TypeError("boom")
        return real(record, *args, **kw)

    monkeypatch.setattr(delivery, "apply_result", flaky)
    local.run_until_idle()
    states = [local.status(i)["state"] for i in ids]  # type: ignore[index]
    assert states == ["delivered", "delivered", "dead", "delivered"]
    assert copies(local) == [1, 1, 1, 1]
    bad = local.record(ids[2])
    assert bad is not None and "accepted for u2@example.com" in (bad.dead_reason or "")


def test_a_quarantined_record_is_not_sent_by_a_stale_wake_up_and_dlq_retry_readmits_it(
    make_local: MakeLocal,
) -> None:
    local = make_local()
    [mid] = local.send_many([mail(7)])
    good = local.store.redis.hget(local.store.keys.record(mid), "doc")
    edit(local.store, mid, attempts="x")
    local.run_until_idle()
    assert local.status(mid)["state"] == "dead"  # type: ignore[index]
    report = local.deliver([mid])  # a stale or duplicate wake-up
    assert report.skipped == {"quarantined": 1} and copies(local) == []
    # The operator fixes the document and retries it: it goes out once.
    local.store.redis.hset(local.store.keys.record(mid), "doc", good)
    assert dlq.retry([mid], publish=local.publish) == [mid]
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]
    assert copies(local) == [1]


def test_fields_from_a_newer_version_are_kept_not_quarantined(make_local: MakeLocal) -> None:
    # A rolling deploy: a newer worker wrote fields this version does not know.
    local = make_local()
    [mid] = local.send_many([mail(1)])
    key = local.store.keys.record(mid)
    doc = json.loads(local.store.redis.hget(key, "doc"))
    doc["priority_v9"] = 5
    doc["recipients"][0]["tracking_v9"] = {"id": 1}
    local.store.redis.hset(key, "doc", json.dumps(doc))
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]
    saved = json.loads(local.store.redis.hget(key, "doc"))
    assert saved["priority_v9"] == 5 and saved["recipients"][0]["tracking_v9"] == {"id": 1}


def test_a_record_without_a_route_still_gets_a_wake_up(make_local: MakeLocal) -> None:
    local = make_local()
    ids = local.send_many([mail(1), mail(2)])
    local.drop_wakeups()
    local.store.redis.hdel(local.store.keys.record(ids[0]), "route")
    local.store.redis.hset(local.store.keys.record(ids[1]), "route", b"\xff\xfe bad")
    local.advance(local.settings.stuck_after + 1)  # their wake-ups were lost: sweep them
    local.run_until_idle()
    assert [local.status(i)["state"] for i in ids] == ["delivered", "delivered"]  # type: ignore[index]


def test_expired_mail_is_dead_before_the_batch_talks_smtp(
    make_local: MakeLocal, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = make_local()
    ids = local.send_many([mail(1), mail(2)])
    edit(local.store, ids[0], expires_at=local.clock() - 1)
    seen: list[str] = []
    real = Deliverer._deliver_group

    def spy(self: Deliverer, *args: Any, **kw: Any) -> Any:
        seen.append(local.status(ids[0])["state"])  # type: ignore[index]
        return real(self, *args, **kw)

    monkeypatch.setattr(Deliverer, "_deliver_group", spy)
    local.run_until_idle()
    assert seen == ["dead"]
    assert local.status(ids[1])["state"] == "delivered"  # type: ignore[index]


def test_enqueue_with_a_sub_second_retention_writes_the_whole_batch(
    make_local: MakeLocal,
) -> None:
    local = make_local()
    store = Store(local.store.redis, prefix="tiny", retention=0.5)
    from mailworker import api

    items = api.prepare_many([{**mail(i), "idempotency_key": f"k{i}"} for i in range(3)])
    assert store.enqueue_many(items, watchdog=local.clock() + 60) == [r.id for r, _ in items]


def test_a_fleet_slot_is_renewed_with_the_leases(make_local: MakeLocal) -> None:
    local = make_local()
    relays = local.store.relays
    assert relays.take_slot("r", "tok", ceiling=1, initial=1, hold_seconds=5)[0]
    key = local.store.keys.slots("r")
    before = local.store.redis.zscore(key, "tok")
    relays.renew_slot("r", "tok", 60)
    assert local.store.redis.zscore(key, "tok") > before + 50
    relays.release("r", "tok")
    relays.renew_slot("r", "tok", 60)  # released: never taken back
    assert local.store.redis.zscore(key, "tok") is None


def test_a_record_without_message_bytes_is_never_sent_empty(make_local: MakeLocal) -> None:
    local = make_local()
    ids = local.send_many([mail(1), mail(2)])
    local.store.redis.hdel(local.store.keys.record(ids[0]), "raw")
    local.run_until_idle()
    assert [local.status(i)["state"] for i in ids] == ["dead", "delivered"]  # type: ignore[index]
    assert local.server is not None and len(local.server.messages) == 1


def test_a_key_of_the_wrong_type_fails_only_itself(make_local: MakeLocal) -> None:
    local = make_local()
    ids = local.send_many([mail(1), mail(2)])
    key = local.store.keys.record(ids[0])
    local.store.redis.delete(key)
    local.store.redis.set(key, "not a record")
    local.advance(local.settings.stuck_after + 1)
    local.run_until_idle()
    assert local.status(ids[1])["state"] == "delivered"  # type: ignore[index]
    bad = local.status(ids[0])
    assert bad is not None and bad["state"] == "dead"
    assert ids[0] in local.store.dead_ids() and local.server is not None
    assert len(local.server.messages) == 1
    local.drop_wakeups()
    local.advance(3600)
    assert local.tick() == 0  # never woken again


def test_an_idempotency_key_outlives_a_long_deferral(make_local: MakeLocal) -> None:
    # The key lives for the message's lifetime plus retention, not retention from enqueue:
    # a repeat while the message still waits finds it.
    local = make_local()
    [mid] = local.send_many([{**mail(1), "idempotency_key": "order-9"}])
    ttl = local.store.redis.ttl(local.store.keys.idem("order-9"))
    rec = local.record(mid)
    assert rec is not None
    assert ttl >= rec.expires_at - rec.created_at + local.store.retention - 5


def test_an_address_the_envelope_refuses_is_set_aside_and_counted(make_local: MakeLocal) -> None:
    local = make_local()
    ids = local.send_many([mail(1), mail(2)])
    edit(local.store, ids[0], sender="bad sender@example.com")  # a string, but no address
    report = local.deliver(ids)
    assert report.quarantined == 1 and report.states == {"delivered": 1}
    assert local.status(ids[0])["state"] == "dead"  # type: ignore[index]
