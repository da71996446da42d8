"""The fleet-wide window and rate scripts (window.lua, feedback.lua, ratelimit.lua) on
fakeredis, with Redis's view of time moved by the test."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from mailworker.fleet import INITIAL_WINDOW, REGROW_AFTER, Window, ceiling_of
from mailworker.policy import Action, AttemptState, Policy, Scope
from mailworker.relay import parse_relay
from mailworker.smtp.errors import Failure, Stage
from mailworker.store import Store
from mailworker.store.relays import Feedback


class Now:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> Now:
    clock = Now()
    monkeypatch.setattr("mailworker.store.relays.time.time", clock)
    return clock


@pytest.fixture
def store() -> Iterator[Store]:
    yield Store(fakeredis.FakeRedis(server=fakeredis.FakeServer()), prefix="fleet")


RELAY = parse_relay("r", "smtp://127.0.0.1:2525?max_connections=3")
SLOT: dict[str, Any] = {"ceiling": 12, "initial": INITIAL_WINDOW, "hold_seconds": 15,
                        "probe_interval": 5}


def feed(store: Store, kind: str, accepted: int = 0, rate_ceiling: float | None = None
         ) -> Feedback:
    return store.relays.feedback("r", kind, accepted=accepted, ceiling=12,
                                 initial=INITIAL_WINDOW, regrow_after=REGROW_AFTER,
                                 rate_ceiling=rate_ceiling, rate_floor=1.0, probe_interval=5)


def take(store: Store, n: int) -> list[str]:
    """Take up to *n* slots; the tokens of those taken."""
    tokens = [f"t{random.random()}" for _ in range(n)]
    return [t for t in tokens if store.relays.take_slot("r", t, **SLOT)[0]]


def test_the_ceiling_is_fleet_max_connections_else_max_connections_times_workers() -> None:
    assert ceiling_of(RELAY) == 12
    assert ceiling_of(parse_relay("r", "smtp://h:25?fleet_max_connections=2")) == 2


def test_the_window_starts_small_and_grows_one_per_windows_worth_when_full(
        store: Store, now: Now) -> None:
    assert len(take(store, 5)) == 2  # the initial window
    fb = feed(store, "ok", accepted=2)  # a window's worth, every slot in use
    assert (fb.old_size, fb.size) == (2, 3)
    assert len(take(store, 5)) == 1
    feed(store, "ok", accepted=3)
    assert feed(store, "ok").size == 4


def test_the_window_does_not_grow_while_slots_are_free(store: Store, now: Now) -> None:
    take(store, 1)
    assert feed(store, "ok", accepted=50).size == 2  # demand, not successes, sets the need


def test_a_failed_connection_while_others_work_shrinks_without_a_cohort(
        store: Store, now: Now) -> None:
    take(store, 2)
    feed(store, "ok", accepted=2)
    held = take(store, 1)  # the third connection ...
    store.relays.release("r", held[0])  # ... was refused (421 at greeting) and given back
    fb = feed(store, "fail")
    assert (fb.size, fb.streak, fb.cohort_failed) == (2, 1, False)
    assert feed(store, "ok", accepted=10).size == 2  # no regrowth for REGROW_AFTER
    now.t += REGROW_AFTER
    take(store, 2)  # (the slots above lapsed meanwhile)
    assert feed(store, "ok", accepted=2).size == 3
    assert feed(store, "ok").streak == 0


def test_a_whole_failed_cohort_kills_the_relay_and_one_probe_per_interval(
        store: Store, now: Now) -> None:
    assert [feed(store, "fail").cohort_failed for _ in range(2)] == [False, True]
    assert take(store, 3) == []  # dead: nothing before the probe time
    now.t += 5
    probe = take(store, 3)
    assert len(probe) == 1  # the fleet's one probe
    store.relays.release("r", probe[0])
    assert take(store, 3) == []  # the next probe is an interval away, freed slot or not
    now.t += 5
    probe = take(store, 1)
    assert feed(store, "ok", accepted=1).streak == 0  # the probe worked: alive at 1
    store.relays.release("r", probe[0])
    assert len(take(store, 3)) == 1


def test_slow_down_cuts_the_rate_and_it_creeps_back_to_the_ceiling(
        store: Store, now: Now) -> None:
    assert store.relays.take_rate("r", 50, None) == (50, 0.0, None)  # no rate in force
    feed(store, "ok")  # measured from here
    for _ in range(4):  # 100 msg/s over two seconds
        now.t += 0.5
        feed(store, "ok", accepted=50)
    fb = feed(store, "slow", rate_ceiling=None)
    assert fb.rate == pytest.approx(70, rel=0.05)
    assert feed(store, "slow").rate == fb.rate  # at most one cut a second
    granted, _, rate = store.relays.take_rate("r", 500, None)
    assert rate == fb.rate and granted == int(fb.rate or 0)
    now.t += 10
    assert (feed(store, "ok", accepted=1).rate or 0) > fb.rate + 40  # +5% of 100 per second
    now.t += 1
    now.t += 100
    assert feed(store, "ok", accepted=1).rate is None  # back at twice the cut: forgotten


def test_fleet_rate_is_the_ceiling(store: Store, now: Now) -> None:
    assert store.relays.take_rate("r", 50, 10)[0] == 10
    now.t += 1
    fb = feed(store, "slow", rate_ceiling=10)
    assert fb.rate == 7
    assert store.relays.take_rate("r", 50, 10)[2] == 7
    now.t += 60
    assert feed(store, "ok", accepted=1, rate_ceiling=10).rate is None  # the ceiling rules


def test_window_changes_are_logged_once_each(store: Store, now: Now,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from structlog.testing import capture_logs

    window = Window(store, probe_interval=5)
    take(store, 2)
    with capture_logs() as logs:
        window.feedback(RELAY, "ok", 1)  # 2 -> 2.5: not a whole slot
        window.feedback(RELAY, "ok", 2)  # -> 3.3
        window.feedback(RELAY, "slow")
    events = [(e["event"], e.get("old"), e.get("new")) for e in logs]
    # The rate: 0.7 x the 3 transactions of the first second.
    assert events == [("relay.window", 2, 3), ("relay.rate", None, 2.1)]


# -- the policy's side --------------------------------------------------------------------

def refused_connection() -> Failure:
    return Failure(ConnectionRefusedError, text="refused", stage=Stage.CONNECT)


def test_a_relay_failure_holds_without_a_pause_unless_the_cohort_failed() -> None:
    policy = Policy(probe_interval=7)
    d = policy.decide(refused_connection(), AttemptState(cohort_failed=False),
                      random.Random(1))
    assert (d.action, d.scope, d.counts_as_attempt, d.relay_pause) == (
        Action.RETRY, Scope.MESSAGE, False, 0.0)
    assert 1 <= d.delay <= 2
    dead = policy.decide(refused_connection(), AttemptState(cohort_failed=True))
    assert (dead.scope, dead.relay_pause, dead.delay) == (Scope.RELAY, 7, 7)
    assert "cohort" in dead.reason
    legacy = policy.decide(refused_connection(), AttemptState(relay_failures=2))
    assert legacy.relay_pause == legacy.delay > 0 and legacy.scope is Scope.RELAY


def test_slow_down_spends_no_attempt_and_never_exhausts_the_message() -> None:
    policy = Policy(max_attempts=1)
    f = Failure.reply(451, "4.7.1 rate limited, slow down", Stage.MAIL)
    d = policy.decide(f, AttemptState(attempt=5))
    assert (d.action, d.counts_as_attempt, d.dead_letter) == (Action.SLOW_DOWN, False, False)


def test_a_rule_can_say_what_text_is_a_slow_down() -> None:
    from mailworker.policy_config import policy_from_table

    policy = policy_from_table({"probe_interval": "10s", "rules": [
        {"name": "provider-throttle", "codes": "421", "text": "too much mail",
         "stages": ["mail"], "action": "slow_down", "scope": "message"}]})
    assert policy.probe_interval == 10
    f = Failure.reply(421, "4.3.0 too much mail from you", Stage.MAIL)
    assert policy.decide(f).action is Action.SLOW_DOWN
    with pytest.raises(ValueError, match="not a valid regular expression"):
        policy_from_table({"rules": [{"name": "bad", "text": "("}]})


def test_one_fleet_slots_per_pools_however_many_deliverers(store: Store) -> None:
    from mailworker.config import Settings
    from mailworker.delivery import Deliverer
    from mailworker.smtp import PoolManager

    pools = PoolManager()
    first = Deliverer(Settings(default_sender="a@example.com"), store, pools)
    second = Deliverer(Settings(default_sender="a@example.com"), store, pools)
    assert first.slots is second.slots  # a Deliverer per task: the slots outlive it
    other = Deliverer(Settings(default_sender="a@example.com"),
                      Store(fakeredis.FakeRedis(), prefix="other"), pools)
    assert other.slots is not first.slots


def test_a_slow_down_that_never_ends_starts_counting_attempts() -> None:
    import smtplib

    from mailworker.outcome import apply_result
    from mailworker.smtp.errors import annotate
    from tests.unit.test_outcome import record

    policy = Policy(max_slow_downs=3, max_attempts=2)
    rec = record("a@x.org")
    steps = []
    for i in range(5):
        exc = annotate(smtplib.SMTPSenderRefused(451, b"4.7.1 slow down", "f@x"), Stage.MAIL)
        steps.append(apply_result(rec, exc, policy=policy, now=1000.0 + i, started_at=999.0,
                                  relay="r", rng=random.Random(1)))
    # Three holds without an attempt, then the 4th counts (backoff), the 5th is held again.
    assert [h.decision["action"] for h in rec.history if h.decision] == [
        "slow_down", "slow_down", "slow_down", "retry", "slow_down"]
    assert rec.attempts == 1
    assert "max_slow_downs=3" in rec.history[3].decision["reason"]  # type: ignore[index]


class _Sleeps:
    """The fleet module's time, moved by its own sleeps (no real waiting)."""

    def __init__(self) -> None:
        self.t = 500.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> _Sleeps:
    fake = _Sleeps()
    monkeypatch.setattr("mailworker.fleet.time", fake)
    return fake


def fleet_slots(store: Store) -> Any:
    from mailworker.fleet import FleetSlots
    from mailworker.smtp import PoolManager

    slots = FleetSlots(store, PoolManager(), hold_seconds=15, probe_interval=5)
    slots._ensure_heartbeat = lambda: None  # type: ignore[method-assign]
    return slots


def test_a_full_window_is_waited_on_briefly_and_a_freed_slot_taken(
        store: Store, now: Now, sleeps: _Sleeps) -> None:
    relay = parse_relay("r", "smtp://127.0.0.1:2525?max_connections=3")
    others = take(store, 5)
    assert len(others) == 2  # the initial window, full
    slots = fleet_slots(store)
    polls = {"n": 0}
    take_slot = store.relays.take_slot

    def freed_on_third_poll(*a: Any, **kw: Any) -> tuple[bool, int, float]:
        polls["n"] += 1
        if polls["n"] == 3:  # the holders' successes grew the window meanwhile
            feed(store, "ok", accepted=2)
        return take_slot(*a, **kw)

    store.relays.take_slot = freed_on_third_poll  # type: ignore[method-assign]
    token = slots.take(relay)
    assert token is not None and polls["n"] == 3 and len(sleeps.slept) == 2
    assert store.redis.zcard(store.keys.slots("r")) == 3  # never more than the window
    assert take(store, 5) == []  # 3 of 3


def test_a_full_window_is_waited_on_no_longer_than_the_bound(
        store: Store, now: Now, sleeps: _Sleeps) -> None:
    from mailworker.fleet import SLOT_WAIT

    relay = parse_relay("r", "smtp://127.0.0.1:2525?max_connections=3")
    assert len(take(store, 5)) == 2
    assert fleet_slots(store).take(relay) is None
    assert 0 < sum(sleeps.slept) <= SLOT_WAIT + 1e-9
    assert store.redis.zcard(store.keys.slots("r")) == 2


def test_a_dead_relay_is_not_waited_on(store: Store, now: Now, sleeps: _Sleeps) -> None:
    relay = parse_relay("r", "smtp://127.0.0.1:2525?max_connections=3")
    assert [feed(store, "fail").cohort_failed for _ in range(2)] == [False, True]
    assert fleet_slots(store).take(relay) is None  # slots free, no probe due: hold at once
    assert sleeps.slept == []
