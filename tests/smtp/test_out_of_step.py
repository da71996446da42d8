"""Replies no sane server sends: the connection is closed, never reused, nothing trusted.

These run against a scripted real peer on a socket (``ScriptedServer``), since the test
server is too well behaved to produce them.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from mailworker.smtp import Connection, Stage, failure_of
from mailworker.testing import wait_until

from .helpers import ScriptedServer, envelope


@pytest.fixture
def scripted() -> Iterator[list[ScriptedServer]]:
    servers: list[ScriptedServer] = []
    yield servers
    for server in servers:
        server.close()


def test_malformed_reply_closes_the_connection(scripted: list[ScriptedServer]) -> None:
    peer = ScriptedServer({"MAIL": b"hello there\r\n"})
    scripted.append(peer)
    conn = Connection(peer.relay())
    conn.open()
    with pytest.raises(smtplib.SMTPServerDisconnected, match="out of step") as info:
        conn.send(envelope(1))
    assert failure_of(info.value).stage is Stage.MAIL
    assert conn.is_closed


def test_unsolicited_reply_is_noticed_before_mail(scripted: list[ScriptedServer]) -> None:
    peer = ScriptedServer(after_ehlo=b"421 4.4.2 idle timeout\r\n")
    scripted.append(peer)
    conn = Connection(peer.relay())
    conn.open()
    wait_until(conn.server_spoke)  # what the pool asks an idle connection, no round trip
    assert conn.has_expired(conn.last_used_at)
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        conn.send(envelope(2))
    assert failure_of(info.value).stage is Stage.MAIL
    assert conn.is_closed
    assert not any(line.startswith("MAIL") for line in peer.received)


def test_plaintext_after_starttls_reply_is_refused(scripted: list[ScriptedServer]) -> None:
    # The classic STARTTLS injection: bytes that arrive with the 220 must not be read as
    # replies after the handshake. We refuse the session before the handshake.
    peer = ScriptedServer({"EHLO": b"250-scripted\r\n250 STARTTLS\r\n",
                           "STARTTLS": b"220 go ahead\r\n250 injected\r\n"})
    scripted.append(peer)
    conn = Connection(peer.relay(tls="encrypt"))  # tls=may would retry in clear text
    with pytest.raises(smtplib.SMTPServerDisconnected, match="STARTTLS") as info:
        conn.open()
    assert failure_of(info.value).stage is Stage.TLS
    assert conn.is_closed


def test_multiline_reply_and_helo_fallback(scripted: list[ScriptedServer]) -> None:
    peer = ScriptedServer({"EHLO": b"502 5.5.1 what?\r\n", "HELO": b"250 scripted\r\n",
                           ".": b"250-2.0.0 queued\r\n250 2.0.0 as X1\r\n"})
    scripted.append(peer)
    conn = Connection(peer.relay())
    conn.open()
    assert not conn.supports_pipelining and conn.capabilities == {}
    result = conn.send(envelope(3))
    assert result.recipients[0].text == "2.0.0 queued\n2.0.0 as X1"
    assert [line.split(" ")[0].split(":")[0].upper() for line in peer.received] == [
        "EHLO", "HELO", "MAIL", "RCPT", "DATA"]
    conn.close()
