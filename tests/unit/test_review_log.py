"""Review of the lean log path (R3): it writes what structlog's chain writes, and neither
lets a password or an AUTH payload into a line, whatever shape the event has."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    if not (lean and fast_info("e", dict(event))):  # as ReplyLog.reply falls back
        structlog.get_logger("x").info("e", **event)
    return buf.getvalue()


def test_the_lean_path_takes_plain_events() -> None:
    structlog.contextvars.bind_contextvars(task_id="t")
    configure_logging(fmt="json", level="INFO", stream=io.StringIO())
    assert fast_info("e", {"a": [1, {"password": "x"}], "b": b"smtp://u:p@h"})


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


def _bound_then_both(ctx: dict[str, Any], event: dict[str, Any]) -> tuple[str, str]:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**ctx)
    got = []
    for lean in (True, False):
        try:
            got.append(_line(lean, event))
        except Exception as exc:  # both paths must fail alike (e.g. an int beyond 64 bits)
            got.append(f"raised {type(exc).__name__}")
    return got[0], got[1]


def test_context_variables_in_the_order_the_chain_writes_them() -> None:
    lean, chain = _bound_then_both(
        {"zeta": 1, "alpha": 2, "mid": 3, "task_id": "t", "attempt": 1}, {"a": 1})
    assert lean == chain


_keys = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["password", "smtp_pass", "Api_Key", "token", "command", "url", "text"]),
).filter(lambda k: k not in ("event", "exc_info"))
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["smtp://u:" + SECRET + "@h:25", " AUTH PLAIN x", "a\nb\r\x00\u2028\x85é",
                     "x[1]", "{", "://", "AUTH LOGIN " + SECRET, "plain-" + SECRET]),
    st.binary(max_size=12), st.datetimes(), st.builds(ValueError, st.text(max_size=20)),
    st.builds(_Str, st.text(max_size=10)))
_values = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.tuples(inner), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ctx=st.dictionaries(_keys, _values, max_size=4),
       event=st.dictionaries(_keys, _values, max_size=6))
def test_lean_line_is_the_chain_line_for_any_event(ctx: dict[str, Any],
                                                    event: dict[str, Any]) -> None:
    lean, chain = _bound_then_both(ctx, event)
    assert lean == chain
    if not lean.startswith("raised"):
        assert lean.endswith("\n") and lean.count("\n") == 1 and "\r" not in lean
        _no_secret_in(json.loads(lean))


def _no_secret_in(obj: Any) -> None:
    """Secret-looking keys blank at every depth; no URL password; no AUTH payload."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if mwlog._SECRET_KEYS.search(key):
                assert value == "***", (key, value)
            elif key == "command" and isinstance(value, str) and "AUTH" in value.upper():
                assert SECRET not in value
            _no_secret_in(value)
    elif isinstance(obj, list):
        for value in obj:
            _no_secret_in(value)
    elif isinstance(obj, str):
        assert ":" + SECRET + "@" not in obj


@pytest.mark.parametrize("value", [False, True, ValueError("boom")])
def test_exc_info_in_the_context_renders_as_the_chain_does(value: Any) -> None:
    try:
        raise KeyError("the current exception")
    except KeyError:
        lean, chain = _bound_then_both({"exc_info": value}, {"a": 1})
    assert lean == chain


@pytest.mark.parametrize("lean", [True, False])
def test_a_forked_child_logs_while_a_parent_thread_held_the_write_lock(
        lean: bool, tmp_path: Any) -> None:
    """Prefork: Celery forks children while other threads of the parent may be writing a
    line; a child inherits the file's write lock held by a thread it does not have."""
    import os
    import signal
    import threading

    from structlog._output import _get_lock_for_file

    from mailworker.testing.polling import wait_until

    path = tmp_path / "log.json"
    with path.open("w") as stream:
        configure_logging(fmt="json", level="INFO", stream=stream)
        lock = _get_lock_for_file(stream)
        held, done = threading.Event(), threading.Event()

        def hold() -> None:
            with lock:
                held.set()
                done.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: log one line, or be killed by the alarm
            signal.alarm(5)
            try:
                log = ReplyLog("r", "c") if lean else ReplyLog(
                    "r", "c", structlog.get_logger("m"))
                log.reply("NOOP", 250, "2.0.0 Ok", 0.0, 0.0)
            finally:
                os._exit(0)
        status: list[int] = []

        def child_exited() -> bool:
            got, st_ = os.waitpid(pid, os.WNOHANG)
            if got:
                status.append(st_)
            return bool(got)

        try:
            wait_until(child_exited, timeout=15)
        finally:
            done.set()
            t.join()
            if not status:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    assert os.WIFEXITED(status[0]) and os.WEXITSTATUS(status[0]) == 0, status
    assert '"command":"NOOP"' in path.read_text()


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
@pytest.mark.parametrize("lean", [True, False])
def test_metrics_hook_sees_every_reply_logged_or_not(
        level: str, lean: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers skip reply() when ``enabled`` is False; a hook installed after a
    connection's log was made (metrics enabled later) must still see its replies."""
    buf = io.StringIO()
    configure_logging(fmt="json", level=level, stream=buf)
    monkeypatch.setattr(ReplyLog, "on_reply", None)
    log = ReplyLog("r", "c") if lean else ReplyLog("r", "c", structlog.get_logger("m"))
    seen: list[tuple[str, str, int]] = []
    monkeypatch.setattr(ReplyLog, "on_reply", lambda *a: seen.append(a))
    for command in ("MAIL FROM:<a@b.test>", "AUTH PLAIN aHVudGVyMlpx"):
        if log.enabled:  # as Wire.getreply and the pipelined session call it
            log.reply(command, 250, "ok", 0.0, 0.0)
    assert [(r, c) for r, _, c in seen] == [("r", 250), ("r", 250)]
    assert (buf.getvalue().count("\n") == 2) == (level == "INFO")
    assert "aHVudGVyMlpx" not in buf.getvalue()


PLAIN = "AGFsaWNlAGh1bnRlcjJacQ=="  # base64 of "\0alice\0hunter2Zq"


@pytest.mark.parametrize("lean", [True, False])
def test_a_reply_echoing_the_credentials_is_redacted(lean: bool) -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=buf)
    log = ReplyLog("r", "c") if lean else ReplyLog("r", "c", structlog.get_logger("m"))
    log.hide(SECRET, PLAIN)  # what the connection sends in the AUTH dialogue
    log.reply("AUTH PLAIN ***", 535, f"5.7.8 bad credentials {PLAIN} (password {SECRET})",
              0.0, 0.0)
    log.reply("AUTH ***", 501, "5.5.2 cannot decode aGVsbG8gd29ybGQ9PQ", 0.0, 0.0)
    log.failure("smtp.failed", ValueError(f"(535, b'bad {SECRET}')"))
    out = buf.getvalue()
    assert SECRET not in out and PLAIN not in out and "aGVsbG8gd29ybGQ9PQ" not in out, out
    first = json.loads(out.splitlines()[0])
    assert first["text"] == "5.7.8 bad credentials *** (password ***)"
    assert first["enhanced_code"] == "5.7.8"


def test_auth_dialogue_base64_echo_redacted_without_hide() -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=buf)
    log = ReplyLog("r", "c")
    log.reply("AUTH PLAIN ***", 535, f"5.7.8 Authentication failed: {PLAIN}", 0.0, 0.0)
    log.reply("AUTH LOGIN", 334, "VXNlcm5hbWU6", 0.0, 0.0)  # the server's challenge: kept
    log.reply("MAIL FROM:<a@b.test>", 250, "2.1.0 Ok AGFsaWNl0", 0.0, 0.0)
    texts = [json.loads(line)["text"] for line in buf.getvalue().splitlines()]
    assert texts == ["5.7.8 Authentication failed: ***", "VXNlcm5hbWU6", "2.1.0 Ok AGFsaWNl0"]


@pytest.mark.parametrize("text", [
    "relay smtp://alice@example.com:" + SECRET + "@smtp.example.com:587 refused",
    "see x-very-long-scheme-name-of-some-proxy-layer+smtp://u:" + SECRET + "@h",
    "smtp://u:" + SECRET + "x" * 300 + "@h",
    "redis://127.0.0.1:6379/0?db=1&password=" + SECRET + "&x=1",
    "amqp://u:" + SECRET + "@h/vhost, redis://:" + SECRET + "@r:6379",
])
def test_any_url_password_redacted(text: str) -> None:
    line = _both({"text": text, "nested": [text]})
    assert SECRET not in line, line


def test_any_reconfiguration_sends_events_through_the_chain() -> None:
    import logging

    buf = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=buf)
    other = io.StringIO()
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(other))
    assert not fast_info("e", {})
    configure_logging(fmt="json", level="INFO", stream=buf)
    procs = structlog.get_config()["processors"]
    structlog.configure(processors=list(procs))  # equal, but an application's own list
    assert not fast_info("e", {})
    configure_logging(fmt="json", level="INFO", stream=buf)
    structlog.get_config()["processors"].insert(0, structlog.processors.add_log_level)
    assert not fast_info("e", {})
    configure_logging(fmt="json", level="INFO", stream=buf)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    assert not fast_info("e", {})
    structlog.reset_defaults()
    assert not fast_info("e", {})
    configure_logging(fmt="console", level="INFO", stream=buf)
    assert not fast_info("e", {})
    assert buf.getvalue() == ""
    second = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=second)
    assert fast_info("e", {}) and second.getvalue().count("\n") == 1


@pytest.mark.parametrize("lean", [True, False])
def test_a_closed_stream_fails_alike(lean: bool) -> None:
    buf = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=buf)
    buf.close()
    with pytest.raises(ValueError):
        if not (lean and fast_info("e", {})):
            structlog.get_logger("x").info("e")


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_metrics_hook_never_gets_an_auth_payload(
        level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    configure_logging(fmt="json", level=level, stream=io.StringIO())
    seen: list[str] = []
    monkeypatch.setattr(ReplyLog, "on_reply", lambda relay, command, code: seen.append(command))
    ReplyLog("r", "c").reply(" auth plain aHVudGVyMlpx", 235, "ok", 0.0, 0.0)
    assert seen == ["AUTH PLAIN ***"]


@pytest.mark.parametrize("lean", [True, False])
def test_auth_login_dialogue_in_the_json_log_holds_no_payload(lean: bool) -> None:
    """A real AUTH LOGIN dialogue (the user name and the password each in a base64 line
    after a 334) through the production JSON configuration, lean path or chain."""
    import base64

    from mailworker.relay import parse_relay
    from mailworker.smtp import Connection
    from mailworker.testing import SMTPTestServer

    server = SMTPTestServer(auth={"alice": SECRET})
    server.start()
    try:
        buf = io.StringIO()
        configure_logging(fmt="json", level="INFO", stream=buf)
        if not lean:
            mwlog._lean[0] = None
        relay = parse_relay("t", server.dsn(timeout=5, connect_timeout=5, deadline=10,
                                            allow_plain_auth=True))
        conn = Connection(relay)
        conn.open()
        client = conn._client
        assert client is not None
        client.user, client.password = "alice", SECRET
        client._secret = True
        try:
            code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        finally:
            client._secret = False
        conn.close()
    finally:
        server.stop()
    assert code == 235
    out = buf.getvalue()
    replies = [json.loads(line) for line in out.splitlines()]
    commands = [e["command"] for e in replies if e["event"] == "smtp.reply"]
    assert commands[-4:-1] == ["AUTH LOGIN", "AUTH ***", "AUTH ***"]
    for secret in (SECRET, base64.b64encode(SECRET.encode()).decode(),
                   base64.b64encode(b"alice").decode()):
        assert secret not in out


@pytest.mark.parametrize("command", ["AUTH=PLAIN aHVudGVyMlpx", "AUTHaHVudGVyMlpx",
                                     "auth:aHVudGVyMlpx"])
def test_a_malformed_auth_command_is_redacted_whole(command: str) -> None:
    line = _both({"command": command})
    assert "aHVudGVyMlpx" not in line
    assert mwlog.redact_command("AUTH") == "AUTH" and mwlog.redact_command(" AUTH ") == "AUTH"


@pytest.mark.parametrize("key", ["pwd", "smtp_pwd", "apikey", "ApiKey", "api-key",
                                 "private_key", "authorization", "Authorization"])
def test_more_secret_key_spellings_blanked(key: str) -> None:
    structlog.contextvars.bind_contextvars(**{key: SECRET})
    line = _both({"headers": {key: SECRET}})
    assert SECRET not in line


def test_a_logged_relay_object_holds_no_password() -> None:
    """orjson renders a dataclass field by field, repr=False ones included: a Relay bound
    to the context or passed as a value carried its password into the line (before the
    redaction at depth, 54ddd8b)."""
    from mailworker.relay import parse_relay

    relay = parse_relay("t", f"smtp://alice:{SECRET}@h:25")
    structlog.contextvars.bind_contextvars(current=relay)
    line = _both({"relay": relay, "relays": [relay]})
    assert SECRET not in line and json.loads(line)["relay"]["password"] == "***"
