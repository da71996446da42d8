"""Relay groups in-process (LocalDelivery, two SMTP test servers as members): failover,
round robin by weight, per-recipient state across members, and the choice itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from mailworker.config import Settings
from mailworker.groups import HEALTH_TTL, Groups
from mailworker.record import MessageState, RcptState
from mailworker.relay_groups import RelayGroup, group_from_env
from mailworker.testing import Fault, SMTPTestServer
from mailworker.testing.local import LocalDelivery

from .conftest import MakeLocal


def mail(to: str | list[str] = "user@example.com", **kw: Any) -> dict[str, Any]:
    return {"to": to, "subject": "Hello", "text": "Hi there\n", **kw}


@pytest.fixture
def servers() -> Iterator[tuple[SMTPTestServer, SMTPTestServer]]:
    a, b = SMTPTestServer(hostname="a.test"), SMTPTestServer(hostname="b.test")
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def grouped(make_local: MakeLocal, servers: tuple[SMTPTestServer, SMTPTestServer],
            spec: str) -> LocalDelivery:
    group = group_from_env("main", spec)
    assert group is not None
    a, b = servers
    return make_local(relays={"a": a, "b": b}, groups={"main": group}, default_relay="main")


def copies(*servers: SMTPTestServer) -> Counter[tuple[str | None, str]]:
    total: Counter[tuple[str | None, str]] = Counter()
    for s in servers:
        total.update(s.deliveries())
    return total


def test_failover_moves_to_the_second_member_and_back_after_the_first_recovers(
        make_local: MakeLocal, servers: tuple[SMTPTestServer, SMTPTestServer]) -> None:
    a, b = servers
    local = grouped(make_local, servers, "failover(a, b)")
    first = local.send_many([mail(f"u{i}@example.com") for i in range(5)])
    local.run_until_idle()
    assert len(a.messages) == 5 and len(b.messages) == 0
    rec = local.record(first[0])
    assert rec is not None and rec.relay == "main" and rec.history[-1].relay == "a"

    a.down("421")
    during = local.send_many([mail(f"v{i}@example.com") for i in range(10)])
    local.run_until_idle()   # the first of a's cohort of two connections fails
    local.drain()            # their next attempts avoid a (failed_member): they go to b
    assert [local.status(i)["state"] for i in during] == ["delivered"] * 10  # type: ignore[index]
    assert len(b.messages) == 10 and len(a.messages) == 5
    rec = local.record(during[0])
    assert rec is not None and rec.relay == "main" and rec.attempts == 0
    assert [h.relay for h in rec.history][-1] == "b"

    a.up()
    # The pause and the probe time run on Redis's clock, not the test's: end them.
    local.store.resume_relay("a")
    local.redis.hset(local.store.keys.window("a"), "probe_at", 0)
    local.advance(HEALTH_TTL)  # this process's cached health expires
    after = local.send_many([mail(f"w{i}@example.com") for i in range(5)])
    local.run_until_idle()
    assert [local.status(i)["state"] for i in after] == ["delivered"] * 5  # type: ignore[index]
    assert len(a.messages) == 10 and len(b.messages) == 10

    total = copies(a, b)
    assert sum(total.values()) == 20 and max(total.values()) == 1  # nothing lost or doubled


def test_a_message_that_failed_on_a_member_goes_to_another_one_next(
        make_local: MakeLocal, servers: tuple[SMTPTestServer, SMTPTestServer]) -> None:
    """A retry avoids the member its last attempt failed on at the relay level. Without
    this, messages held until a down member's probe time went back to it as the probe
    (a member whose probe is due counts as healthy), failed, were held to the next probe,
    and never reached the healthy member (seen as a 30 s stall in an integration test)."""
    a, b = servers
    local = grouped(make_local, servers, "failover(a, b)")
    a.down("421")
    ids = local.send_many([mail(f"v{i}@example.com") for i in range(4)])
    local.run_until_idle()
    local.drain()
    assert [local.status(i)["state"] for i in ids] == ["delivered"] * 4  # type: ignore[index]
    for mid in ids:
        rec = local.record(mid)
        assert rec is not None
        relays = [h.relay for h in rec.history]
        assert relays[-1] == "b" and relays.count("a") <= 1, relays
    assert len(a.messages) == 0 and len(b.messages) == 4


def test_roundrobin_three_to_one_over_a_thousand_messages(
        make_local: MakeLocal, servers: tuple[SMTPTestServer, SMTPTestServer]) -> None:
    a, b = servers
    local = grouped(make_local, servers, "roundrobin(a:3, b:1)")
    ids = local.send_many([mail(f"u{i}@example.com") for i in range(1000)])
    local.run_until_idle(max_rounds=200)
    assert all(r.state is MessageState.DELIVERED for r in local.records)
    assert abs(len(a.messages) - 750) <= 37 and abs(len(b.messages) - 250) <= 12
    assert len(a.messages) + len(b.messages) == len(ids) == 1000
    assert max(copies(a, b).values()) == 1


def test_a_retry_goes_to_another_member_for_the_open_recipients_only(
        make_local: MakeLocal, servers: tuple[SMTPTestServer, SMTPTestServer]) -> None:
    a, b = servers
    local = grouped(make_local, servers, "failover(a, b)")
    a.add_fault(Fault.reply("RCPT", 451, "4.3.0 Try later", match="later@"))
    a.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    mid = local.send(**mail(["ok@example.com", "later@example.com", "bad@example.com"]))
    local.run_until_idle()
    rec = local.record(mid)
    assert rec is not None
    assert [r.state for r in rec.recipients] == [RcptState.DELIVERED, RcptState.DEFERRED,
                                                 RcptState.FAILED]
    local.store.pause_relay("a", 3600, "maintenance")  # a is skipped from now on
    local.drain()
    rec = local.record(mid)
    assert rec is not None and rec.relay == "main"
    assert [r.state for r in rec.recipients] == [RcptState.DELIVERED, RcptState.DELIVERED,
                                                 RcptState.FAILED]  # a's 5xx stays a 5xx
    assert [h.relay for h in rec.history] == ["a", "b"]
    assert [m.recipients for m in b.messages] == [("later@example.com",)]
    # Pauses and windows are the members'; the counters of the group's mail, the group's.
    states = local.store.relay_states()
    assert states["main"]["paused"] is None and states["main"]["window"] is None
    assert states["main"]["counters"]["delivered"] == 2
    assert states["a"]["paused"] is not None and states["b"]["window"] is not None


def groups_of(**specs: str) -> Groups:
    groups: dict[str, RelayGroup] = {}
    for name, spec in specs.items():
        g = group_from_env(name, spec)
        assert g is not None
        groups[name] = g
    return Groups(Settings(groups=groups), store=NoStore())  # type: ignore[arg-type]


class NoStore:
    """Stands for a store where the choice needs none (health given by the test)."""


def test_failover_takes_the_first_healthy_member_else_the_first() -> None:
    g = groups_of(main="failover(a, b, c)")
    assert g.pick("main", {}) == "a"
    assert g.pick("main", {"a": "paused"}) == "b"
    assert g.pick("main", {"a": "dead", "b": "paused"}) == "c"
    assert g.pick("main", {"a": "dead", "b": "paused", "c": "dead"}) == "a"
    assert g.pick("plain", {}) == "plain"


def test_a_nested_group_is_resolved_and_skipped_when_all_its_members_are_down() -> None:
    g = groups_of(eu="roundrobin(a, b)", main="failover(eu, c)")
    assert g.pick("main", {"a": "paused"}) == "b"
    assert g.pick("main", {"a": "paused", "b": "dead"}) == "c"
    assert [g.pick("main", {}) for _ in range(4)] == ["a", "b", "a", "b"]


def test_pick_avoids_the_member_a_message_failed_on_when_another_is_up() -> None:
    g = groups_of(main="failover(a, b, c)")
    assert g.pick("main", {}, avoid="a") == "b"
    assert g.pick("main", {"b": "paused"}, avoid="a") == "c"
    assert g.pick("main", {"b": "paused", "c": "dead"}, avoid="a") == "a"  # nothing else up
    assert g.pick("main", {}, avoid="x") == "a"


def test_only_relay_level_failures_are_avoided() -> None:
    from mailworker.groups import failed_member
    from mailworker.record import Attempt

    def attempt(relay: str, **error: Any) -> Attempt:
        return Attempt(1, 0.0, 1.0, "deferred", relay, error=error or None)

    assert failed_member([]) is None
    assert failed_member([attempt("a", stage="connect", code=None)]) == "a"
    assert failed_member([attempt("a", stage="greeting", code=421)]) == "a"
    assert failed_member([attempt("a", stage="rcpt", code=421)]) == "a"
    assert failed_member([attempt("a", stage="rcpt", code=450)]) is None  # the message's
    assert failed_member([attempt("a")]) is None


def test_roundrobin_spreads_by_weight_over_the_healthy_members_only() -> None:
    g = groups_of(main="roundrobin(a:3, b:1, c:2)")
    assert Counter(g.pick("main", {}) for _ in range(600)) == {"a": 300, "b": 100, "c": 200}
    assert Counter(g.pick("main", {"c": "dead"}) for _ in range(400)) == {"a": 300, "b": 100}
