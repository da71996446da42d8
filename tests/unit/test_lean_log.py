"""The lean JSON path of the reply log writes what structlog's chain would, secrets redacted."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from mailworker.logging import configure_logging, fast_info
from mailworker.smtp.replylog import ReplyLog


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _events(buf: io.StringIO) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in buf.getvalue().splitlines()]
    for e in out:
        assert e.pop("timestamp")
    return out


def _both(**kw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same replies through the lean path and through structlog's chain."""
    t = time.time()
    got = []
    for lean in (True, False):
        buf = io.StringIO()
        configure_logging(fmt="json", level="INFO", stream=buf)
        log = ReplyLog("primary", "c1") if lean else ReplyLog(
            "primary", "c1", structlog.get_logger("mailworker.smtp"))
        log.reply("RCPT TO:<a@example.test>", 250, "2.1.5 Ok", t, t + 0.0012,
                  message_id="m1", recipient="a@example.test")
        log.reply("AUTH PLAIN AHVzZXIAc2Vrcml0", 235, "2.7.0 Authentication successful",
                  t, t)
        log.reply("<dot>", 451, "4.3.0 see smtp://u:sekrit@relay.example:25 now", t, t, **kw)
        got.append(_events(buf))
    return got[0], got[1]


def test_lean_events_equal_structlog_chain_with_context_and_redaction() -> None:
    structlog.contextvars.bind_contextvars(task_id="t-1", attempt=2, api_key="k-123")
    lean, chain = _both(message_id="m2")
    assert lean == chain
    rcpt, auth, dot = lean
    assert rcpt == {"relay": "primary", "conn_id": "c1", "command": "RCPT TO:<a@example.test>",
                    "code": 250, "enhanced_code": "2.1.5", "text": "2.1.5 Ok",
                    "latency_ms": 1.2, "message_id": "m1", "recipient": "a@example.test",
                    "event": "smtp.reply", "task_id": "t-1", "attempt": 2, "api_key": "***",
                    "level": "info"}
    assert auth["command"] == "AUTH PLAIN ***"
    assert dot["text"] == "4.3.0 see smtp://u:***@relay.example:25 now"
    assert "sekrit" not in json.dumps(lean) and "k-123" not in json.dumps(lean)


def test_capture_logs_and_other_configurations_bypass_the_lean_path() -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=buf)
    log = ReplyLog("primary", "c1")
    with capture_logs() as events:
        log.reply("MAIL FROM:<a@b.test>", 250, "2.1.0 Ok", 0.0, 0.0)
    assert [e["event"] for e in events] == ["smtp.reply"] and buf.getvalue() == ""
    log.reply("MAIL FROM:<a@b.test>", 250, "2.1.0 Ok", 0.0, 0.0)  # restored: lean again
    assert _events(buf)[0]["command"] == "MAIL FROM:<a@b.test>"
    configure_logging(fmt="console", level="INFO", stream=io.StringIO())
    assert not fast_info("x", {})
    configure_logging(fmt="json", level="WARNING", stream=io.StringIO())
    assert not fast_info("x", {})


def test_lines_from_many_threads_stay_whole(tmp_path: Any) -> None:
    import threading

    path = tmp_path / "log.json"
    with path.open("w") as stream:
        configure_logging(fmt="json", level="INFO", stream=stream)

        def emit(n: int) -> None:
            log = ReplyLog("primary", f"c{n}")
            for i in range(300):
                log.reply("RCPT TO:<a@example.test>", 250, "2.1.5 Ok " + "x" * 200, 0.0, 0.0,
                          message_id=f"m{n}-{i}")

        threads = [threading.Thread(target=emit, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    assert {json.loads(line)["message_id"] for line in lines} == {
        f"m{n}-{i}" for n in range(4) for i in range(300)}
