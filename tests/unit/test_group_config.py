"""Relay groups in the config file and the environment, and their checks at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailworker.config import ConfigError, Settings, load_settings

RELAYS = """
[relays]
primary = "smtp://127.0.0.1:2525"
backup = "smtp://127.0.0.1:2526"
third = "smtp://127.0.0.1:2527"
"""


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    cfg = tmp_path / "c.toml"
    cfg.write_text(RELAYS + text)
    return load_settings(cfg, environ=env)


def test_groups_from_the_file(tmp_path: Path) -> None:
    s = load(tmp_path, """
[relays.main]
group = "failover"
members = ["primary", "backup"]

[relays.spread]
group = "roundrobin"
weights = { primary = 3, backup = 1 }

[relays.outer]
group = "failover"
members = ["spread", "third"]
""")
    groups = s.groups
    assert groups["main"].kind == "failover" and groups["main"].members == ("primary", "backup")
    assert groups["spread"].describe() == "roundrobin(primary:3, backup:1)"
    assert groups["outer"].members == ("spread", "third")
    assert set(s.relays) == {"primary", "backup", "third"}
    assert s.target("outer") == "outer" and s.target("primary") == "primary"


def test_groups_from_the_environment(tmp_path: Path) -> None:
    s = load(tmp_path, "", MAILWORKER_RELAY_MAIN="failover(primary, backup)",
             MAILWORKER_RELAY_SPREAD="roundrobin(primary:3, backup)",
             MAILWORKER_DEFAULT_RELAY="main")
    groups = s.groups
    assert groups["main"].members == ("primary", "backup")
    assert groups["spread"].weights == (3, 1)
    assert s.target() == "main"


@pytest.mark.parametrize(("text", "env", "message"), [
    ('[relays.main]\ngroup = "failover"\nmembers = ["primary", "nope"]\n', {},
     "relay group 'main': unknown member 'nope'"),
    ('[relays.g1]\ngroup = "failover"\nmembers = ["g2"]\n'
     '[relays.g2]\ngroup = "failover"\nmembers = ["g1"]\n', {},
     "relay groups form a cycle: g1 -> g2 -> g1"),
    ('[relays.g1]\ngroup = "failover"\nmembers = ["g1", "primary"]\n', {},
     "relay groups form a cycle: g1 -> g1"),
    ('[relays.g1]\ngroup = "failover"\nmembers = ["primary"]\n'
     '[relays.g2]\ngroup = "failover"\nmembers = ["g1"]\n'
     '[relays.g3]\ngroup = "roundrobin"\nmembers = ["g2", "third"]\n', {},
     "relay group 'g3': member group 'g2' contains group 'g1'; groups nest one level"),
    ('[relays.main]\ngroup = "fallback"\nmembers = ["primary"]\n', {},
     "group = 'fallback' is not one of failover, roundrobin"),
    ('[relays.main]\ngroup = "failover"\nweights = { primary = 2 }\n', {},
     "weights are for roundrobin groups"),
    ('[relays.main]\ngroup = "roundrobin"\nweights = { primary = 0, backup = 1 }\n', {},
     "weight of 'primary' is 0"),
    ('[relays.main]\ngroup = "roundrobin"\nmembers = []\n', {}, "members must be a non-empty"),
    ('[relays.main]\ngroup = "failover"\nmembers = ["primary", "primary"]\n', {},
     "primary listed twice"),
    ('[relays.main]\ngroup = "failover"\nmember = ["primary"]\n', {}, "unknown key(s) member"),
    ("", {"MAILWORKER_RELAY_MAIN": "roundrobin(primary:x, backup)"}, "weight of 'primary'"),
])
def test_bad_groups_fail_at_load_naming_the_group(tmp_path: Path, text: str,
                                                  env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text, **env)
    assert message in str(err.value)


def test_the_environment_may_turn_a_relay_into_a_group(tmp_path: Path) -> None:
    s = load(tmp_path, "", MAILWORKER_RELAY_THIRD="failover(primary, backup)")
    assert "third" in s.groups and "third" not in s.relays


def test_check_names_a_groups_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailworker.cli.check import run_check
    from mailworker.cli.output import CLIError

    cfg = tmp_path / "c.toml"
    cfg.write_text(RELAYS + '[relays.main]\ngroup = "failover"\nmembers = ["primary", "backup"]\n')
    monkeypatch.setenv("MAILWORKER_CONFIG", str(cfg))
    with pytest.raises(CLIError) as err:
        run_check("main")
    assert "'main' is a relay group: failover(primary, backup)" in str(err.value)
    assert "mailworker check primary" in str(err.value.hint)


def test_a_rule_may_route_to_a_group(tmp_path: Path) -> None:
    s = load(tmp_path, '[relays.main]\ngroup = "failover"\nmembers = ["primary", "backup"]\n'
                       '[[routes]]\nrecipient_domain = "example.org"\nrelay = "main"\n')
    assert s.routes[0].relay == "main"
