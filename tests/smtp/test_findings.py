"""Regression tests for the SMTP-layer findings of the second security review.

Each test is named after its finding and fails on the code before the fix: see the
docstrings for what used to happen.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mailworker.cli.check import run_check
from mailworker.cli.output import CLIError
from mailworker.delivery import _batch_failure
from mailworker.policy import Action, Policy, Scope
from mailworker.smtp import (
    CleartextAuthRefused,
    Connection,
    Envelope,
    Pool,
    PoolManager,
    SendResult,
    Stage,
    TLSConfigurationError,
)
from mailworker.smtp.errors import failure_of
from mailworker.testing import SMTPTestServer

from .helpers import envelope, relay_for

MakeServer = Callable[..., SMTPTestServer]


def test_s2_04_the_strict_relay_never_uses_the_lab_relays_connection(
        make_server: MakeServer) -> None:
    """Before: the pool key was (host, port, security, user), so once the lab relay
    (verify=false) had opened a connection, the strict relay's mail rode it."""
    server = make_server(tls="starttls")  # its CA is not in the system store
    strict = relay_for(server, "r", ca_file="")  # ca_file="": drop the test CA; verify on
    lab = relay_for(server, "r", ca_file="", verify=False)
    manager = PoolManager()

    with pytest.raises(ssl.SSLCertVerificationError):
        manager.get(strict).send(envelope(1))
    assert isinstance(manager.get(lab).send(envelope(2)), SendResult)
    with pytest.raises(ssl.SSLCertVerificationError):
        manager.get(strict).send(envelope(3))
    assert [m.message_id for m in server.messages] == ["<m2@example.test>"]
    manager.close_all()


def test_s2_04_pool_key_covers_credentials_without_holding_them(
        make_server: MakeServer) -> None:
    """Before: a relay with a wrong password reused the connection the right password had
    authenticated, and delivered."""
    server = make_server(tls="starttls", auth={"alice": "right"})
    right = relay_for(server, "r", user="alice", password="right")
    wrong = relay_for(server, "r", user="alice", password="wrong")
    assert right.key != wrong.key
    for key in (right.key, wrong.key):
        assert "right" not in repr(key) and "wrong" not in repr(key)
        assert key.credentials not in repr(key)
    manager = PoolManager()
    manager.get(right).send(envelope(1))
    with pytest.raises(smtplib.SMTPAuthenticationError):
        manager.get(wrong).send(envelope(2))
    assert len(server.messages) == 1
    # Everything else that makes a connection different is in the key too.
    for option, value in (("local_hostname", "other.example"), ("allow_plain_auth", True),
                          ("pipelining", False), ("verify", False)):
        assert right.with_options(**{option: value}).key != right.key, option
    assert right.with_options(timeout=5).key == right.key  # not a connection property
    manager.close_all()


def test_s2_09_tls_context_failure_at_send_is_a_tls_configuration_error(
        make_server: MakeServer, tmp_path: Path) -> None:
    """Before: the context was built outside the annotated block, so a vanished ca_file
    was unstaged and the Deliverer treated it as "uncertain after the dot"."""
    server = make_server(tls="starttls")
    ca = tmp_path / "ca.pem"
    assert server.ca_file is not None
    ca.write_bytes(Path(server.ca_file).read_bytes())
    relay = relay_for(server, ca_file=str(ca))  # loads: the file is there and valid
    ca.write_text("not a certificate\n")  # broken after load (the cache is per path)
    with pytest.raises(TLSConfigurationError) as info:
        Pool(relay).send(envelope(1))
    exc = info.value
    assert failure_of(exc).stage is Stage.TLS and str(ca) in str(exc)
    assert _batch_failure(exc, relay.name) is exc  # not turned into DeliveryUncertain
    decision = Policy().decide(failure_of(exc))
    assert (decision.action, decision.scope, decision.possible_duplicate) == (
        Action.PAUSE_RELAY, Scope.RELAY, False)
    assert server.connections_opened == 1 and not server.messages


def test_s2_11_a_non_ascii_password_logs_in_and_is_never_shown(
        make_server: MakeServer) -> None:
    """Before: smtplib encoded AUTH as ASCII: UnicodeEncodeError naming a character of
    the password, on every attempt."""
    password = "pässwörd-€"
    server = make_server(auth={"jürgen": password}, require_auth=True)
    relay = relay_for(server, user="jürgen", password=password, allow_plain_auth=True)
    with capture_logs() as events:
        conn = Connection(relay)
        conn.open()
        # smtplib keeps user and password on the client after login(); we clear them.
        assert password not in repr(vars(conn._client))
        conn.send(envelope(1))
        conn.close()
    assert server.messages[0].user == "jürgen"
    assert password not in repr(events) and "ä" not in repr(events)


def test_s2_11_a_wrong_non_ascii_password_is_an_auth_failure_without_the_secret(
        make_server: MakeServer) -> None:
    server = make_server(auth={"u": "right"})
    relay = relay_for(server, user="u", password="wröng-secret", allow_plain_auth=True)
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        Connection(relay).open()
    assert failure_of(info.value).stage is Stage.AUTH
    assert "wr" not in str(info.value) and "ö" not in str(info.value)
    assert Policy().decide(failure_of(info.value)).action is Action.PAUSE_RELAY


@pytest.mark.parametrize("address", [
    "x y@z.com", "a@ex\u200bample.com", "a\u2028b@c.com", "a\x85b@c.com", "a\x0bb@c.com",
    "a@b.com NOTIFY=NEVER", "a\ufeff@b.com", "a\x7f@b.com",
])
def test_s2_18_envelope_refuses_spaces_separators_and_invisible_characters(
        address: str) -> None:
    """Before: only CR, LF, NUL and <> were refused."""
    with pytest.raises(ValueError, match="invalid envelope address"):
        Envelope("s@example.test", (address,), b"x")
    with pytest.raises(ValueError, match="invalid envelope address"):
        Envelope(address, ("r@example.test",), b"x")
    assert Envelope("", ("jürgen@bücher.example",), b"x").recipients == ("jürgen@bücher.example",)


def test_s2_19_smtp_without_starttls_is_warned_once_and_counted(
        make_server: MakeServer) -> None:
    server = make_server()  # no STARTTLS offered
    pool = Pool(relay_for(server, "plain-relay-s2-19", max_messages=1))
    with capture_logs() as events:
        for i in range(3):
            pool.send(envelope(i))
    warnings = [e for e in events if e["event"] == "smtp.unencrypted"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["relay"] == "plain-relay-s2-19"
    assert pool.stats().unencrypted == 3 == pool.stats().opened
    tls = make_server(tls="starttls")
    tls_pool = Pool(relay_for(tls, "tls-relay-s2-19", scheme="smtp"))
    tls_pool.send(envelope(9))
    assert tls_pool.stats().unencrypted == 0
    pool.close()
    tls_pool.close()


def test_cleartext_auth_refusal_is_ours_not_a_server_530(make_server: MakeServer) -> None:
    """Issue 10: `check` said "530 ..." and hinted at the password; nothing was sent."""
    server = make_server(auth={"u": "p"})
    relay = relay_for(server, user="u", password="p")
    with pytest.raises(CleartextAuthRefused) as info:
        Connection(relay).open()
    assert not isinstance(info.value, smtplib.SMTPResponseException)
    assert failure_of(info.value).stage is Stage.AUTH
    decision = Policy().decide(failure_of(info.value))
    assert (decision.action, decision.scope) == (Action.PAUSE_RELAY, Scope.RELAY)
    with pytest.raises(CLIError) as cli:
        run_check(server.dsn(user="u", password="p"))
    assert "530" not in str(cli.value) and "CleartextAuthRefused" in str(cli.value)
    assert cli.value.hint is not None and "allow_plain_auth" in cli.value.hint
    assert "check the user name and password" not in cli.value.hint
