"""TLS and AUTH: verification on by default (``smtp+starttls://``, ``smtps://``), no
clear-text fallback there, no clear-text secrets. The levels of ``tls=`` (and ``smtp://``'s
opportunistic default) are in test_tls_levels.py."""

from __future__ import annotations

import base64
import io
import json
import smtplib
import ssl
from collections.abc import Callable

import pytest
import structlog
from structlog.testing import capture_logs

from mailworker.logging import configure_logging
from mailworker.smtp import CleartextAuthRefused, Connection, Pool, Stage, failure_of
from mailworker.testing import Fault, SMTPTestServer

from .helpers import envelope, relay_for, verbs

MakeServer = Callable[..., SMTPTestServer]
PASSWORD = "s3cret-Pa55word"


def test_starttls_with_a_trusted_ca(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    conn = Connection(relay_for(server))  # smtp+starttls:// with the server's CA
    conn.open()
    assert conn.encrypted
    conn.send(envelope(1))
    [msg] = server.wait_for_messages(1)
    assert msg.tls
    assert verbs(server)[:3] == ["EHLO", "STARTTLS", "EHLO"]
    conn.close()


@pytest.mark.parametrize("options", [{"scheme": "smtp+starttls"},
                                     {"scheme": "smtp", "tls": "verify"}])
def test_untrusted_certificate_fails_and_never_falls_back(make_server: MakeServer,
                                                          options: dict[str, str]) -> None:
    server = make_server(tls="starttls")
    conn = Connection(relay_for(server, ca_file="", **options))
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        conn.open()
    assert failure_of(info.value).stage is Stage.TLS
    assert conn.is_closed
    assert "MAIL" not in verbs(server) and "AUTH" not in verbs(server)
    assert verbs(server) == ["EHLO", "STARTTLS"]


def test_verify_false_accepts_an_untrusted_certificate(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    conn = Connection(relay_for(server, ca_file="", verify=False))
    conn.open()
    assert conn.encrypted and conn.send(envelope(2)).accepted
    conn.close()


def test_required_starttls_not_offered(server: SMTPTestServer) -> None:
    conn = Connection(relay_for(server, scheme="smtp+starttls"))
    with pytest.raises(smtplib.SMTPNotSupportedError, match="STARTTLS") as info:
        conn.open()
    assert failure_of(info.value).stage is Stage.TLS
    assert verbs(server) == ["EHLO"]


def test_starttls_optional_stays_clear_when_not_offered(server: SMTPTestServer) -> None:
    conn = Connection(relay_for(server, scheme="smtp"))
    conn.open()
    assert not conn.encrypted and conn.send(envelope(3)).accepted
    conn.close()


def test_implicit_tls(make_server: MakeServer) -> None:
    server = make_server(tls="implicit")
    conn = Connection(relay_for(server))  # smtps://
    conn.open()
    assert conn.encrypted and conn.send(envelope(4)).accepted
    assert server.wait_for_messages(1)[0].tls
    conn.close()


def test_implicit_tls_untrusted(make_server: MakeServer) -> None:
    server = make_server(tls="implicit")
    with pytest.raises(ssl.SSLError) as info:
        Connection(relay_for(server, ca_file="")).open()
    assert failure_of(info.value).stage is Stage.TLS
    assert server.commands == []


def test_auth_over_tls(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD}, require_auth=True)
    conn = Connection(relay_for(server, user="alice", password=PASSWORD))
    conn.open()
    conn.send(envelope(5))
    assert server.wait_for_messages(1)[0].user == "alice"
    conn.close()


def test_wrong_password(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    conn = Connection(relay_for(server, user="alice", password="wrong"))
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        conn.open()
    assert info.value.smtp_code == 535 and failure_of(info.value).stage is Stage.AUTH
    assert conn.is_closed


def test_auth_over_clear_text_is_refused_without_sending_anything(
        make_server: MakeServer) -> None:
    server = make_server(auth={"alice": PASSWORD})
    conn = Connection(relay_for(server, user="alice", password=PASSWORD))
    with pytest.raises(CleartextAuthRefused, match="allow_plain_auth") as info:
        conn.open()
    assert failure_of(info.value).stage is Stage.AUTH
    assert not isinstance(info.value, smtplib.SMTPResponseException)  # not a server reply
    assert "AUTH" not in verbs(server) and conn.is_closed


def test_auth_over_clear_text_when_the_relay_allows_it(make_server: MakeServer) -> None:
    server = make_server(auth={"alice": PASSWORD}, require_auth=True)
    conn = Connection(relay_for(server, user="alice", password=PASSWORD,
                                allow_plain_auth=True))
    conn.open()
    assert not conn.encrypted and conn.send(envelope(6)).accepted
    assert "AUTH" in verbs(server)
    conn.close()


def _secrets() -> list[str]:
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    login = base64.b64encode(PASSWORD.encode()).decode()
    return [PASSWORD, plain, login]


def test_no_password_or_auth_payload_in_any_log_event(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    with capture_logs() as events:
        conn = Connection(relay_for(server, user="alice", password=PASSWORD))
        conn.open()
        conn.send(envelope(7))
        conn.close()
    replies = [e for e in events if e["event"] == "smtp.reply"]
    auth = [e for e in replies if e["command"].startswith("AUTH")]
    assert auth and all(e["command"] in ("AUTH PLAIN ***", "AUTH LOGIN ***", "AUTH ***")
                        for e in auth)
    assert {e["code"] for e in auth} == {235} or 334 in {e["code"] for e in auth}
    dump = repr(events)
    for secret in _secrets():
        assert secret not in dump


def test_failed_login_does_not_log_secrets_either(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": "other"})
    with capture_logs() as events, pytest.raises(smtplib.SMTPAuthenticationError):
        Connection(relay_for(server, user="alice", password=PASSWORD)).open()
    dump = repr(events)
    assert all(secret not in dump for secret in _secrets())


@pytest.mark.parametrize("echo", ["password", "payload"])
def test_a_server_echoing_the_credentials_is_not_logged(make_server: MakeServer,
                                                         echo: str) -> None:
    # A password of plain words: no base64-looking run for the AUTH-dialogue scrub to catch.
    words = "correct horse battery staple"
    plain = base64.b64encode(f"\0alice\0{words}".encode()).decode()
    server = make_server(tls="starttls", auth={"alice": words})
    server.add_fault(Fault.reply("AUTH", 535, "5.7.8 bad credentials "
                                 + (words if echo == "password" else plain)))
    with capture_logs() as events, pytest.raises(smtplib.SMTPAuthenticationError) as info:
        Connection(relay_for(server, user="alice", password=words)).open()
    replies = [e for e in events if e["event"] == "smtp.reply" and e["code"] == 535]
    assert replies and "bad credentials" in replies[0]["text"]
    assert words not in repr(events) and plain not in repr(events)
    # The exception's text is stored in the record and logged by delivery: clean too.
    said = f"{info.value} {failure_of(info.value).text}"
    assert "bad credentials" in said and words not in said and plain not in said


def test_reply_events_carry_context_through_the_production_pipeline(
        make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    out = io.StringIO()
    configure_logging(fmt="json", level="INFO", stream=out)
    structlog.contextvars.bind_contextvars(task_id="task-1", attempt=2)
    conn = Connection(relay_for(server, name="primary", user="alice", password=PASSWORD))
    conn.open()
    conn.send(envelope(8, ("a@example.test", "b@example.test")))
    conn.close()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    replies = [e for e in events if e["event"] == "smtp.reply"]

    assert {e["event"] for e in events} >= {"smtp.reply", "smtp.connect", "smtp.close"}
    assert all(e["task_id"] == "task-1" and e["attempt"] == 2 and e["relay"] == "primary"
               and e["conn_id"] == conn.conn_id for e in replies)
    commands = [e["command"] for e in replies]
    assert commands[0] == "<greeting>" and "STARTTLS" in commands and commands[-1] == "QUIT"
    rcpt = [e for e in replies if e["command"].startswith("RCPT")]
    assert [e["recipient"] for e in rcpt] == ["a@example.test", "b@example.test"]
    assert all(e["message_id"] == "m8" for e in rcpt)
    dot = next(e for e in replies if e["command"] == "<dot>")
    assert dot["code"] == 250 and dot["enhanced_code"] == "2.0.0" and dot["latency_ms"] >= 0
    assert all(secret not in out.getvalue() for secret in _secrets())


def test_auth_login_continuations_are_redacted_too(make_server: MakeServer) -> None:
    # smtplib picks PLAIN when offered; drive LOGIN (user and password each in a
    # continuation line) through the same redacting writer.
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    conn = Connection(relay_for(server))
    conn.open()
    client = conn._client
    assert client is not None
    with capture_logs() as events:
        client.user, client.password = "alice", PASSWORD
        client._secret = True
        try:
            code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        finally:
            client._secret = False
    assert code == 235
    commands = [e["command"] for e in events if e["event"] == "smtp.reply"]
    assert commands == ["AUTH LOGIN", "AUTH ***", "AUTH ***"]
    assert all(secret not in repr(events) for secret in _secrets())
    conn.close()


def test_pooled_tls_connections_are_reused(make_server: MakeServer) -> None:
    # An idle TLS socket must not look "readable" (stale) just because of TLS records.
    for tls in ("starttls", "implicit"):
        server = make_server(tls=tls, auth={"alice": PASSWORD})
        pool = Pool(relay_for(server, user="alice", password=PASSWORD))
        for i in range(3):
            pool.send(envelope(i))
        assert server.connections_opened == 1 and pool.stats().discarded_stale == 0
        pool.close()
