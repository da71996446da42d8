"""TLS levels (``tls=none|may|encrypt|verify``, Postfix's smtp_tls_security_level).

The bug these pin down: ``smtp://`` promised "STARTTLS when offered, plain otherwise",
but against a relay whose certificate came from a private CA it paused the relay and
delivered nothing, while the same relay without STARTTLS got clear-text mail. Now
``smtp://`` is opportunistic (``may``): encrypted, certificate not checked, and a failed
STARTTLS falls back to clear text on a new connection.

Every test runs against the real test server. ``ca_file=""`` drops the server's
throwaway CA, so its certificate is one no client trusts.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from mailworker.relay import InvalidRelayError, parse_relay
from mailworker.smtp import CleartextAuthRefused, Connection, Pool
from mailworker.smtp.tls import UnverifiedAuthRefused
from mailworker.testing import Fault, SMTPTestServer

from .helpers import envelope, relay_for, verbs

MakeServer = Callable[..., SMTPTestServer]
PASSWORD = "s3cret-Pa55word"
#: Answer STARTTLS with 220 and hang up: the client's handshake fails (EOF).
BROKEN_HANDSHAKE = Fault.disconnect("STARTTLS", code=220, text="2.0.0 Ready to start TLS",
                                    times=1)


# -- the relay option ------------------------------------------------------------------

@pytest.mark.parametrize(("dsn", "level", "unverified_auth"), [
    ("smtp://h", "may", False),
    ("smtp+starttls://h", "verify", False),
    ("smtps://h", "verify", False),
    ("smtp://h?tls=none", "none", False),
    ("smtp://h?tls=encrypt", "encrypt", False),
    ("smtp://h?tls=verify", "verify", False),
    ("smtp+starttls://h?tls=encrypt", "encrypt", False),
    ("smtps://h?tls=ENCRYPT", "encrypt", False),
    # verify=false, the older spelling: it always let AUTH go over unverified TLS
    ("smtp+starttls://h?verify=false", "encrypt", True),
    ("smtps://h?verify=false", "encrypt", True),
    ("smtp://h?verify=false", "may", True),
    ("smtp+starttls://h?verify=true&tls=verify", "verify", False),
])
def test_levels_by_scheme_and_option(dsn: str, level: str, unverified_auth: bool) -> None:
    relay = parse_relay("r", dsn)
    assert relay.tls == level and relay.verify == (level == "verify")
    assert relay.allow_unverified_auth is unverified_auth
    assert parse_relay("r", relay.dsn).tls == level  # printed DSN keeps a non-default level


@pytest.mark.parametrize(("dsn", "words"), [
    ("smtp://h?tls=maybe", "none, may, encrypt, verify"),
    ("smtps://h?tls=may", "smtp://...?tls=may"),
    ("smtp+starttls://h?tls=none", "always encrypts"),
    ("smtp+starttls://h?tls=verify&verify=false", "contradicts"),
    ("smtp://h?verify=true", "smtp+starttls://"),
])
def test_contradictions_are_named_at_load(dsn: str, words: str) -> None:
    with pytest.raises(InvalidRelayError, match="relay 'r'") as info:
        parse_relay("r", dsn)
    assert words in str(info.value)


def test_with_options_decides_the_level_afresh() -> None:
    strict = parse_relay("r", "smtp+starttls://h")
    assert strict.with_options(verify=False).tls == "encrypt"
    assert strict.with_options(tls="encrypt").allow_unverified_auth is False
    assert strict.with_options(timeout=5).tls == "verify"
    assert parse_relay("r", "smtp://h").with_options(tls="none").tls == "none"


def test_pool_key_includes_the_level() -> None:
    base = parse_relay("r", "smtp://h")
    keys = {base.with_options(tls=level).key for level in ("none", "may", "encrypt", "verify")}
    assert len(keys) == 4
    assert base.with_options(allow_unverified_auth=True).key != base.key


# -- smtp:// is opportunistic ------------------------------------------------------------

def test_smtp_delivers_encrypted_to_an_unknown_ca(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    conn = Connection(relay_for(server, scheme="smtp", ca_file=""))
    conn.open()
    assert conn.encrypted and not conn.verified and not conn.tls_fallback
    assert conn.send(envelope(1)).accepted
    assert server.wait_for_messages(1)[0].tls
    assert verbs(server)[:3] == ["EHLO", "STARTTLS", "EHLO"]
    conn.close()


def test_smtp_starttls_refuses_the_same_server_and_sends_no_auth(
        make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    conn = Connection(relay_for(server, scheme="smtp+starttls", ca_file="",
                                user="alice", password=PASSWORD))
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.open()
    assert verbs(server) == ["EHLO", "STARTTLS"] and server.messages == []


def test_verify_level_reports_a_verified_certificate(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    conn = Connection(relay_for(server))  # smtp+starttls:// with the server's CA
    conn.open()
    assert conn.encrypted and conn.verified
    conn.close()


@pytest.mark.parametrize("fault", [
    BROKEN_HANDSHAKE,
    Fault.reply("STARTTLS", 454, "4.7.0 TLS not available due to temporary reason", times=1),
], ids=["handshake-fails", "starttls-refused"])
def test_may_falls_back_to_clear_text_on_a_new_connection(
        make_server: MakeServer, fault: Fault) -> None:
    server = make_server(tls="starttls")
    server.add_fault(fault)
    pool = Pool(relay_for(server, "fallback-relay", scheme="smtp", ca_file=""))
    with capture_logs() as events:
        assert pool.send(envelope(2)).accepted
    [msg] = server.wait_for_messages(1)
    assert not msg.tls
    assert server.connections_opened == 2
    by_conn: dict[int, list[str]] = {}
    for cid, line in server.commands:
        by_conn.setdefault(cid, []).append(line.split(" ")[0].split(":")[0].upper())
    tried, plain = (by_conn[c] for c in sorted(by_conn))
    assert tried[:2] == ["EHLO", "STARTTLS"] and "MAIL" not in tried
    assert "STARTTLS" not in plain and "MAIL" in plain
    fallback = [e for e in events if e["event"] == "smtp.tls_fallback"]
    assert len(fallback) == 1 and fallback[0]["log_level"] == "warning"
    assert not [e for e in events if e["event"] == "smtp.connect_failed"]
    stats = pool.stats()
    assert stats.opened == 1 and stats.unencrypted == 1
    assert stats.tls_fallbacks == 1
    pool.close()


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_required_levels_never_fall_back(make_server: MakeServer, level: str) -> None:
    server = make_server(tls="starttls")
    server.add_fault(BROKEN_HANDSHAKE)
    conn = Connection(relay_for(server, scheme="smtp", tls=level))
    with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
        conn.open()
    assert server.connections_opened == 1 and conn.is_closed and not conn.tls_fallback


def test_encrypt_accepts_an_unknown_ca_but_requires_starttls(
        make_server: MakeServer) -> None:
    tls = make_server(tls="starttls")
    conn = Connection(relay_for(tls, scheme="smtp", tls="encrypt", ca_file=""))
    conn.open()
    assert conn.encrypted and not conn.verified and conn.send(envelope(3)).accepted
    conn.close()
    plain = make_server()
    with pytest.raises(smtplib.SMTPNotSupportedError, match="tls=encrypt"):
        Connection(relay_for(plain, scheme="smtp", tls="encrypt")).open()


def test_none_never_sends_starttls(make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    conn = Connection(relay_for(server, scheme="smtp", tls="none"))
    conn.open()
    assert not conn.encrypted and conn.send(envelope(4)).accepted
    assert "STARTTLS" not in verbs(server) and not server.wait_for_messages(1)[0].tls
    conn.close()


# -- AUTH needs a verified certificate unless told otherwise -------------------------------

@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_auth_over_an_unverified_certificate_is_refused(make_server: MakeServer,
                                                        level: str) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    conn = Connection(relay_for(server, scheme="smtp", tls=level, ca_file="",
                                user="alice", password=PASSWORD))
    with pytest.raises(UnverifiedAuthRefused, match="allow_unverified_auth") as info:
        conn.open()
    assert isinstance(info.value, CleartextAuthRefused)  # the policy pauses the relay
    assert not isinstance(info.value, smtplib.SMTPResponseException)  # not a server reply
    assert "AUTH" not in verbs(server) and server.connections_opened == 1  # no fall-back
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("option", ["allow_unverified_auth", "allow_plain_auth", "verify"])
def test_auth_over_an_unverified_certificate_when_allowed(make_server: MakeServer,
                                                          option: str) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD}, require_auth=True)
    value = option != "verify"  # verify=false: the older spelling allowed it
    conn = Connection(relay_for(server, scheme="smtp", ca_file="", user="alice",
                                password=PASSWORD, **{option: value}))
    conn.open()
    assert conn.encrypted and not conn.verified
    conn.send(envelope(5))
    msg = server.wait_for_messages(1)[0]
    assert msg.tls and msg.user == "alice"
    conn.close()


def test_auth_under_may_with_a_trusted_certificate(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD}, require_auth=True)
    conn = Connection(relay_for(server, scheme="smtp", user="alice", password=PASSWORD))
    conn.open()  # the server's CA is trusted (ca_file): verified, so AUTH goes
    assert conn.encrypted and conn.verified
    conn.send(envelope(6))
    assert server.wait_for_messages(1)[0].user == "alice"
    conn.close()


def test_a_fall_back_never_sends_auth_in_clear(make_server: MakeServer) -> None:
    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    server.add_fault(BROKEN_HANDSHAKE)
    conn = Connection(relay_for(server, scheme="smtp", user="alice", password=PASSWORD))
    with pytest.raises(CleartextAuthRefused):
        conn.open()
    assert conn.tls_fallback and "AUTH" not in verbs(server)


def test_check_shows_the_level_and_the_outcome(make_server: MakeServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from mailworker.cli.check import run_check

    server = make_server(tls="starttls")
    assert run_check(server.dsn(scheme="smtp", ca_file="")) == 0
    out = capsys.readouterr().out
    assert "tls level:    may" in out and "encrypted:    yes (STARTTLS)" in out
    assert "verified:     no: not checked" in out
    assert run_check(server.dsn()) == 0  # smtp+starttls:// with the server's CA
    out = capsys.readouterr().out
    assert "tls level:    verify" in out and "verified:     yes" in out


def test_a_starttls_that_hangs_under_may_times_out_then_falls_back(
        make_server: MakeServer) -> None:
    server = make_server(tls="starttls")
    server.add_fault(Fault.hang("STARTTLS", times=1))
    conn = Connection(relay_for(server, scheme="smtp", setup_timeout=0.5))
    with capture_logs() as events:
        conn.open()  # bounded by setup_timeout, then a clear-text session
    assert conn.tls_fallback and not conn.encrypted and conn.send(envelope(7)).accepted
    [fallback] = [e for e in events if e["event"] == "smtp.tls_fallback"]
    assert fallback["error"] == "ReplyTimeout" and "setup_timeout=0.5s" in fallback["detail"]
    conn.close()


def test_check_names_the_unverified_auth_refusal(make_server: MakeServer) -> None:
    from mailworker.cli.check import run_check
    from mailworker.cli.output import CLIError

    server = make_server(tls="starttls", auth={"alice": PASSWORD})
    with pytest.raises(CLIError) as info:
        run_check(server.dsn(scheme="smtp", ca_file="", user="alice", password=PASSWORD))
    assert "failed at auth" in str(info.value) and "UnverifiedAuthRefused" in str(info.value)
    assert info.value.hint is not None and "allow_unverified_auth=true" in info.value.hint
    assert PASSWORD not in str(info.value) and "AUTH" not in verbs(server)
