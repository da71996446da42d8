"""Relay DSNs: everything is checked at load, with the relay and the option named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trustme

from mailworker.config import ConfigError, load_settings
from mailworker.relay import InvalidRelayError, _redact_dsn, parse_relay


def bad(dsn: str, *needles: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(InvalidRelayError) as info:
        parse_relay("r1", dsn, env or {})
    text = str(info.value)
    assert "relay 'r1'" in text, text
    for needle in needles:
        assert needle in text, text
    return text


def test_defaults_and_a_good_dsn() -> None:
    relay = parse_relay("r", "smtp+starttls://u:p@mail.example.com?timeout=20"
                        "&local_hostname=client.example.com&max_connections=4")
    assert (relay.port, relay.timeout, relay.setup_timeout, relay.deadline) == (587, 20, 60, 120)
    assert relay.local_hostname == "client.example.com" and relay.max_connections == 4
    assert parse_relay("r", "smtp://h?local_hostname=[192.0.2.1]").local_hostname == "[192.0.2.1]"
    assert parse_relay("r", "smtp://h?local_hostname=[IPv6:2001:db8::1]").local_hostname


@pytest.mark.parametrize(("option", "value"), [
    ("timeout", "nan"), ("timeout", "inf"), ("connect_timeout", "nan"), ("deadline", "nan"),
    ("deadline", "-inf"), ("setup_timeout", "0"), ("max_age", "nan"), ("idle_timeout", "inf"),
    ("noop_after", "nan"), ("fleet_rate", "inf"), ("fleet_rate", "nan"), ("timeout", "1e300"),
    ("max_connections", "0"), ("max_connections", "100000"), ("max_messages", "-1"),
    ("fleet_max_connections", "1.5"), ("timeout", "-1"), ("timeout", ""),
])
def test_s2_13_numeric_options_are_finite_and_in_range(option: str, value: str) -> None:
    """Before: only `<= 0` was refused; nan and inf loaded (deadline=nan disabled the
    transaction deadline) and failed only at send."""
    bad(f"smtp://h?{option}={value}", f"option {option}=")


@pytest.mark.parametrize("name", ["a\r\nRSET", "a b", "hüst", "-lead.example", "a..b",
                                  "x" * 64 + ".example", "[999.1.1.1]", "[IPv6:1.2.3.4]",
                                  "[1.2.3.4"])
def test_s2_13_local_hostname_is_a_valid_ehlo_name(name: str) -> None:
    from urllib.parse import quote
    bad(f"smtp://h?local_hostname={quote(name)}", "local_hostname", "EHLO name")


def test_s2_13_port_zero_and_other_dsn_mistakes() -> None:
    """Before: port 0 silently became the default port; duplicate options: last won."""
    bad("smtp://h:0", "port", "1 to 65535")
    bad("smtp://h:65536", "port")
    bad("smtp://h?timeout=1&timeout=2", "given twice: timeout")
    bad("smtp://u@h?password_env=", "password_env is empty")
    bad("smtp://h#frag", "unexpected")


def test_s2_13_config_error_names_the_relay_and_the_option() -> None:
    env = {**os.environ, "MAILWORKER_RELAY_BULK": "smtp://h?deadline=nan"}
    env.pop("MAILWORKER_CONFIG", None)
    with pytest.raises(ConfigError, match=r"relay 'bulk': option deadline='nan'"):
        load_settings(environ=env)


def test_s2_09_ca_file_and_password_file_are_checked_at_load(tmp_path: Path) -> None:
    """Before: a missing or broken ca_file loaded and failed every send as "uncertain
    after the dot"."""
    missing = tmp_path / "nope.pem"
    bad(f"smtp://h?ca_file={missing}", "ca_file", "No such file")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    bad(f"smtp://h?ca_file={garbage}", "ca_file", "not a PEM certificate bundle")
    bad(f"smtp://h?ca_file={tmp_path}", "ca_file")  # a directory
    good = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(good))
    assert parse_relay("r", f"smtp://h?ca_file={good}").ca_file == str(good)
    bad(f"smtp://u@h?password_file={missing}", "password_file", "No such file")
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("secret")
        locked.chmod(0)
        bad(f"smtp://u@h?password_file={locked}", "password_file", "Permission denied")


def test_s2_09_config_error_for_a_missing_ca_file() -> None:
    env = {**os.environ, "MAILWORKER_RELAY_DEFAULT": "smtp://h?ca_file=/etc/ssl/privte-ca.pem"}
    env.pop("MAILWORKER_CONFIG", None)
    with pytest.raises(ConfigError, match=r"relay 'default': option ca_file='/etc/ssl/privte"):
        load_settings(environ=env)


@pytest.mark.parametrize("password", ["p@ss", "p@ss@word", "pa:ss@x", "a/b@c"])
def test_s2_12_dsn_redaction_hides_passwords_with_at_colon_slash(password: str) -> None:
    """Before: redaction stopped at the first '@' (`smtp://u:***@ss@host`), and a '/' in
    the password put the rest of it into an "unexpected path" error."""
    dsn = f"smtp://user:{password}@mail.example.com:99999"
    assert _redact_dsn(dsn) == "smtp://user:***@mail.example.com:99999"
    with pytest.raises(InvalidRelayError) as info:
        parse_relay("r", dsn, {})
    secret_parts = [p for p in password.replace("@", " ").replace(":", " ").replace("/", " ")
                    .split() if len(p) > 1]
    for part in secret_parts:
        assert part not in str(info.value), str(info.value)
    relay = parse_relay("r", f"smtp://user:{password.replace('/', '%2F')}@h:25")
    assert relay.password == password and password not in repr(relay)
