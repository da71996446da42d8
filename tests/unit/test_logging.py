"""Secrets never reach a log line, whatever a caller binds."""

from __future__ import annotations

import io
import json

import structlog

from mailworker.logging import add_timestamp, configure_logging, redact_command, redact_secrets


def test_redact_command() -> None:
    assert redact_command("AUTH PLAIN AHVzZXIAc2Vrcml0") == "AUTH PLAIN ***"
    assert redact_command("auth login") == "AUTH LOGIN"
    assert redact_command("MAIL FROM:<a@b.c>") == "MAIL FROM:<a@b.c>"


def test_processor_blanks_secret_keys_dsn_passwords_and_auth() -> None:
    ev = redact_secrets(None, "info", {
        "password": "sekrit", "smtp_password": "x", "api_key": "k",
        "dsn": "smtp+starttls://user:sekrit@mail.example.com:587",
        "command": "AUTH PLAIN AHVzZXIAc2Vrcml0", "text": "250 OK",
    })
    assert ev["password"] == ev["smtp_password"] == ev["api_key"] == "***"
    assert ev["dsn"] == "smtp+starttls://user:***@mail.example.com:587"
    assert ev["command"] == "AUTH PLAIN ***"
    assert ev["text"] == "250 OK"


def test_json_output_has_no_secret() -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", stream=buf)
    structlog.get_logger("t").info("relay.configured", password="sekrit",
                                   relay="smtps://u:sekrit@h:465", command="AUTH LOGIN dXNlcg==")
    line = buf.getvalue()
    assert "sekrit" not in line and "dXNlcg==" not in line
    assert json.loads(line)["event"] == "relay.configured"


def test_timestamp_is_iso_utc_with_microseconds() -> None:
    import re

    ev = dict(add_timestamp(None, "info", {}))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ev["timestamp"])


def test_s2_12_dsn_passwords_with_at_colon_or_slash_are_fully_redacted() -> None:
    """Before: the pattern stopped at the first '@': `redis://:***@ss@h:6379/0`."""
    for password in ("p@ss", "R3dis@PW@q1", "pa:ss@x", "a/b@c", "a/b:c@d"):
        for user, host in (("", "127.0.0.1:6391/2"), ("user", "mail.example.com:587")):
            dsn = f"redis://{user}:{password}@{host}"
            ev = redact_secrets(None, "info", {"detail": f"cannot connect to {dsn} (refused)"})
            assert ev["detail"] == f"cannot connect to redis://{user}:***@{host} (refused)"
    ev = redact_secrets(None, "info", {"text": "no URL here, mail a@b.c"})
    assert ev["text"] == "no URL here, mail a@b.c"
