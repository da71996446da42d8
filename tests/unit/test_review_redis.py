"""Review of the Redis side of the hot path (batched claim and commit, pre-marks riding on
other round trips, compressed bodies, compact documents): one bad record never fails or
skips the others, and no record is sent without its "sending" mark in Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mailworker.record import MessageState, Record
from mailworker.store import Claim, Store

from .test_store_body import make_record


@pytest.fixture
def real_store(redis_url: str) -> Iterator[Store]:
    client = redis.Redis.from_url(redis_url)
    store = Store(client, prefix=f"rr{uuid.uuid4().hex[:8]}", retention=60,
                  dead_retention=600)
    yield store
    keys = list(client.scan_iter(match=f"{store.prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def _claimed(store: Store, n: int) -> list[Claim]:
    recs = [make_record() for _ in range(n)]
    store.enqueue_many([(r, b"Subject: x\r\n\r\nhello\r\n") for r in recs], time.time() + 60)
    claims = store.claim_many([r.id for r in recs], "tok", 30, time.time() + 60)
    out = [c for c in claims.values() if isinstance(c, Claim)]
    assert len(out) == n
    return out


def _delivered(claims: list[Claim]) -> list[tuple[Claim, float, dict[str, int]]]:
    for c in claims:
        c.record.state = MessageState.DELIVERED
    return [(c, 0.0, {"delivered": 1}) for c in claims]


@pytest.mark.parametrize("damage", ["string", "list"])
def test_a_record_overwritten_mid_send_does_not_fail_its_chunk_mates(
        real_store: Store, damage: str) -> None:
    """commit.lua saves a chunk in one script run; Lua writes are not rolled back, so an
    error at the third record left the first two saved and the rest unsaved (retried as
    possible duplicates although delivered). Each record stands alone."""
    store = real_store
    claims = _claimed(store, 5)
    bad = store.keys.record(claims[2].record.id)
    store.redis.delete(bad)
    if damage == "string":
        store.redis.set(bad, "overwritten by hand")
    else:
        store.redis.rpush(bad, "x")
    ok = store.commit_many(_delivered(claims))
    assert ok == [True, True, False, True, True]
    for i in (0, 1, 3, 4):
        rec = store.get(claims[i].record.id)
        assert rec is not None and rec.state is MessageState.DELIVERED
        assert store.redis.zscore(store.keys.inflight, claims[i].record.id) is None
    # The damaged key is set aside by id (as claim.lua does), never woken again.
    assert store.redis.zscore(store.keys.inflight, claims[2].record.id) is None
    assert store.redis.zscore(store.keys.dead, claims[2].record.id) is not None
    assert not store.redis.exists(store.keys.lease(claims[2].record.id))


def test_a_lease_key_overwritten_does_not_fail_its_chunk_mates(real_store: Store) -> None:
    store = real_store
    claims = _claimed(store, 3)
    lease = store.keys.lease(claims[1].record.id)
    store.redis.delete(lease)
    store.redis.rpush(lease, "x")
    assert store.commit_many(_delivered(claims)) == [True, False, True]


def test_a_record_deleted_mid_send_is_not_brought_back_as_a_stub(real_store: Store) -> None:
    """A record deleted while leased (by hand) is gone: its commit must not recreate a
    record with a document and no body (which would come back as an unreadable record)."""
    store = real_store
    claims = _claimed(store, 3)
    gone = claims[1].record.id
    store.redis.delete(store.keys.record(gone))
    for c in claims:
        c.record.state = MessageState.DEFERRED
    ok = store.commit_many([(c, time.time() + 60, {}) for c in claims])
    assert ok == [True, False, True]
    assert not store.redis.exists(store.keys.record(gone))
    assert store.redis.zscore(store.keys.deferred, gone) is None
    assert store.redis.zscore(store.keys.inflight, gone) is None
    assert store.redis.zscore(store.keys.deferred, claims[0].record.id) is not None


def test_a_record_overwritten_before_its_window_does_not_fail_the_window(
        real_store: Store) -> None:
    """mark.lua marks a window in one script run: a record key overwritten while leased
    made it raise, so no record of the window was known marked (the pass's group failed
    and waited for its leases to run out; the records marked before it were flagged as
    possible duplicates although never sent). Now only that record is unusable."""
    store = real_store
    claims = _claimed(store, 4)
    bad = store.keys.record(claims[1].record.id)
    store.redis.delete(bad)
    store.redis.set(bad, "x")
    assert store.mark_sending(claims, 30) == [True, False, True, True]
    for i in (0, 2, 3):
        assert store.redis.hget(store.keys.record(claims[i].record.id), "sending")


def test_the_gate_never_sends_a_record_whose_mark_failed(
        make_local: Any, redis_url: str) -> None:
    """Through the real deliverer: a record key overwritten after its claim, in the first
    window (pre-marked on the rate call) and in a later one (marked by the gate): the
    others are delivered, each with its mark in Redis before its MAIL FROM, and nothing
    is sent for the broken ones."""
    local = make_local(redis_client=redis.Redis.from_url(redis_url),
                       key_prefix=f"rr{uuid.uuid4().hex[:8]}")
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(20)])
    broken = {ids[2], ids[11]}
    claim_many = local.store.claim_many

    def claim_then_break(*a: Any, **kw: Any) -> Any:
        out = claim_many(*a, **kw)
        for mid in broken & set(out):
            local.redis.delete(local.store.keys.record(mid))
            local.redis.set(local.store.keys.record(mid), "overwritten")
        return out

    local.store.claim_many = claim_then_break
    local.run_until_idle()
    local.store.claim_many = claim_many
    sent = {line[len(b"Subject: "):].decode() for m in local.server.messages
            for line in m.data.split(b"\r\n") if line.startswith(b"Subject: ")}
    assert sent == {f"m{i}" for i in range(20) if ids[i] not in broken}
    for i, mid in enumerate(ids):
        if mid not in broken:
            assert local.status(mid)["state"] == "delivered", i
    for mid in broken:
        assert local.redis.zscore(local.store.keys.dead, mid) is not None


def test_dlq_show_of_a_record_set_aside_for_a_damaged_compressed_body(
        mw_env: dict[str, str]) -> None:
    """The record a worker quarantines because its zraw does not decompress is exactly
    the one an operator inspects with `dlq show`: it must show it, not a traceback."""
    from tests.unit.test_cli_dlq_show import cli

    store = Store(redis.Redis.from_url(mw_env["MAILWORKER_REDIS_URL"]),
                  prefix=mw_env["MAILWORKER_KEY_PREFIX"])
    rec = make_record()
    store.enqueue_many([(rec, b"Subject: big\r\n\r\n" + b"hello world\r\n" * 500)],
                       time.time() + 60)
    store.redis.hset(store.keys.record(rec.id), "zraw", b"damaged")
    [claim] = store.claim_many([rec.id], "tok", 30, time.time() + 60).values()
    assert not isinstance(claim, Claim | str)
    assert store.quarantine_many([(rec.id, "tok", f"unreadable record: {claim.error}")]) == [True]
    assert store.raw(rec.id) is None  # no bytes that are the message
    for args in (("dlq", "show", rec.id), ("dlq", "show", "--json", rec.id)):
        shown = cli(mw_env, *args)
        assert shown.returncode == 0, shown.stderr
        assert "Traceback" not in shown.stderr


def test_a_document_only_the_json_module_reads_is_saved_and_not_sent_again(
        make_local: Any) -> None:
    """A document written by an earlier version with json.dumps may hold what orjson
    refuses to write (a lone surrogate "\\ud800" in metadata, an integer past 64 bits).
    Record.from_json reads it (json fallback); the commit's compact_json raised, so the
    whole chunk went unsaved after it was sent: sent again after the leases ran out,
    and that record forever. Each is saved, sent once."""
    import json

    local = make_local()
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(4)])
    odd = {1: {"note": "\ud800"}, 2: {"big": 2**70}}
    for i, meta in odd.items():
        key = local.store.keys.record(ids[i])
        d = json.loads(local.redis.hget(key, "doc"))
        d["metadata"] = meta
        local.redis.hset(key, "doc", json.dumps(d))  # as the previous version wrote it
    local.run_until_idle()
    assert len(local.server.messages) == 4
    for i, mid in enumerate(ids):
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DELIVERED, i
        assert rec.metadata == odd.get(i, rec.metadata)


def test_to_json_writes_what_from_json_read() -> None:
    rec = make_record(metadata={"note": "\ud800", "big": 2**70})
    assert Record.from_json(rec.to_json()).metadata == rec.metadata


def test_claim_of_a_large_batch_with_bad_and_odd_ids(real_store: Store) -> None:
    """One claim.lua run per 500 ids: a wrong-type key, a missing record, a quarantined
    one and ids with odd characters among 1,201 ids are each answered alone."""
    store = real_store
    odd = ["a b", "new\nline", "star*[x]?", "caf\u00e9", "{tag}", "-", "x" * 300]
    recs = [make_record() for _ in range(1190)] + [make_record(id=i) for i in odd]
    store.enqueue_many([(r, b"Subject: x\r\n\r\n" + r.id.encode() + b"\r\n") for r in recs],
                       time.time() + 60)
    wrong, gone, aside = recs[10].id, recs[600].id, recs[1100].id
    store.redis.delete(store.keys.record(wrong))
    store.redis.set(store.keys.record(wrong), "x")
    store.redis.delete(store.keys.record(gone))
    store.redis.hset(store.keys.record(aside), "poison", "set aside")
    ids = [r.id for r in recs] + ["never-existed"]
    got = store.claim_many(ids, "tok", 30, time.time() + 60)
    assert list(got) == ids
    assert got[wrong] == "wrongtype" and got[gone] == "missing"
    assert got[aside] == "quarantined" and got["never-existed"] == "missing"
    ok = [r for r in recs if r.id not in (wrong, gone, aside)]
    for r in ok:
        c = got[r.id]
        assert isinstance(c, Claim) and c.record.id == r.id
        assert c.raw == b"Subject: x\r\n\r\n" + r.id.encode() + b"\r\n"
    for c in (got[i] for i in odd):
        assert isinstance(c, Claim)
        c.record.state = MessageState.DELIVERED
    claims = [got[i] for i in odd]
    assert store.commit_many([(c, 0.0, {}) for c in claims if isinstance(c, Claim)]) == \
        [True] * len(odd)
    assert store.redis.zscore(store.keys.dead, wrong) is not None


def test_records_held_back_by_the_rate_lose_their_pre_mark_before_the_others_are_sent(
        make_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first window's marks ride on the rate call; the records the rate then holds
    back were saved (their marks cleared) only at the end of the pass, after the granted
    ones were sent: a worker killed meanwhile flagged them as possible duplicates,
    although never sent, beyond the one window in flight. Their hold is saved before
    any MAIL FROM."""
    import dataclasses

    local = make_local()
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(12)])
    window = local.deliverer.window
    admit = window.admit

    def grant_three(*a: Any, **kw: Any) -> Any:
        return dataclasses.replace(admit(*a, **kw), granted=3)

    monkeypatch.setattr(window, "admit", grant_three)
    pool = local.pools.get(local.settings.relay("default"))
    send_many = pool.send_many
    marked_while_sending: list[set[str]] = []

    def watching(envelopes: Any, gate: Any = None, **kw: Any) -> Any:
        marked_while_sending.append({
            mid for mid in ids
            if local.redis.hget(local.store.keys.record(mid), "sending")})
        return send_many(envelopes, gate=gate, **kw)

    monkeypatch.setattr(pool, "send_many", watching)
    local.deliverer.run(ids)
    assert len(local.server.messages) == 3
    assert marked_while_sending and marked_while_sending[0] <= set(ids[:3])
    for mid in ids[3:]:
        assert local.redis.hget(local.store.keys.record(mid), "sending") is None
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DEFERRED
        assert rec.attempts == 0 and not rec.possible_duplicate


def test_a_claim_and_a_commit_run_again_by_the_client_retry_give_the_same_answer(
        real_store: Store) -> None:
    """The runtime's Redis client retries a pipeline on ConnectionError: after a reply
    lost on its way back (a failover, a dropped connection) the same claim.lua or
    commit.lua runs again. A claim re-run said "locked" for the whole batch (skipped until
    its own leases ran out); a commit re-run said "lease lost" (no delivered hook, a
    warning) for records it had saved. Both now answer as the first run did."""
    store = real_store
    recs = [make_record() for _ in range(3)]
    store.enqueue_many([(r, b"Subject: x\r\n\r\nhi\r\n") for r in recs], time.time() + 60)
    ids = [r.id for r in recs]
    first = store.claim_many(ids, "tok", 30, time.time() + 60)
    again = store.claim_many(ids, "tok", 30, time.time() + 60)
    assert all(isinstance(again[i], Claim) for i in ids)
    assert store.claim_many(ids, "other", 30, time.time() + 60) == dict.fromkeys(ids, "locked")
    claims = [first[i] for i in ids]
    assert all(isinstance(c, Claim) for c in claims)
    items = _delivered(claims)  # type: ignore[arg-type]
    assert store.commit_many(items) == [True] * 3
    assert store.commit_many(items) == [True] * 3
    # A commit of another pass (another token, another document) is still refused.
    rec = store.get(ids[0])
    assert rec is not None and rec.state is MessageState.DELIVERED
    stale = Claim(rec, b"", "someone-else")
    stale.record.attempts += 1
    assert store.commit_many([(stale, 0.0, {})]) == [False]


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 65535, 65536, 10 * 1024 * 1024])
def test_every_body_size_comes_back_byte_for_byte(real_store: Store, size: int) -> None:
    import os

    from mailworker.store.body import pack
    body = (b"line of mail text with some repetition\r\n" * (size // 40 + 1))[:size]
    if size > 100_000:  # half random: Huffman-only on a big body that shrinks a little
        body = body[:size // 2] + os.urandom(size - size // 2)
    incompressible = os.urandom(size)
    for raw in (body, incompressible):
        field, _ = pack(raw)
        rec = make_record(size=len(raw))
        store = real_store
        store.enqueue_many([(rec, raw)], time.time() + 60)
        [claim] = store.claim_many([rec.id], "tok", 30, time.time() + 60).values()
        if not raw:  # what a delivered record keeps: never sent as a live record's body
            assert not isinstance(claim, Claim | str) and "no message bytes" in claim.error
            assert store.raw(rec.id) is None
            continue
        assert isinstance(claim, Claim) and claim.raw == raw, (size, field)
        assert store.raw(rec.id) == raw


def test_a_live_record_with_the_empty_raw_of_a_delivered_one_is_never_sent_empty(
        real_store: Store) -> None:
    """A delivered record keeps raw = "" (for workers of the previous version). Should it
    ever come back to life (its document edited by hand to "queued" after a quarantine),
    it is set aside as having no message bytes, never sent as an empty message."""
    store = real_store
    rec = make_record()
    store.enqueue_many([(rec, b"Subject: x\r\n\r\nhi\r\n")], time.time() + 60)
    [claim] = store.claim_many([rec.id], "tok", 30, time.time() + 60).values()
    assert isinstance(claim, Claim)
    assert store.commit_many(_delivered([claim])) == [True]
    from mailworker.store.body import compact_json
    claim.record.state = MessageState.QUEUED
    store.redis.hset(store.keys.record(rec.id), "doc", compact_json(claim.record))
    [again] = store.claim_many([rec.id], "tok2", 30, time.time() + 60).values()
    assert not isinstance(again, Claim | str) and "no message bytes" in again.error


def test_a_record_with_both_raw_and_zraw_is_set_aside_not_guessed(real_store: Store) -> None:
    """Only something outside mailworker writes both (an operator "fixing" raw by hand
    beside a compressed body): which bytes were meant is unknown, so it is set aside
    alone (never the other body sent silently)."""
    store = real_store
    recs = [make_record() for _ in range(2)]
    body = b"Subject: x\r\n\r\n" + b"compressible text\r\n" * 200
    store.enqueue_many([(r, body) for r in recs], time.time() + 60)
    store.redis.hset(store.keys.record(recs[0].id), "raw", b"Subject: edited\r\n\r\nnew\r\n")
    got = store.claim_many([r.id for r in recs], "tok", 30, time.time() + 60)
    bad, good = got[recs[0].id], got[recs[1].id]
    assert not isinstance(bad, Claim | str) and "raw and zraw" in bad.error
    assert isinstance(good, Claim) and good.raw == body


@pytest.mark.parametrize(("edit", "named"), [
    ('"created_at": NaN', "created_at"),
    ('"expires_at": Infinity', "expires_at"),
    ('"size": 100000000000000000000000', "whole numbers"),
    ('"attempts": 1.0', "whole numbers"),
    ('"next_attempt_at": "soon"', "next_attempt_at"),
    ('"sender": 5', "sender"),
])
def test_invalid_reason_names_the_bad_field_of_a_compact_document(
        edit: str, named: str) -> None:
    """orjson refuses NaN, Infinity and integers past 64 bits; the json fallback reads
    them so that invalid_reason names the field (the record is set aside alone)."""
    from mailworker.record import invalid_reason
    from mailworker.store.body import compact_json

    doc = compact_json(make_record()).decode()
    doc = doc[:-1] + ", " + edit + "}"
    reason = invalid_reason(Record.from_json(doc.encode()))
    assert reason is not None and named in reason


def test_heartbeat_renews_every_registration_among_many_comings_and_goings() -> None:
    """The heartbeat wakes on register only when the new lease's first renewal comes
    before its planned wake-up. Under churn (registrations with different leases,
    unregistrations, an id reused), every registration still held gets renewed, and
    one unregistered is not renewed any more."""
    import random
    import threading

    from mailworker.leases import Heartbeat
    from mailworker.testing.polling import wait_until

    class Fake:
        def __init__(self, lease: float) -> None:
            self.lease, self.count = lease, 0
            self.lock = threading.Lock()

        def renew(self) -> None:
            with self.lock:
                self.count += 1

    beat = Heartbeat()
    rng = random.Random(7)
    kept: list[Fake] = []
    gone: list[Fake] = []
    for i in range(200):
        f = Fake(rng.choice([0.3, 0.6, 3.0, 60.0]))
        beat.register(f)  # type: ignore[arg-type]
        if i % 3 == 0:
            beat.unregister(f)  # type: ignore[arg-type]
            gone.append(f)
        elif f.lease < 1.0:
            kept.append(f)
    long = Fake(60.0)
    beat.register(long)  # type: ignore[arg-type]  # plans a wake-up a minute away ...
    short = Fake(0.15)
    beat.register(short)  # type: ignore[arg-type]  # ... which this one must cut short
    wait_until(lambda: all(f.count >= 3 for f in [*kept, short]), timeout=20)
    assert all(f.count == 0 for f in gone)
    assert long.count == 0
    for f in [*kept, short]:
        beat.unregister(f)  # type: ignore[arg-type]
    beat.unregister(long)  # type: ignore[arg-type]


def test_a_record_set_aside_for_its_envelope_keeps_no_mark_it_did_not_earn(
        make_local: Any) -> None:
    """A record stored before today's envelope checks is set aside when its envelope is
    built; it was pre-marked with the first window (on the rate call), and quarantine
    keeps a mark, so a later `dlq retry` flagged a message never sent as a possible
    duplicate. Its envelope is checked before any mark."""
    from mailworker import dlq

    local = make_local()
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(3)])
    key = local.store.keys.record(ids[1])
    rec = local.record(ids[1])
    assert rec is not None
    rec.sender = "a@example.com\r\nRCPT TO:<x@evil.example>"
    from mailworker.store.body import compact_json
    local.redis.hset(key, "doc", compact_json(rec))
    local.run_until_idle()
    assert len(local.server.messages) == 2
    assert local.redis.hget(key, "poison") is not None
    assert local.redis.hget(key, "sending") is None
    rec.sender = "a@example.com"  # the operator fixes it, then retries it
    local.redis.hset(key, "doc", compact_json(rec))
    assert dlq.retry([ids[1]]) == [ids[1]]
    local.run_until_idle()
    fixed = local.record(ids[1])
    assert fixed is not None and fixed.state is MessageState.DELIVERED
    assert not fixed.possible_duplicate


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_a_commit_lost_mid_batch_never_sends_unflagged_twice(
        make_local: Any, lost: str) -> None:
    """The first chunk's commit carries the next window's marks. Redis goes away with it
    (the request never ran, or it ran and the reply was lost). After the leases run out
    every message is delivered; a message sent twice is flagged; the messages flagged
    although sent once are at most the one window marked ahead."""
    from mailworker.delivery import CHUNK, MARK_WINDOW

    local = make_local()
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(40)])
    commit_many = local.store.commit_many
    calls = [0]

    def failing_once(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            if lost == "reply":
                commit_many(*a, **kw)
            raise ConnectionError("Redis went away")
        return commit_many(*a, **kw)

    local.store.commit_many = failing_once
    [(batch, _)] = local.wakeups[:1]
    local.deliver(batch)
    local.store.commit_many = commit_many
    assert len(local.server.messages) == CHUNK  # the group stopped at the failure
    for mid in ids:
        local.redis.delete(local.store.keys.lease(mid))  # the leases run out
    local.clock.advance(local.settings.lease_seconds + local.settings.stuck_after + 1)
    local.run_until_idle()
    sent: dict[str, int] = {}
    for m in local.server.messages:
        for line in m.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                sent[line[9:].decode()] = sent.get(line[9:].decode(), 0) + 1
    flagged_once = 0
    for i, mid in enumerate(ids):
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DELIVERED, i
        assert sent[f"m{i}"] in (1, 2)
        if sent[f"m{i}"] == 2:
            assert rec.possible_duplicate, i
        elif rec.possible_duplicate:
            flagged_once += 1
    assert flagged_once <= MARK_WINDOW


def test_a_rate_call_whose_reply_is_lost_flags_at_most_its_window(make_local: Any) -> None:
    """The rate call carries the first window's marks: when its reply is lost (it ran),
    nothing is sent; after the leases run out all are delivered once, and at most that
    window is flagged."""
    from mailworker.delivery import MARK_WINDOW

    local = make_local()
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(20)])
    admit = local.store.relays.admit

    def reply_lost(*a: Any, **kw: Any) -> Any:
        admit(*a, **kw)
        raise ConnectionError("Redis went away")

    local.store.relays.admit = reply_lost
    [(batch, _)] = local.wakeups[:1]
    local.deliver(batch)
    local.store.relays.admit = admit
    assert local.server.messages == []
    for mid in ids:
        local.redis.delete(local.store.keys.lease(mid))
    local.clock.advance(local.settings.lease_seconds + local.settings.stuck_after + 1)
    local.run_until_idle()
    assert len(local.server.messages) == 20
    recs = [local.record(mid) for mid in ids]
    assert all(r is not None and r.state is MessageState.DELIVERED for r in recs)
    assert sum(1 for r in recs if r is not None and r.possible_duplicate) <= MARK_WINDOW


def test_a_worker_of_the_previous_version_releases_a_delivered_record(
        real_store: Store) -> None:
    """Rolling deploy: a new worker delivers a message and drops its body; a stale
    wake-up of it (a task redelivered by the broker) reaches a worker still on the
    previous version, whose claim reads the "raw" field and sets aside a record without
    one as unreadable: a delivered message listed as a dead letter. A delivered record
    keeps an empty "raw", which the previous version reads as a final record to release."""
    store = real_store
    rec = make_record()
    store.enqueue_many([(rec, b"Subject: x\r\n\r\n" + b"long text line\r\n" * 200)],
                       time.time() + 60)
    [claim] = store.claim_many([rec.id], "tok", 30, time.time() + 60).values()
    assert isinstance(claim, Claim)
    assert store.commit_many(_delivered([claim])) == [True]
    key = store.keys.record(rec.id)
    # What the previous version's claim.lua returned and its claim_many checked:
    doc, raw = store.redis.hmget(key, "doc", "raw")
    assert raw is not None, "the previous version would set it aside as unreadable"
    assert Record.from_json(doc or b"").state is MessageState.DELIVERED
    assert store.redis.hget(key, "zraw") is None and len(raw) == 0
    assert store.raw(rec.id) is None  # no body stored, as before


def test_a_compressed_record_set_aside_by_an_old_worker_is_delivered_after_dlq_retry(
        make_local: Any) -> None:
    """Documented mix (upgrade workers before producers): a worker of the previous
    version cannot read zraw and sets the record aside, as its quarantine.lua does;
    after the upgrade `dlq retry` delivers exactly the accepted bytes, unflagged."""
    from mailworker import api, dlq

    local = make_local()
    [(rec, raw)] = api.prepare_many([{"to": "r@example.com", "subject": "old",
                                      "text": "mail text line\r\n" * 300}])
    [mid] = api.enqueue_prepared([(rec, raw)])
    assert local.redis.hget(local.store.keys.record(mid), "zraw") is not None
    claimed = local.store.claim_many([mid], "old-worker", 30, time.time() + 60)
    assert isinstance(claimed[mid], Claim)
    assert local.store.quarantine_many(
        [(mid, "old-worker", "unreadable record: the record has no message bytes (raw)")]
    ) == [True]
    assert dlq.retry([mid]) == [mid]
    local.run_until_idle()
    got = local.record(mid)
    assert got is not None and got.state is MessageState.DELIVERED
    assert not got.possible_duplicate
    assert local.server.messages[-1].data in (raw, raw + b"\r\n")


def test_a_rider_that_fails_does_not_fail_the_commit_it_rides_on(
        make_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fleet feedback was best effort (its failure logged, outcomes kept); riding on the
    chunk's commit, a feedback script error made the whole commit round trip raise after
    the commits ran: the group counted as failed, the rest of the batch left unsent until
    its leases ran out and its next window flagged. A rider's failure is its own."""
    local = make_local()
    ids = local.send_many([{"to": f"r{i}@example.com", "subject": f"m{i}", "text": "hi"}
                           for i in range(40)])
    window = local.deliverer.window
    broken = local.store.scripts.redis.register_script("return redis.error_reply('boom')")

    def failing_rider(*a: Any, **kw: Any) -> Any:
        return [(broken, [], [])], lambda results: None

    monkeypatch.setattr(window, "feedback_rider", failing_rider)
    [(batch, _)] = local.wakeups[:1]
    local.deliver(batch)
    assert len(local.server.messages) == 40
    for mid in ids:
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DELIVERED
        assert not rec.possible_duplicate


def test_run_with_hands_a_rider_nothing_when_its_call_failed(real_store: Store) -> None:
    scripts = real_store.scripts
    ok = scripts.redis.register_script("return 7")
    bad = scripts.redis.register_script("return redis.error_reply('boom')")
    got: list[Any] = []
    assert scripts.run_with([(ok, [], [])], [([(bad, [], [])], got.append),
                                             ([(ok, [], [])], got.append)]) == [7]
    assert got == [[7]]
    with pytest.raises(redis.ResponseError):
        scripts.run_with([(bad, [], [])], [([(ok, [], [])], got.append)])


def test_marks_hold_through_a_452_split_and_a_421_mid_batch(
        make_local: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every transaction the gate lets start (the later part of a 452 split included) has
    its record's mark in Redis; after a 421 mid-batch the records never started keep no
    mark and are not flagged."""
    from mailworker.testing import Fault

    local = make_local()
    msgs = [{"to": [f"a{i}@example.com", f"b{i}@example.com"], "subject": f"m{i}",
             "text": "hi"} for i in range(40)]
    ids = local.send_many(msgs)
    local.server.add_fault(Fault.reply("RCPT", 452, "4.5.3 too many recipients",
                                       match="b3@", times=1))
    local.server.add_fault(Fault.reply("RCPT", 421, "4.3.2 shutting down", match="a20@",
                                       times=1))
    pool = local.pools.get(local.settings.relay("default"))
    send_many = pool.send_many
    started: list[str] = []

    def watching(envelopes: Any, gate: Any = None, **kw: Any) -> Any:
        def checking_gate(i: int) -> bool:
            ok = bool(gate(i))
            if ok:
                mid = envelopes[i].message_id
                assert local.redis.hget(local.store.keys.record(mid), "sending"), i
                started.append(mid)
            return ok
        return send_many(envelopes, gate=checking_gate, **kw)

    monkeypatch.setattr(pool, "send_many", watching)
    [(batch, _)] = local.wakeups[:1]
    local.deliver(batch)
    never = [mid for mid in ids if mid not in started]
    for mid in never:
        assert local.redis.hget(local.store.keys.record(mid), "sending") is None
        rec = local.record(mid)
        assert rec is not None and not rec.possible_duplicate
    assert started
