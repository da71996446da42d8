"""Routing rules: parsing with errors that name the rule, first match wins, the split of
one message into one record per relay at enqueue, status of a split message, and
`mailworker route`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

import mailworker
from mailworker import runtime
from mailworker.cli.main import main
from mailworker.config import ConfigError, Settings, load_settings
from mailworker.relay import parse_relay
from mailworker.routing_rules import Route, RouteError, choose, parse_routes, split

RELAYS = {name: parse_relay(name, f"smtp://127.0.0.1:{port}")
          for name, port in (("default", 2525), ("bulk", 2526), ("eu", 2527))}
RULES = parse_routes([
    {"recipient_domain": ["example.org", "*.example.org"], "relay": "bulk"},
    {"sender_domain": "eu.shop.example", "relay": "eu"},
    {"queue": "bulk", "metadata": {"tenant": "acme"}, "relay": "eu"},
    {"metadata": {"vip": "*"}, "relay": "bulk"},
])


def pick(recipient: str, sender: str = "app@shop.example", queue: str = "transactional",
         metadata: dict[str, Any] | None = None) -> str | None:
    found = choose(RULES, sender=sender, recipient=recipient, queue=queue, metadata=metadata)
    return found[1].relay if found else None


def test_first_match_wins_and_conditions_are_anded() -> None:
    assert pick("a@example.org") == "bulk"
    assert pick("a@EXAMPLE.ORG") == "bulk"  # domains in any case
    assert pick("a@mail.example.org") == "bulk"  # *.example.org: any subdomain
    assert pick("a@notexample.org") is None  # ...not a domain that merely ends alike
    assert pick("a@example.com", sender="x@eu.shop.example") == "eu"
    assert pick("a@example.org", sender="x@eu.shop.example") == "bulk"  # rule 1 first
    assert pick("a@example.com", queue="bulk", metadata={"tenant": "acme"}) == "eu"
    assert pick("a@example.com", queue="transactional", metadata={"tenant": "acme"}) is None
    assert pick("a@example.com", metadata={"vip": False}) == "bulk"  # "*": any value
    assert pick("a@example.com", metadata={"other": 1}) is None


def test_split_groups_recipients_by_relay_in_order() -> None:
    groups = split(RULES, "default", sender="app@shop.example",
                   recipients=["a@example.com", "b@example.org", "c@example.net"],
                   queue="transactional")
    assert groups == {"default": ["a@example.com", "c@example.net"], "bulk": ["b@example.org"]}


def test_metadata_values_compare_as_text() -> None:
    rules = parse_routes([{"metadata": {"flag": True, "n": 3}, "relay": "bulk"}])
    assert rules[0].metadata == {"flag": "true", "n": "3"}
    assert choose(rules, sender="", recipient="a@x.org", queue="q",
                  metadata={"flag": True, "n": 3}) is not None


@pytest.mark.parametrize(("spec", "says"), [
    ({"relay": "bulk", "recipient": "x.org"}, "rule 1: unknown key(s) recipient"),
    ({"recipient_domain": "x.org"}, "rule 1: relay = \"name\" is required"),
    ({"relay": "bulk", "recipient_domain": "a@x.org"}, "is not a domain"),
    ({"relay": "bulk", "recipient_domain": []}, "must be a non-empty text or list"),
    ({"relay": "bulk", "metadata": ["tenant"]}, "metadata must be a table"),
    ("bulk", "rule 1 is not a table"),
])
def test_bad_rules_name_the_rule_and_key(spec: Any, says: str) -> None:
    with pytest.raises(RouteError, match=re.escape(says)):
        parse_routes([spec])


def test_config_file_rules_are_checked_against_relays_and_queues(tmp_path: Path) -> None:
    cfg = tmp_path / "mw.toml"
    cfg.write_text('[relays]\ndefault = "smtp://127.0.0.1:2525"\n'
                   '[[routes]]\nrecipient_domain = "example.org"\nrelay = "bulk"\n')
    with pytest.raises(ConfigError, match=r"rule 1 \(recipient_domain in example.org\): "
                                          r"unknown relay 'bulk'"):
        load_settings(cfg, environ={})
    cfg.write_text('[[routes]]\nqueue = "nope"\nrelay = "bulk"\n')
    with pytest.raises(ConfigError, match="unknown queue 'nope'"):
        load_settings(cfg, environ={})
    cfg.write_text('routes = "bulk"\n')
    with pytest.raises(ConfigError, match="routes must be an array of tables"):
        load_settings(cfg, environ={})
    cfg.write_text('[relays]\ndefault = "smtp://127.0.0.1:2525"\nbulk = "smtp://h:25"\n'
                   '[[routes]]\nrecipient_domain = "example.org"\nrelay = "bulk"\n')
    assert load_settings(cfg, environ={}).routes == (
        Route(relay="bulk", recipient_domain=("example.org",)),)


@pytest.fixture
def routed() -> Iterator[runtime.Runtime]:
    rt = runtime.configure(Settings(relays=RELAYS, default_sender="app@shop.example",
                                    routes=RULES),
                           redis_client=fakeredis.FakeRedis(), publisher=lambda ids, q: None)
    yield rt
    runtime.reset_runtime()


def test_a_message_for_two_relays_is_split_at_enqueue(routed: runtime.Runtime) -> None:
    mid = mailworker.send(to=["a@example.com", "b@example.org"], cc="c@example.net",
                          subject="s", text="t", idempotency_key="order-7")
    first = routed.store.get(mid)
    assert first is not None and len(first.parts) == 2 and first.parts[0] == mid
    second = routed.store.get(first.parts[1])
    assert second is not None and second.parts == first.parts
    assert (first.relay, [r.address for r in first.recipients]) == (
        "default", ["a@example.com", "c@example.net"])
    assert (second.relay, [r.address for r in second.recipients]) == ("bulk", ["b@example.org"])
    assert routed.store.raw(mid) == routed.store.raw(second.id)  # same bytes, every header
    # status() of either part shows every recipient with its relay.
    for part in first.parts:
        st = mailworker.status(part)
        assert st is not None
        assert {(r["address"], r["relay"]) for p in st["parts"] for r in p["recipients"]} == {
            ("a@example.com", "default"), ("c@example.net", "default"),
            ("b@example.org", "bulk")}
    # The same idempotency key again: the same first id, and no part is queued twice.
    before = len(routed.store.record_ids())
    assert mailworker.send(to=["a@example.com", "b@example.org"], cc="c@example.net",
                           subject="s", text="t", idempotency_key="order-7") == mid
    assert len(routed.store.record_ids()) == before


def test_send_many_returns_one_id_per_message_and_relay_wins(routed: runtime.Runtime) -> None:
    ids = mailworker.send_many([
        {"to": ["a@example.com", "b@example.org"], "text": "split"},
        {"to": "b@example.org", "text": "one route"},
        {"to": ["a@example.com", "b@example.org"], "text": "explicit", "relay": "eu"},
    ])
    assert len(ids) == 3
    recs = routed.store.get_many(ids)
    assert [len(r.parts) for r in recs if r] == [2, 0, 0]
    assert [r.relay for r in recs if r] == ["default", "bulk", "eu"]
    assert len(routed.store.record_ids()) == 4


def test_route_command(routed: runtime.Runtime, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "a@example.com", "b@mail.example.org", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["relay"], r["why"]) for r in rows] == [
        ("default", "no rule matches: the default relay"),
        ("bulk", "rule 1: recipient_domain in example.org, *.example.org")]
    assert main(["route", "x@example.com", "--queue", "bulk", "--metadata", "tenant=acme"]) == 0
    assert "rule 3: queue in bulk and metadata tenant = acme" in capsys.readouterr().out
    assert main(["route", "x@example.com", "--metadata", "tenant"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert main(["route", "not-an-address"]) == 2
