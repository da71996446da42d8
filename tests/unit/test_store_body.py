"""A record's layout in Redis (mailworker.store.body): compressed bodies, compact documents,
bodies dropped once delivered; and that every path still sends exactly the bytes accepted,
on fakeredis and on a real Redis."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis

from mailworker import dlq
from mailworker.record import Attempt, MessageState, RcptState, RecipientState, Record, Reply
from mailworker.store import Claim, Store
from mailworker.store.body import COMPRESS_MIN, HUFFMAN_MIN, body_of, compact_json, pack
from mailworker.testing import Fault
from tests.unit.conftest import MakeLocal

_WORDS = "order parcel shipped tracking thank you for your the of and to a in"
WORDS = _WORDS.split()


def text(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(n // 4))
    return "\r\n".join(words[i:i + 76] for i in range(0, len(words), 76)).encode()[:n]


def make_record(**kw: Any) -> Record:
    now = time.time()
    base: dict[str, Any] = dict(
        id=uuid.uuid4().hex, queue="transactional", relay="default", sender="a@example.com",
        recipients=[RecipientState("b@example.com")], created_at=now,
        expires_at=now + 3600, size=100)
    base.update(kw)
    return Record(**base)


# -- pack / body_of ----------------------------------------------------------------------

def test_small_bodies_are_stored_as_they_are() -> None:
    small = text(COMPRESS_MIN - 1)
    assert pack(small) == ("raw", small)


def test_large_bodies_are_compressed_and_come_back_byte_for_byte() -> None:
    for body in (text(COMPRESS_MIN), text(20_000) + b"\r\n.\r\n..\r\n",
                 text(HUFFMAN_MIN + 10) + b"\x00\xff\r\n"):
        field, stored = pack(body)
        assert field == "zraw" and len(stored) < len(body)
        assert body_of(None, stored) == body


def test_a_body_that_does_not_shrink_is_stored_as_it_is() -> None:
    noise = os.urandom(50_000)
    assert pack(noise) == ("raw", noise)
    assert body_of(noise, None) == noise and body_of(None, None) is None


# -- compact documents --------------------------------------------------------------------

def test_compact_document_reads_back_as_the_same_record() -> None:
    rec = make_record(
        attempts=2, next_attempt_at=0.0, possible_duplicate=True, metadata={"n": 0},
        recipients=[RecipientState("b@example.com", RcptState.DELIVERED, 1,
                                   Reply(250, "ok", "2.0.0", "dot"), 5.0),
                    RecipientState("c@example.com", attempts=0, possible_duplicate=False)],
        history=[Attempt(1, 1.0, 2.0, "delivered", "default",
                         replies=[{"code": 250, "text": "ok"}])])
    doc = compact_json(rec)
    assert Record.from_json(doc).to_dict() == rec.to_dict()
    assert len(doc) < len(rec.to_json().encode())
    assert b'"next_attempt_at":0.0' in doc  # a value equal to a default of another type stays
    assert b"null" not in compact_json(make_record())


def test_fields_of_a_newer_version_are_kept() -> None:
    d = make_record().to_dict()
    d["from_the_future"] = {"x": 1}
    rec = Record.from_json(__import__("json").dumps(d))
    assert b'"from_the_future":{"x":1}' in compact_json(rec)


# -- the store, on fakeredis and on a real Redis -------------------------------------------

@pytest.fixture(params=["fake", "real"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    client: redis.Redis = (fakeredis.FakeRedis() if request.param == "fake" else
                           redis.Redis.from_url(request.getfixturevalue("redis_url")))
    yield Store(client, prefix=f"b{uuid.uuid4().hex[:6]}", retention=60, dead_retention=600)


def test_claim_and_raw_give_the_accepted_bytes(store: Store) -> None:
    big, small = text(30_000, 1), b"Subject: hi\r\n\r\nhello\r\n"
    recs = [make_record(size=len(big)), make_record(size=len(small))]
    store.enqueue_many([(recs[0], big), (recs[1], small)], time.time() + 60)
    fields = [store.redis.hkeys(store.keys.record(r.id)) for r in recs]
    assert b"zraw" in fields[0] and b"raw" not in fields[0]
    assert b"raw" in fields[1] and b"zraw" not in fields[1]
    claims = store.claim_many([r.id for r in recs], "t", 30, time.time() + 60)
    got = [c.raw for c in claims.values() if isinstance(c, Claim)]
    assert got == [big, small]
    assert store.raw(recs[0].id) == big and store.raw(recs[1].id) == small


def test_a_record_written_by_the_previous_version_is_read(store: Store) -> None:
    """Full JSON document and an uncompressed raw field, as before compression existed."""
    rec, raw = make_record(), text(30_000, 2)
    store.redis.hset(store.keys.record(rec.id),
                     mapping={"doc": rec.to_json(), "raw": raw, "route": "transactional default"})
    store.redis.zadd(store.keys.inflight, {rec.id: time.time() + 60})
    [claim] = store.claim_many([rec.id], "t", 30, time.time() + 60).values()
    assert isinstance(claim, Claim) and claim.raw == raw
    assert claim.record.to_dict() == rec.to_dict()


def test_a_damaged_compressed_body_is_unreadable_not_other_mail(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, text(30_000))], time.time() + 60)
    store.redis.hset(store.keys.record(rec.id), "zraw", b"not zlib")
    [claim] = store.claim_many([rec.id], "t", 30, time.time() + 60).values()
    assert not isinstance(claim, Claim) and "error" in str(claim)


def test_a_delivered_record_keeps_its_document_not_its_body(store: Store) -> None:
    rec = make_record()
    store.enqueue_many([(rec, text(30_000))], time.time() + 60)
    [claim] = store.claim_many([rec.id], "t", 30, time.time() + 60).values()
    assert isinstance(claim, Claim)
    claim.record.state = MessageState.DELIVERED
    assert store.commit_many([(claim, 0.0, {"delivered": 1})]) == [True]
    assert store.redis.hkeys(store.keys.record(rec.id)) and store.raw(rec.id) is None
    assert 0 < store.redis.ttl(store.keys.record(rec.id)) <= 60
    # A stale wake-up claims it as final (released by the deliverer), not as unreadable.
    [again] = store.claim_many([rec.id], "t2", 30, time.time() + 60).values()
    assert isinstance(again, Claim) and again.raw == b""
    assert again.record.state is MessageState.DELIVERED


# -- through the real deliverer, on a real Redis -------------------------------------------

def _message(i: int) -> dict[str, Any]:
    body = text(12_000, i).decode()
    return {"to": f"r{i}@example.com", "subject": f"byte-exact {i}", "text": body,
            "attachments": [("data.bin", b"\x00\r\n.\r\n" + os.urandom(3000), "application/x")]}


@pytest.fixture
def real_local(make_local: MakeLocal, redis_url: str) -> Any:
    return make_local(redis_client=redis.Redis.from_url(redis_url),
                      key_prefix=f"body{uuid.uuid4().hex[:8]}")


def test_retry_and_dead_letter_retry_send_exactly_the_accepted_bytes(real_local: Any) -> None:
    from mailworker import api

    local = real_local
    server = local.server
    items = api.prepare_many([_message(0), _message(1)])
    accepted = {rec.id: raw for rec, raw in items}
    assert all(len(raw) >= COMPRESS_MIN for raw in accepted.values())
    server.add_fault(Fault.reply("DATA", 451, "4.3.0 try again", match="r0@", times=1))
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 no such user", match="r1@", times=1))
    ids = api.enqueue_prepared(items)
    assert b"zraw" in local.redis.hkeys(local.store.keys.record(ids[0]))
    local.drain()
    assert local.status(ids[0])["state"] == "delivered"
    assert local.status(ids[1])["state"] == "dead"
    assert dlq.retry([ids[1]]) == [ids[1]]
    local.run_until_idle()
    assert local.status(ids[1])["state"] == "delivered"
    got = {m.data: m for m in server.messages}
    for mid in ids:  # the attempt after a 451 and the one after a dead letter's retry
        assert accepted[mid] in got or accepted[mid] + b"\r\n" in got


def test_a_record_of_the_previous_version_is_delivered_byte_for_byte(real_local: Any) -> None:
    from mailworker import api

    local = real_local
    [(rec, raw)] = api.prepare_many([_message(2)])
    key = local.store.keys.record(rec.id)
    local.redis.hset(key, mapping={"doc": rec.to_json(), "raw": raw,
                                   "route": f"{rec.queue} {rec.relay}"})
    local.redis.zadd(local.store.keys.inflight, {rec.id: 0})
    local.tick()  # the sweeper finds it and wakes it
    local.run_until_idle()
    assert local.status(rec.id)["state"] == "delivered"
    data = local.server.messages[-1].data
    assert data in (raw, raw + b"\r\n")
    assert not local.redis.hget(key, "raw")  # delivered: the body is dropped (raw empty)


def test_after_a_crash_mid_send_the_next_worker_sends_the_accepted_bytes(
        real_local: Any) -> None:
    """A worker claims a compressed record, marks it as being sent and dies (its lease
    runs out): the next worker sends exactly the accepted bytes, flagged as a possible
    duplicate."""
    from mailworker import api

    local = real_local
    [(rec, raw)] = api.prepare_many([_message(3)])
    [mid] = api.enqueue_prepared([(rec, raw)])
    local.drop_wakeups()
    s = local.settings
    [claim] = local.store.claim_many([mid], "dead-worker", s.lease_seconds,
                                     local.clock() + s.lease_seconds + s.stuck_after).values()
    assert isinstance(claim, Claim) and claim.raw == raw
    assert local.store.mark_sending([claim], 30) == [True]
    local.redis.delete(local.store.keys.lease(mid))  # its lease ran out
    local.clock.advance(s.lease_seconds + s.stuck_after + 1)
    local.run_until_idle()
    status = local.status(mid)
    assert status is not None and status["state"] == "delivered"
    assert status["possible_duplicate"]
    assert local.server.messages[-1].data in (raw, raw + b"\r\n")
