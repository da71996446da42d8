"""The scheduler in-process (LocalDelivery): promotion of due mail, the sweep, the lock.

Ticks run on LocalDelivery's clock, so "due in 60 s" and "stuck for stuck_after" are
tested exactly, without waiting.
"""

from __future__ import annotations

from typing import Any

import pytest

from mailworker.config import QueueSettings, Settings
from mailworker.scheduler import Scheduler
from mailworker.testing import Fault, wait_until
from mailworker.testing.local import LocalDelivery

from .conftest import MakeLocal


def test_deferred_mail_is_woken_when_due_and_not_before(local: LocalDelivery) -> None:
    mid = local.send(to="a@example.com", subject="x", text="x", delay=60)
    assert local.wakeups == [] and local.status(mid)["state"] == "deferred"  # type: ignore[index]
    local.clock.advance(59)
    assert local.tick() == 0
    local.clock.advance(1)
    assert local.tick() == 1
    assert local.wakeups == [([mid], "transactional")]
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]


def test_wake_ups_are_grouped_by_queue_and_cut_to_batch_size(make_local: MakeLocal) -> None:
    settings = Settings(default_sender="app@example.com", batch_size=2,
                        queues={"transactional": QueueSettings("transactional"),
                                "bulk": QueueSettings("bulk")})
    local = make_local(settings=settings)
    tx = local.send_many([{"to": f"u{i}@example.com", "subject": "x", "text": "x",
                           "delay": 10} for i in range(3)])
    bulk = local.send(to="b@example.com", subject="x", text="x", delay=10, queue="bulk")
    local.clock.advance(10)
    assert local.tick() == 4
    # All due at the same time: the order of the ids is Redis's, the grouping is ours.
    wakeups = sorted(local.wakeups, key=lambda w: (w[1], -len(w[0])))
    assert [(len(ids), queue) for ids, queue in wakeups] == [
        (1, "bulk"), (2, "transactional"), (1, "transactional")]
    assert wakeups[0][0] == [bulk] and sorted(wakeups[1][0] + wakeups[2][0]) == sorted(tx)


def test_a_lost_wake_up_is_swept_after_stuck_after_once_per_backoff(
        local: LocalDelivery) -> None:
    mid = local.send(to="a@example.com", subject="x", text="x")
    assert local.drop_wakeups() == 1  # the broker lost it
    stuck_after = local.settings.stuck_after
    # Its watchdog (stamped by send() from the wall clock, close to ours).
    watchdog = local.redis.zscore(local.store.keys.inflight, mid)
    assert watchdog == pytest.approx(local.clock() + stuck_after, abs=1)
    local.clock.advance(watchdog - local.clock() - 0.1)
    assert local.tick() == 0
    local.clock.advance(0.1)
    assert local.tick() == 1 and local.wakeups == [([mid], "transactional")]
    local.drop_wakeups()  # lost again: swept again after stuck_after...
    local.clock.advance(stuck_after)
    assert local.tick() == 1
    local.drop_wakeups()  # ...and again after twice that (a long backlog looks the same)
    local.clock.advance(2 * stuck_after - 0.1)
    assert local.tick() == 0
    local.clock.advance(0.1)
    assert local.tick() == 1
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]


def test_mail_held_by_a_live_lease_is_not_swept(local: LocalDelivery) -> None:
    mid = local.send(to="a@example.com", subject="x", text="x")
    local.drop_wakeups()
    local.redis.set(local.store.keys.lease(mid), "a-live-worker", px=60_000)
    local.clock.advance(local.settings.stuck_after + 1)
    assert local.tick() == 0 and local.wakeups == []


def test_a_record_gone_from_the_store_is_forgotten(local: LocalDelivery) -> None:
    mid = local.send(to="a@example.com", subject="x", text="x")
    local.drop_wakeups()
    local.redis.delete(local.store.keys.record(mid))  # past its retention, say
    local.clock.advance(local.settings.stuck_after + 1)
    assert local.tick() == 1  # looked at...
    assert local.wakeups == []  # ...but nothing to wake
    assert local.store.counts()["in_flight"] == 0


def test_a_publish_failure_leaves_the_mail_to_the_sweeper(local: LocalDelivery) -> None:
    mid = local.send(to="a@example.com", subject="x", text="x", delay=5)
    calls: list[int] = []

    def broker_down(ids: Any, queue: str) -> None:
        calls.append(len(ids))
        raise ConnectionError("broker unreachable")

    local.scheduler.publish = broker_down
    local.clock.advance(5)
    assert local.tick() == 1 and calls == [1]
    local.scheduler.publish = local.publish
    local.clock.advance(local.settings.stuck_after)
    local.run_until_idle()
    assert local.status(mid)["state"] == "delivered"  # type: ignore[index]


def test_one_scheduler_holds_the_lock_at_a_time(local: LocalDelivery) -> None:
    first = Scheduler(local.settings, local.store, publish=local.publish, clock=local.clock)
    second = Scheduler(local.settings, local.store, publish=local.publish, clock=local.clock)
    assert first._hold_lock()
    assert first._hold_lock()  # extended by its holder
    assert not second._hold_lock()
    local.redis.delete(local.store.keys.scheduler_lock)  # it expired
    assert second._hold_lock() and not first._hold_lock()


def test_run_ticks_until_stopped_and_survives_errors(make_local: MakeLocal) -> None:
    local = make_local(tick_interval=0.01)
    assert local.server is not None
    local.server.add_fault(Fault.reply("RCPT", 451, "4.3.0 Try again later", times=1))
    mid = local.send(to="a@example.com", subject="x", text="x")
    local.run_until_idle()
    local.clock.advance(60)  # now due: the running scheduler wakes it
    failures: list[int] = []
    tick = local.scheduler.tick

    def flaky(limit: int = 5000) -> int:
        if not failures:
            failures.append(1)
            raise ConnectionError("Redis restarting")
        return tick(limit)

    local.scheduler.tick = flaky  # type: ignore[method-assign]
    thread = local.scheduler.start_thread()
    try:
        wait_until(lambda: bool(local.wakeups), 10, message="the scheduler to wake the mail")
    finally:
        local.scheduler.stop()
        thread.join(5)
    assert not thread.is_alive() and failures == [1]
    assert local.wakeups == [([mid], "transactional")]


def test_default_publisher_is_celerys() -> None:
    from mailworker.broker import publish

    store: Any = object()
    assert Scheduler(Settings(), store).publish is publish


@pytest.mark.parametrize("backlog", [3])
def test_a_backlog_is_ticked_in_limits(local: LocalDelivery, backlog: int) -> None:
    ids = local.send_many([{"to": f"u{i}@example.com", "subject": "x", "text": "x",
                            "delay": 1} for i in range(backlog)])
    local.clock.advance(1)
    assert local.scheduler.tick(limit=2) == 2
    assert local.scheduler.tick(limit=2) == 1
    assert sorted(m for batch, _ in local.wakeups for m in batch) == sorted(ids)
