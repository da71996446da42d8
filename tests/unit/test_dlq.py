"""Dead letters in-process (LocalDelivery): list, show, retry and purge, with every filter.

The dead letters are made the real way: mail refused by a test SMTP server, so each one
carries the history and replies a worker would have saved.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from mailworker import dlq
from mailworker.dlq import DeadLetterFilter
from mailworker.record import MessageState, RcptState
from mailworker.testing import Fault, SMTPTestServer
from mailworker.testing.local import Clock, LocalDelivery

from .conftest import MakeLocal

HOUR = 3600.0


class Dead(NamedTuple):
    local: LocalDelivery
    ids: dict[str, str]
    server: SMTPTestServer  # relay "default"


@pytest.fixture
def dead(make_local: MakeLocal) -> Iterator[Dead]:
    """Four dead letters, three dead an hour ago by the wall clock (dlq's filters use it):

    ``rcpt``: 550 at RCPT for bad@x.org, ok@example.com delivered; ``data``: 554 after
    the dot; ``other``: 550 at RCPT on relay "other"; ``late``: like rcpt, dead now.
    """
    server, other = SMTPTestServer(), SMTPTestServer()
    server.start()
    other.start()
    try:
        local = make_local(relays={"default": server, "other": other},
                           clock=Clock(start=time.time() - HOUR))
        server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
        server.add_fault(Fault.reply("DOT", 554, "5.7.1 Looks like spam", match="spam@"))
        other.add_fault(Fault.reply("RCPT", 550, "5.1.1 Unknown here", match="bad@"))
        ids = {
            "rcpt": local.send(to=["ok@example.com", "bad@x.org"], subject="a", text="a"),
            "data": local.send(to="spam@example.com", subject="b", text="b"),
            "other": local.send(to="bad@y.org", subject="c", text="c", relay="other"),
        }
        local.run_until_idle()
        local.clock.advance(HOUR)
        ids["late"] = local.send(to="bad@x.org", subject="d", text="d")
        local.run_until_idle()
        assert {r.id for r in local.dead_letters} == set(ids.values())
        yield Dead(local, ids, server)
    finally:
        server.stop()
        other.stop()


def ids_of(records: list[Any]) -> set[str]:
    return {r.id for r in records}


def test_list_shows_every_dead_letter_oldest_first(dead: Dead) -> None:
    ids = dead.ids
    listed = dlq.list_dead()
    assert [r.id for r in listed][-1] == ids["late"]
    assert ids_of(listed) == set(ids.values())
    assert len(dlq.list_dead(limit=2)) == 2
    shown = dlq.show(ids["rcpt"])
    assert shown is not None and shown.state is MessageState.DEAD
    assert [r.state for r in shown.recipients] == [RcptState.DELIVERED, RcptState.FAILED]
    assert dlq.show("no-such-id") is None


@pytest.mark.parametrize(("flt", "expected"), [
    (DeadLetterFilter(relay="other"), {"other"}),
    (DeadLetterFilter(code=554), {"data"}),
    (DeadLetterFilter(code=550), {"rcpt", "other", "late"}),
    (DeadLetterFilter(exception="SMTPDataError"), {"data"}),
    (DeadLetterFilter(exception="smtplib.SMTPRecipientsRefused"), {"rcpt", "other", "late"}),
    (DeadLetterFilter(domain="@X.org"), {"rcpt", "late"}),
    (DeadLetterFilter(domain="example.com"), {"data"}),  # ok@example.com was delivered
    (DeadLetterFilter(older_than=HOUR / 2), {"rcpt", "data", "other"}),
    (DeadLetterFilter(newer_than=HOUR / 2), {"late"}),
    (DeadLetterFilter(relay="default", code=550, older_than=HOUR / 2), {"rcpt"}),
])
def test_filters_select_by_every_field(dead: Dead, flt: DeadLetterFilter,
                                       expected: set[str]) -> None:
    _local, ids, _server = dead
    assert ids_of(dlq.list_dead(flt)) == {ids[k] for k in expected}


def test_exception_classes_name_refusals_per_stage(dead: Dead) -> None:
    local, ids, _server = dead
    assert "SMTPRecipientsRefused" in dlq.exception_classes(local.record(ids["rcpt"]))
    assert "SMTPDataError" in dlq.exception_classes(local.record(ids["data"]))


def test_retry_sends_again_only_to_the_failed_recipients(dead: Dead) -> None:
    local, ids, server = dead
    server.clear_faults()
    assert dlq.retry([ids["rcpt"]], dry_run=True) == [ids["rcpt"]]
    assert local.record(ids["rcpt"]).state is MessageState.DEAD  # dry run: untouched
    before = len(server.messages)

    assert dlq.retry([ids["rcpt"]]) == [ids["rcpt"]]
    rec = local.record(ids["rcpt"])
    assert rec.state is MessageState.QUEUED and rec.attempts == 0
    assert rec.history[-1].outcome == "operator_retry" and rec.dead_reason is None
    assert local.wakeups == [([ids["rcpt"]], "transactional")]
    local.run_until_idle()

    rec = local.record(ids["rcpt"])
    assert rec.state is MessageState.DELIVERED
    assert [m.recipients for m in server.messages[before:]] == [("bad@x.org",)]
    assert ids["rcpt"] not in ids_of(dlq.list_dead())
    assert local.store.relay_stats()["default"]["dlq_retried"] == 1


def test_retry_by_filter_and_nothing_selected(dead: Dead) -> None:
    local, ids, _server = dead
    assert dlq.retry(flt=DeadLetterFilter(relay="nowhere")) == []
    assert set(dlq.retry(flt=DeadLetterFilter(relay="other"))) == {ids["other"]}
    assert dlq.retry([ids["other"]]) == []  # not dead any more
    assert local.wakeups == [([ids["other"]], "transactional")]


def test_two_operators_retrying_at_once_requeue_it_once(
        dead: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    local, ids, _server = dead
    claim = local.store.claim_many
    raced: list[list[str]] = []

    def the_other_operator_first(*args: Any, **kw: Any) -> Any:
        if not raced:  # between our read and our claim, the other operator's whole retry
            raced.append([])
            raced[0] = dlq.retry([ids["data"]])
        return claim(*args, **kw)

    monkeypatch.setattr(local.store, "claim_many", the_other_operator_first)
    assert dlq.retry([ids["data"]]) == []
    assert raced == [[ids["data"]]]
    assert len(local.wakeups) == 1
    rec = local.record(ids["data"])
    assert [a.outcome for a in rec.history].count("operator_retry") == 1


def test_a_purge_racing_a_retry_wins_cleanly(
        dead: Dead, monkeypatch: pytest.MonkeyPatch) -> None:
    local, ids, _server = dead
    claim = local.store.claim_many

    def purged_first(*args: Any, **kw: Any) -> Any:
        dlq.purge([ids["data"]])  # another operator, between our read and our claim
        return claim(*args, **kw)

    monkeypatch.setattr(local.store, "claim_many", purged_first)
    assert dlq.retry([ids["data"], ids["late"]]) == [ids["late"]]
    assert local.record(ids["data"]) is None and local.wakeups == [([ids["late"]],
                                                                      "transactional")]


def test_retry_leaves_a_dead_letter_another_holds(dead: Dead) -> None:
    local, ids, _server = dead
    local.redis.set(local.store.keys.lease(ids["late"]), "someone", px=60_000)
    assert dlq.retry([ids["late"]]) == []
    assert local.record(ids["late"]).state is MessageState.DEAD


def test_purge_dry_run_by_ids_and_by_filter(dead: Dead) -> None:
    local, ids, _server = dead
    assert dlq.purge([ids["data"]], dry_run=True) == [ids["data"]]
    assert local.record(ids["data"]) is not None
    assert dlq.purge([ids["data"]]) == [ids["data"]]
    assert local.record(ids["data"]) is None
    assert set(dlq.purge(flt=DeadLetterFilter(domain="x.org"))) == {ids["rcpt"], ids["late"]}
    assert ids_of(dlq.list_dead()) == {ids["other"]}
    assert dlq.purge(["no-such-id"]) == []


def test_an_unreadable_dead_letter_is_listed_and_left_by_retry(local: LocalDelivery) -> None:
    mid = local.send(to="a@example.com", subject="x", text="x")
    local.redis.hset(local.store.keys.record(mid), "doc", b"\xff not json")
    local.run_until_idle()
    listed = dlq.list_dead()
    assert [r.id for r in listed] == [mid] and "unreadable" in (listed[0].dead_reason or "")
    # A retry re-admits it; still unreadable, the worker sets it aside again, unsent.
    assert dlq.retry([mid]) == [mid]
    local.run_until_idle()
    assert [r.id for r in dlq.list_dead()] == [mid] and local.server is not None
    assert local.server.messages == []
    assert dlq.purge([mid]) == [mid] and dlq.list_dead() == []
