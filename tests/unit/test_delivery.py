"""The Deliverer in-process (LocalDelivery): every path from claim to saved outcome.

Real store scripts on fakeredis, real SMTP to a test server, a clock the test moves.
Subprocess tests (tests/integration) keep what needs processes: crashes, restarts, fleets.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mailworker.config import QueueSettings
from mailworker.hooks import Hooks
from mailworker.record import MessageState, RcptState
from mailworker.relay import parse_relay
from mailworker.smtp import Envelope
from mailworker.smtp.errors import DeliveryUncertain
from mailworker.testing import Fault, SMTPTestServer, free_port, wait_until
from mailworker.testing.local import Clock, LocalDelivery, StillPending

from .conftest import MakeLocal


def mail(to: str | list[str] = "user@example.com", **kw: Any) -> dict[str, Any]:
    return {"to": to, "subject": "Hello", "text": "Hi there\n", **kw}


def redis_down(*args: Any) -> Any:
    raise ConnectionError("Redis went away")


def pauses(local: LocalDelivery) -> dict[str, Any]:
    return {name: s["paused"] for name, s in local.store.relay_states().items() if s["paused"]}


# -- delivered, partial, deferred, dead ---------------------------------------------------

def test_a_batch_is_delivered_once_each_over_one_connection(make_local: MakeLocal) -> None:
    events: list[tuple[str, str]] = []
    hooks = Hooks()
    hooks.connect("delivered", lambda rec: events.append(("delivered", rec.id)))
    local = make_local(hooks=hooks)
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(5)])
    assert len(local.wakeups) == 1 and local.wakeups[0][0] == ids

    assert local.run_until_idle() == 1

    assert [local.status(i)["state"] for i in ids] == ["delivered"] * 5  # type: ignore[index]
    assert sorted(events) == sorted(("delivered", i) for i in ids)
    assert local.server is not None and local.server.connections_opened == 1
    assert max(local.server.deliveries().values()) == 1 and len(local.server.messages) == 5
    rec = local.record(ids[0])
    assert rec is not None and rec.attempts == 0 and len(rec.history) == 1
    assert local.store.relay_stats()["default"]["delivered"] == 5
    assert local.reports[-1].states == {"delivered": 5} and local.reports[-1].claimed == 5
    verbs = {e["command"].split(":")[0].split()[0] for e in local.replies}
    assert verbs >= {"EHLO", "MAIL", "RCPT", "DATA"}


def test_partial_refusal_dead_letters_with_the_refused_recipient_named(
        make_local: MakeLocal) -> None:
    fired: list[str] = []
    hooks = Hooks()
    for event in ("failed", "dead_lettered"):
        hooks.connect(event, lambda rec, e=event: fired.append(e))  # type: ignore[misc]
    local = make_local(hooks=hooks)
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    mid = local.send(**mail(["ok@example.com", "bad@example.com"]))
    local.run_until_idle()

    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEAD
    assert [r.state for r in rec.recipients] == [RcptState.DELIVERED, RcptState.FAILED]
    assert rec.dead_reason is not None and rec.dead_reason.startswith("bad@example.com: 550")
    assert [m.recipients for m in local.server.messages] == [("ok@example.com",)]
    assert fired == ["failed", "dead_lettered"]
    assert [r.id for r in local.dead_letters] == [mid]


def test_greylisted_mail_waits_exactly_its_backoff_then_goes(local: LocalDelivery) -> None:
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted", times=1))
    mid = local.send(**mail())
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEFERRED
    assert rec.next_attempt_at == pytest.approx(local.clock() + 60)
    assert rec.attempts == 1

    local.advance(59.9)  # not yet due: nothing happens
    assert local.status(mid)["state"] == "deferred"  # type: ignore[index]
    local.advance(0.1)
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DELIVERED and len(rec.history) == 2
    assert len(local.server.messages) == 1


def test_attempts_run_out_into_the_dead_letters(make_local: MakeLocal) -> None:
    from mailworker.config import Settings

    settings = Settings(default_sender="app@example.com",
                        queues={"transactional": QueueSettings("transactional", max_attempts=3)})
    local = make_local(settings=settings)
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.3.0 Try again later"))
    mid = local.send(**mail())
    moved = local.drain()

    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEAD and rec.attempts == 3
    assert moved == pytest.approx(60 + 120)  # two backoffs, then the third attempt fails
    assert "exhausted" in (rec.recipients[0].reason or "")


def test_452_too_many_recipients_splits_without_spending_an_attempt(
        make_local: MakeLocal) -> None:
    server = SMTPTestServer(max_recipients=2)
    server.start()
    try:
        local = make_local(server)
        rcpts = [f"r{i}@example.com" for i in range(5)]
        mid = local.send(**mail(rcpts))
        local.run_until_idle()
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DELIVERED
        assert rec.attempts == 0
        assert sorted(r for m in server.messages for r in m.recipients) == rcpts
        assert max(server.deliveries().values()) == 1
    finally:
        server.stop()


# -- relay-level trouble: pauses keep mail queued ----------------------------------------

def test_auth_failure_pauses_the_relay_and_keeps_mail_queued(make_local: MakeLocal) -> None:
    server = SMTPTestServer(auth={"alice": "right"}, require_auth=True)
    server.start()
    try:
        local = make_local(server.dsn(user="alice", password="wrong", allow_plain_auth=True))
        ids = local.send_many([mail(f"u{i}@example.com") for i in range(3)])
        local.run_until_idle()

        for rec in map(local.record, ids):
            assert rec is not None and rec.state is MessageState.DEFERRED
            assert rec.attempts == 0  # the relay's fault, not the message's
            assert all(r.attempts == 0 for r in rec.recipients)
            assert rec.next_attempt_at is not None and rec.next_attempt_at >= local.clock() + 299
        paused = pauses(local)["default"]
        assert paused["seconds_left"] > 290
        assert server.connections_opened == 1  # one try, not one per message

        # Mail sent while paused waits with the relay, without connecting.
        later = local.send(**mail("late@example.com"))
        local.run_until_idle()
        assert local.status(later)["state"] == "deferred"  # type: ignore[index]
        assert server.connections_opened == 1
        assert local.server is None and server.messages == []

        # The operator fixes the password and resumes the relay: everything goes, and the
        # pause cost the messages no attempt.
        fixed = parse_relay("default", server.dsn(user="alice", password="right",
                                                  allow_plain_auth=True))
        local.deliverer.settings = local.settings.with_(relays={"default": fixed})
        local.store.resume_relay("default")
        local.drain()
        for rec in map(local.record, [*ids, later]):
            assert rec is not None and rec.state is MessageState.DELIVERED and rec.attempts == 0
        assert len(server.messages) == 4
    finally:
        server.stop()


def test_connection_refused_pauses_the_relay_only_once_a_whole_cohort_failed(
        make_local: MakeLocal) -> None:
    port = free_port()
    local = make_local(f"smtp://127.0.0.1:{port}?connect_timeout=2")
    window = local.store.keys.window("default")
    mid = local.send(**mail())
    local.run_until_idle()
    rec = local.record(mid)
    # One refused connection of a cohort of 2 (the initial window): no pause, no attempt.
    assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
    assert "default" not in pauses(local)
    assert local.redis.hget(window, "size") == b"1"
    local.advance(2.5)  # its short hold: the second of the cohort fails too
    rec = local.record(mid)
    assert rec is not None and rec.attempts == 0
    assert "whole cohort" in pauses(local)["default"]["reason"]
    assert rec.next_attempt_at == pytest.approx(local.clock() + 30)  # probe_interval

    server = SMTPTestServer(port=port)
    server.start()
    try:
        # The pause and the probe time run on Redis's clock, not the test's: end them.
        local.store.resume_relay("default")
        assert local.redis.hget(window, "dead") == b"1"
        local.redis.hset(window, "probe_at", 0)
        local.advance(30)  # the probe: one connection, which works
        assert local.status(mid)["state"] == "delivered"  # type: ignore[index]
        assert len(server.messages) == 1 and server.connections_opened == 1
        assert local.redis.hmget(window, "streak", "dead") == [b"0", b"0"]
    finally:
        server.stop()


def test_a_relay_paused_by_an_operator_holds_mail_without_connecting(
        local: LocalDelivery) -> None:
    local.store.pause_relay("default", 120, "maintenance")
    mid = local.send(**mail())
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
    assert rec.last_error is not None and "maintenance" in rec.last_error
    assert local.server is not None and local.server.connections_opened == 0


def test_a_relay_gone_from_config_holds_its_mail(make_local: MakeLocal) -> None:
    other = SMTPTestServer()
    other.start()
    try:
        local = make_local(relays={"other": other})
        mid = local.send(**mail(relay="other"))
        local.deliverer.settings = local.settings.with_(relays={})
        local.run_until_idle()
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
        assert rec.last_error is not None and "other" in rec.last_error
        assert rec.next_attempt_at == pytest.approx(local.clock() + 300)
        assert other.connections_opened == 0
    finally:
        other.stop()


def test_421_greeting_backs_off_the_relay_and_later_mail_waits_with_it(
        local: LocalDelivery) -> None:
    assert local.server is not None
    local.server.add_fault(Fault.greeting(421, "4.3.2 Too busy", times=1))
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(3)])
    local.run_until_idle()
    for rec in map(local.record, ids):
        assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
    local.store.resume_relay("default")
    local.drain()
    assert [local.status(i)["state"] for i in ids] == ["delivered"] * 3  # type: ignore[index]


def test_a_mid_batch_disconnect_pauses_the_relay_for_the_rest(local: LocalDelivery) -> None:
    assert local.server is not None
    local.server.add_fault(Fault.disconnect("RCPT", code=421, match="u1@", times=1))
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(20)])
    local.run_until_idle()
    states = [local.record(i).state for i in ids]  # type: ignore[union-attr]
    assert states[0] is MessageState.DELIVERED
    assert MessageState.DEFERRED in states
    local.store.resume_relay("default")
    local.drain()
    assert {local.status(i)["state"] for i in ids} == {"delivered"}  # type: ignore[index]
    assert max(local.server.deliveries().values()) == 1


# -- fleet-wide limits -----------------------------------------------------------------

def test_a_window_slot_keeps_its_connection_until_idle(make_local: MakeLocal) -> None:
    server = SMTPTestServer()
    server.start()
    try:
        local = make_local(server.dsn(fleet_max_connections=1, idle_timeout=5))
        slots = local.store.keys.slots("default")
        for round_ in range(3):  # three passes, one connection, one slot
            ids = local.send_many([mail(f"u{round_}-{i}@example.com") for i in range(3)])
            local.run_until_idle()
            assert {local.status(i)["state"] for i in ids} == {"delivered"}  # type: ignore[index]
        assert server.connections_opened == 1
        assert local.redis.zcard(slots) == 1 and local.deliverer.slots.held() == 1
        local.clock.advance(6)  # idle past idle_timeout: the heartbeat's reap closes it
        local.deliverer.slots.renew()
        wait_until(lambda: server.active_connections == 0)
        assert local.redis.zcard(slots) == 0 and local.deliverer.slots.held() == 0
    finally:
        server.stop()


def test_fleet_rate_holds_back_what_the_budget_does_not_allow(make_local: MakeLocal) -> None:
    server = SMTPTestServer()
    server.start()
    try:
        local = make_local(server.dsn(fleet_rate=3))
        ids = local.send_many([mail(f"u{i}@example.com") for i in range(5)])
        local.run_until_idle()
        held = [r for r in map(local.record, ids) if r and r.state is MessageState.DEFERRED]
        assert len(held) == 2 and all(r.attempts == 0 for r in held)
        assert all("fleet-wide limit" in (r.last_error or "") for r in held)
        # The budget refills in real time (the store's token bucket); move on until it has.
        wait_until(lambda: local.advance(1) or len(server.messages) == 5, 10,
                   message="the held mail to go out")
        assert max(server.deliveries().values()) == 1
    finally:
        server.stop()


# -- expiry, poison records, stale wake-ups --------------------------------------------

def test_mail_past_its_lifetime_is_dead_without_a_try(local: LocalDelivery) -> None:
    mid = local.send(**mail(expires_at=local.clock() + 30))
    local.clock.advance(31)
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEAD
    assert "lifetime exceeded" in (rec.dead_reason or "")
    assert local.server is not None and local.server.connections_opened == 0


def test_a_retry_past_the_lifetime_dead_letters_now(local: LocalDelivery) -> None:
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.3.0 Try again later"))
    mid = local.send(**mail(expires_at=local.clock() + 30))
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEAD
    assert "lifetime" in (rec.dead_reason or "")


def test_unreadable_and_invalid_records_are_set_aside_alone(local: LocalDelivery) -> None:
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(3)])
    local.redis.hset(local.store.keys.record(ids[0]), "doc", b"{not json")
    rec = local.record(ids[1])
    assert rec is not None
    rec.expires_at = float("nan")
    local.redis.hset(local.store.keys.record(ids[1]), "doc", rec.to_json())
    local.run_until_idle()

    assert local.reports[-1].quarantined == 2
    dead = {r.id: r for r in local.dead_letters}
    assert set(dead) == {ids[0], ids[1]}
    assert "unreadable record" in (dead[ids[0]].dead_reason or "")
    assert "invalid record: expires_at" in (dead[ids[1]].dead_reason or "")
    assert local.status(ids[2])["state"] == "delivered"  # type: ignore[index]
    assert local.redis.hget(local.store.keys.record(ids[0]), "raw")  # raw bytes kept


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("sender", 7, "invalid record: sender"),
    ("recipients", [], "invalid record: no recipient"),
    ("relay", None, "invalid record: relay"),
    ("attempts", -1, "invalid record: attempts"),
    ("metadata", [1], "invalid record: history must be a list and metadata an object"),
])
def test_each_invalid_field_is_named(local: LocalDelivery, field: str, value: Any,
                                     reason: str) -> None:
    mid = local.send(**mail())
    rec = local.record(mid)
    assert rec is not None
    setattr(rec, field, value)
    local.redis.hset(local.store.keys.record(mid), "doc", rec.to_json())
    local.run_until_idle()
    assert reason in (local.record(mid).dead_reason or "")  # type: ignore[union-attr]


def test_an_envelope_refused_before_sending_is_quarantined(local: LocalDelivery) -> None:
    ids = local.send_many([mail("a@example.com"), mail("b@example.com")])
    rec = local.record(ids[0])
    assert rec is not None
    rec.sender = "bad sender@example.com"  # a string, but no valid envelope address
    local.redis.hset(local.store.keys.record(ids[0]), "doc", rec.to_json())
    local.run_until_idle()
    assert "invalid record: invalid envelope address" in (
        local.record(ids[0]).dead_reason or "")  # type: ignore[union-attr]
    assert local.status(ids[1])["state"] == "delivered"  # type: ignore[index]


def test_stale_wake_ups_are_skipped(local: LocalDelivery) -> None:
    done = local.send(**mail("done@example.com"))
    local.run_until_idle()
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.3.0 Try again later", times=1))
    waiting = local.send(**mail("later@example.com"))
    local.run_until_idle()
    sent = len(local.server.messages)

    report = local.deliver([done, waiting, "no-such-id"])

    assert report.skipped == {"final": 1, "not_due": 1, "missing": 1} and report.claimed == 0
    assert len(local.server.messages) == sent
    assert local.status(waiting)["state"] == "deferred"  # type: ignore[index]


def test_a_record_an_earlier_worker_was_sending_is_flagged(local: LocalDelivery) -> None:
    mid = local.send(**mail())
    local.redis.hset(local.store.keys.record(mid), "sending", f"deadbeef {local.clock() - 5}")
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DELIVERED
    assert rec.possible_duplicate and rec.recipients[0].possible_duplicate


# -- leases, budgets and failures mid-batch ---------------------------------------------

def test_a_lease_lost_before_saving_leaves_the_outcome_to_the_new_owner(
        local: LocalDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    mid = local.send(**mail())
    commit = local.store.commit_many

    def taken_over(items: Any, *riders: Any) -> list[bool]:
        local.redis.set(local.store.keys.lease(mid), "another-worker")
        return commit(items, *riders)

    monkeypatch.setattr(local.store, "commit_many", taken_over)
    local.run_until_idle()
    assert local.reports[0].lost_leases == 1 and local.reports[0].states == {}
    assert local.status(mid)["state"] == "queued"  # type: ignore[index]


def test_a_lease_lost_before_sending_is_never_sent(
        local: LocalDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = local.send_many([mail("a@example.com"), mail("b@example.com")])
    claim = local.store.claim_many

    def steal_one(*args: Any, **kw: Any) -> Any:
        claims = claim(*args, **kw)
        local.redis.set(local.store.keys.lease(ids[1]), "another-worker")
        return claims

    monkeypatch.setattr(local.store, "claim_many", steal_one)
    local.deliver(ids)
    assert local.server is not None
    assert [m.recipients for m in local.server.messages] == [("a@example.com",)]
    assert local.reports[0].lost_leases == 1


def test_a_spent_batch_budget_requeues_the_rest_unsent(make_local: MakeLocal) -> None:
    hooks = Hooks()
    local = make_local(hooks=hooks, task_time_limit=100)
    spent = []

    def spend(rec: Any) -> None:
        if not spent:
            spent.append(rec.id)
            local.clock.advance(81)  # past 80% of task_time_limit

    hooks.connect("delivered", spend)
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(20)])
    local.deliver(local.wakeups[0][0])
    local.drop_wakeups()
    first = local.reports[0]
    assert first.states == {"delivered": 16, "queued": 4}  # one chunk, then nothing new
    local.run_until_idle()  # the sweeper wakes the requeued ones
    assert {local.status(i)["state"] for i in ids} == {"delivered"}  # type: ignore[index]
    assert local.server is not None and max(local.server.deliveries().values()) == 1


def test_no_free_connection_requeues_without_an_attempt_or_a_pause(
        make_local: MakeLocal) -> None:
    server = SMTPTestServer()
    server.start()
    try:
        local = make_local(server.dsn(max_connections=1, connect_timeout=0.2))
        server.add_fault(Fault.delay("DOT", 1.0, times=1))
        pool = local.pools.get(local.settings.relay("default"))
        busy = threading.Thread(target=pool.send, args=(
            Envelope("a@example.com", ("busy@example.com",), b"Subject: x\r\n\r\nx\r\n"),))
        busy.start()
        wait_until(lambda: pool.stats().active == 1)
        mid = local.send(**mail())
        local.deliver(local.wakeups[0][0])
        busy.join(5)
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.QUEUED and rec.attempts == 0
        assert pauses(local) == {}
    finally:
        server.stop()


def test_a_failure_escaping_send_many_makes_the_chunk_uncertain(
        local: LocalDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = local.pools.get(local.settings.relay("default"))

    def interrupted(*args: Any, **kw: Any) -> Any:
        raise DeliveryUncertain("soft time limit")  # e.g. Celery's, mid-batch

    monkeypatch.setattr(pool, "send_many", interrupted)
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(20)])
    local.deliver(local.wakeups[0][0])
    recs = [local.record(i) for i in ids]
    assert all(r is not None for r in recs)
    first = [r for r in recs[:16] if r]
    assert all(r.state is MessageState.DEFERRED and r.possible_duplicate for r in first)
    assert {r.state for r in recs[16:] if r} == {MessageState.QUEUED}  # never started


def test_a_redis_blip_mid_group_saves_nothing_for_it(
        local: LocalDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.store.relays, "admit", redis_down)  # pause and rate read
    mid = local.send(**mail())
    local.deliver(local.wakeups[0][0])
    assert local.status(mid)["state"] == "queued"  # type: ignore[index]
    monkeypatch.undo()
    local.redis.delete(local.store.keys.lease(mid))  # its lease runs out
    local.clock.advance(local.settings.lease_seconds + local.settings.stuck_after + 1)
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]


def test_relay_bookkeeping_failing_does_not_undo_saved_outcomes(
        local: LocalDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.store, "relay_succeeded", redis_down)
    mid = local.send(**mail())
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]


# -- the harness itself --------------------------------------------------------------------

def test_run_until_idle_gives_up_on_endless_work_naming_it(make_local: MakeLocal) -> None:
    hooks = Hooks()
    local = make_local(hooks=hooks)
    woken: list[str] = []
    # An app bug: every delivered message sends another one.
    hooks.connect("delivered", lambda rec: woken.append(local.send(**mail())))
    local.send(**mail())
    with pytest.raises(StillPending, match="1 wake-ups pending") as info:
        local.run_until_idle(max_rounds=3)
    assert woken[-1] in str(info.value) and len(woken) == 3


def test_clock_only_goes_forward_and_the_runtime_is_given_back() -> None:
    from mailworker import runtime

    before = runtime.current()
    clock = Clock(start=1000.0)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    with LocalDelivery(clock=clock) as local:
        assert runtime.current() is not None and runtime.current().store is local.store  # type: ignore[union-attr]
        assert local.clock() == 1000.0
        assert "wake-ups pending" in repr(local)
        mid = local.send(**mail())
        assert local.record(mid).created_at == pytest.approx(1000.0, abs=1)  # type: ignore[union-attr]
    after = runtime.current()
    assert (after is None) == (before is None)
    if before is not None and after is not None:
        assert after.settings == before.settings


def test_drain_gives_up_on_mail_that_would_wait_past_its_bound(local: LocalDelivery) -> None:
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.3.0 Try again later"))
    mid = local.send(**mail())
    with pytest.raises(StillPending, match="still waiting"):
        local.drain(max_seconds=100)  # the second retry is due 60 + 120 s later
    assert local.status(mid)["state"] == "deferred"  # type: ignore[index]
    assert [e["event"] for e in local.events].count("smtp.connect") == 2


def test_nested_harnesses_give_back_each_others_runtime(make_local: MakeLocal) -> None:
    from mailworker import api, runtime

    outer = make_local()
    with LocalDelivery(clock=outer.clock) as inner:
        assert runtime.current().store is inner.store  # type: ignore[union-attr]
        inner_id = api.send(to="a@example.com", subject="x", text="x")  # wakes the inner
        assert inner.wakeups and not outer.wakeups
    assert runtime.current().store is not inner.store  # type: ignore[union-attr]
    outer_id = api.send(to="b@example.com", subject="x", text="x")
    outer.run_until_idle()
    assert [r.id for r in outer.records] == [outer_id] and outer.record(inner_id) is None
    assert outer.status(outer_id)["state"] == "delivered"  # type: ignore[index]


def test_the_harness_runs_on_a_real_redis_too(make_local: MakeLocal, redis_url: str) -> None:
    import uuid

    import redis

    client = redis.Redis.from_url(redis_url)
    local = make_local(redis_client=client, key_prefix=f"local{uuid.uuid4().hex[:8]}")
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted", times=1))
    mid = local.send(**mail())
    assert local.drain() == pytest.approx(60)
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]
    assert {r.id for r in local.records} == {mid}


def test_a_bad_setting_leaves_no_server_running_and_the_runtime_as_it_was() -> None:
    from mailworker import runtime
    from mailworker.config import ConfigError

    before, threads = runtime.current(), threading.active_count()
    with pytest.raises(ConfigError, match="max_attempts"):
        LocalDelivery(retry={"max_attempts": 0})  # read by the deliverer, after the runtime
    assert runtime.current() is before or (
        before is not None and runtime.current().settings == before.settings)  # type: ignore[union-attr]
    wait_until(lambda: threading.active_count() == threads, 5,
               message="the test server's thread to stop")


def test_a_full_fleet_window_holds_mail_without_an_attempt(make_local: MakeLocal) -> None:
    from mailworker.fleet import INITIAL_WINDOW

    server = SMTPTestServer()
    server.start()
    try:
        local = make_local(server.dsn(fleet_max_connections=1))
        taken, _, _ = local.store.relays.take_slot(  # another worker holds the only slot
            "default", "other-worker", ceiling=1, initial=INITIAL_WINDOW, hold_seconds=60)
        assert taken
        mid = local.send(**mail())
        local.run_until_idle()
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
        assert server.connections_opened == 0 and pauses(local) == {}

        local.store.relays.release("default", "other-worker")
        local.drain()
        assert local.status(mid)["state"] == "delivered"  # type: ignore[index]
        assert server.connections_opened == 1
    finally:
        server.stop()


def test_without_window_feedback_a_failed_relay_falls_back_on_its_backoff(
        make_local: MakeLocal, monkeypatch: pytest.MonkeyPatch) -> None:
    local = make_local(f"smtp://127.0.0.1:{free_port()}?connect_timeout=2")
    monkeypatch.setattr(local.deliverer.window, "feedback", redis_down)
    mid = local.send(**mail())
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
    assert "default" in pauses(local)  # no cohort known: the relay backoff decides
    assert rec.next_attempt_at == pytest.approx(local.clock() + 30)


def test_a_pause_that_cannot_be_written_still_saves_the_outcomes(
        make_local: MakeLocal, monkeypatch: pytest.MonkeyPatch) -> None:
    server = SMTPTestServer(auth={"alice": "right"}, require_auth=True)
    server.start()
    try:
        local = make_local(server.dsn(user="alice", password="wrong", allow_plain_auth=True))
        monkeypatch.setattr(local.store, "pause_relay", redis_down)
        mid = local.send(**mail())
        local.run_until_idle()
        rec = local.record(mid)
        assert rec is not None and rec.state is MessageState.DEFERRED and rec.attempts == 0
        assert pauses(local) == {}
    finally:
        server.stop()
