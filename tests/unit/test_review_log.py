"""Review of the lean log path (R3): it writes what structlog's chain writes, and neither
lets a password or an AUTH payload into a line, whatever shape the event has."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

import mailworker.logging as mwlog
from mailworker.logging import configure_logging, fast_info
from mailworker.smtp.replylog import ReplyLog

SECRET = "hunter2Zq"


@pytest.fixture(autouse=True)
def _reset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(mwlog, "_stamp", lambda: "2026-01-01T00:00:00.000000Z")
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _line(lean: bool, event: dict[str, Any]) -> str:
    """One INFO event through the lean path or through structlog's chain: the line."""
    buf = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=buf)
    if lean:
        assert fast_info("e", dict(event))
    else:
        structlog.get_logger("x").info("e", **event)
    return buf.getvalue()


def _both(event: dict[str, Any]) -> str:
    lean, chain = _line(True, event), _line(False, event)
    assert lean == chain
    assert lean.count("\n") == 1 and lean.endswith("\n")
    return lean


@pytest.mark.parametrize("command", [
    " AUTH PLAIN AHVzZXIAaHVudGVyMlpx", "\tauth login aHVudGVyMlpx", "  Auth Plain aHVudGVyMlpx",
    "AUTH\tPLAIN aHVudGVyMlpx",
])
def test_auth_payload_redacted_with_leading_white_space_in_any_case(command: str) -> None:
    line = _both({"command": command})
    assert "aHVudGVyMlpx" not in line and "AHVzZXIA" not in line
    assert json.loads(line)["command"].endswith(" ***")
    for lean in (True, False):
        buf = io.StringIO()
        configure_logging(fmt="json", level="INFO", stream=buf)
        log = ReplyLog("r", "c") if lean else ReplyLog("r", "c", structlog.get_logger("m"))
        log.reply(command, 334, "", 0.0, 0.0)
        assert "aHVudGVyMlpx" not in buf.getvalue() and "AHVzZXIA" not in buf.getvalue()


class _Str(str):
    """A str subclass (an application's own string type) must not dodge redaction."""


def test_auth_command_of_a_str_subclass_redacted() -> None:
    line = _both({"command": _Str("AUTH PLAIN aHVudGVyMlpx")})
    assert "aHVudGVyMlpx" not in line


@pytest.mark.parametrize("event", [
    {"relay": {"host": "h", "password": SECRET}},
    {"relays": [{"name": "a", "smtp_pass": SECRET}]},
    {"detail": ["see smtp://u:" + SECRET + "@relay.example:25"]},
    {"detail": {"url": "redis://:" + SECRET + "@127.0.0.1:6379/0"}},
    {"detail": b"smtp://u:" + SECRET.encode() + b"@h"},
    {"error": ConnectionError("Error connecting to redis://:" + SECRET + "@h:6379")},
    {"text": _Str("smtp://u:" + SECRET + "@h")},
    {"text": ("smtp://u:" + SECRET + "@h",)},
    {"command": {"command": "AUTH PLAIN " + SECRET}},
])
def test_nested_and_non_str_secrets_redacted(event: dict[str, Any]) -> None:
    line = _both(event)
    assert SECRET not in line
    json.loads(line)


def test_redaction_keeps_everything_else_exact() -> None:
    event = {"a": [1, 2.5, None, True, "x[y]{z}"], "b": {"c": "smtp://u@h", "d": "é\u2028"},
             "url": "smtp://u:" + SECRET + "@h/p", "n": float("nan")}
    line = _both(event)
    assert json.loads(line) == {"a": [1, 2.5, None, True, "x[y]{z}"],
                                "b": {"c": "smtp://u@h", "d": "é\u2028"},
                                "url": "smtp://u:***@h/p", "n": None, "event": "e",
                                "level": "info", "timestamp": "2026-01-01T00:00:00.000000Z"}
