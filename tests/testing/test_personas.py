"""Provider personas of the test server (issue 9 item 8): a connection cap, a rate cap,
an outage that comes back on the same port, and dropping after the final dot. Driven by
plain smtplib so that each limit is checked on the wire, not through mailworker."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from mailworker.testing import Fault, Persona, SMTPTestServer, wait_until


def message(mid: str) -> bytes:
    return f"Message-ID: <{mid}>\r\nSubject: test\r\n\r\nhello\r\n".encode()


def connect(server: SMTPTestServer) -> smtplib.SMTP:
    client = smtplib.SMTP(server.host, server.port, timeout=5)
    client.ehlo("client.test")
    return client


@pytest.fixture
def server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer() as running:
        yield running


# -- connection cap -------------------------------------------------------------------

def test_connection_cap_refuses_beyond_n_at_the_greeting(server: SMTPTestServer) -> None:
    server.set_persona(Persona(max_connections=2))
    first, second = connect(server), connect(server)
    with pytest.raises(smtplib.SMTPConnectError) as info:
        connect(server)
    assert info.value.smtp_code == 421 and b"4.7.0 too many connections" in info.value.smtp_error
    assert server.refusals["connection_cap"] == 1
    # The refused connection took no place: once one closes, a new one is admitted.
    first.quit()
    wait_until(lambda: server.active_connections == 1, 5)
    third = connect(server)
    assert third.noop()[0] == 250 and second.noop()[0] == 250
    for client in (second, third):
        client.quit()


def test_connection_cap_from_the_constructor_and_a_custom_reply() -> None:
    persona = Persona(max_connections=1, connection_reply="421 4.7.0 one at a time")
    with SMTPTestServer(persona=persona) as server:
        assert server.persona is persona
        held = connect(server)
        with pytest.raises(smtplib.SMTPConnectError, match="one at a time"):
            connect(server)
        held.quit()


# -- rate cap -------------------------------------------------------------------------

def test_rate_cap_at_mail(server: SMTPTestServer) -> None:
    server.set_persona(Persona(rate=5))
    client = connect(server)
    started = time.monotonic()
    replies = []
    for _ in range(12):
        replies.append(client.mail("a@example.test"))
        client.rset()
    elapsed = time.monotonic() - started
    codes = [code for code, _ in replies]
    assert codes[:5] == [250] * 5  # a second's worth to begin with
    assert codes.count(250) <= 5 + 5 * elapsed + 1  # then no more than the rate allows
    assert set(codes) == {250, 451} and server.refusals["rate_cap"] == codes.count(451)
    assert {text for code, text in replies if code == 451} == {
        b"4.7.1 rate limited, slow down"}
    # The bucket refills: MAIL is accepted again within about 1/rate seconds.
    wait_until(lambda: client.rset() and client.mail("a@example.test")[0] == 250, 5,
               message="MAIL accepted again once the bucket refilled")
    client.quit()


def test_rate_cap_after_the_dot_refuses_and_does_not_record(server: SMTPTestServer) -> None:
    server.set_persona(Persona(rate=2, rate_on="DOT", rate_reply="450 4.7.1 slow down"))
    client = connect(server)
    refused = 0
    for i in range(6):
        try:
            client.sendmail("a@example.test", ["b@example.test"], message(f"m{i}@test"))
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 450 and exc.smtp_error == b"4.7.1 slow down"
            refused += 1
    assert refused >= 1 and server.refusals["rate_cap"] == refused
    assert len(server.messages) == 6 - refused  # refused messages are not recorded
    client.quit()


# -- down and up ----------------------------------------------------------------------

def test_down_421_closes_open_connections_and_refuses_new_ones(
        server: SMTPTestServer) -> None:
    held = connect(server)
    server.down()
    assert server.is_down
    assert held.noop()[0] == 421  # unsolicited, as the server went down: read as the reply
    with pytest.raises(smtplib.SMTPServerDisconnected):
        held.noop()  # and the connection is gone
    for _ in range(3):
        with pytest.raises(smtplib.SMTPConnectError) as info:
            connect(server)
        assert info.value.smtp_code == 421
    assert server.refusals["down"] == 3
    times = [t for t, kind in server.refusal_events if kind == "down"]
    assert len(times) == 3 and times == sorted(times)
    port = server.port
    server.up()
    client = connect(server)
    client.sendmail("a@example.test", ["b@example.test"], message("back@test"))
    assert server.port == port and len(server.messages) == 1
    client.quit()


def test_down_close_hangs_up_without_a_byte(server: SMTPTestServer) -> None:
    server.down("close")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        connect(server)
    assert server.refusals["down"] == 1
    server.up()
    connect(server).quit()


def test_down_refuse_closes_the_port_and_comes_back_on_it(server: SMTPTestServer) -> None:
    client = connect(server)
    client.sendmail("a@example.test", ["b@example.test"], message("before@test"))
    client.quit()
    port = server.port
    server.down("refuse")
    with pytest.raises(ConnectionRefusedError):
        connect(server)
    server.up()
    client = connect(server)
    client.sendmail("a@example.test", ["b@example.test"], message("after@test"))
    client.quit()
    assert server.port == port
    assert [m.message_id for m in server.messages] == ["<before@test>", "<after@test>"]


def test_down_rejects_an_unknown_mode(server: SMTPTestServer) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        server.down("sulk")  # type: ignore[arg-type]
    assert not server.is_down


# -- drop after the final dot ---------------------------------------------------------

@pytest.mark.parametrize("how", ["persona", "fault"])
def test_drop_after_dot_records_the_message_unacknowledged(server: SMTPTestServer,
                                                           how: str) -> None:
    if how == "persona":
        server.set_persona(Persona(drop_after_dot=True))
    else:
        server.add_fault(Fault.drop_after_dot())
    for i in range(2):
        client = connect(server)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("a@example.test", ["b@example.test"], message(f"d{i}@test"))
    copies = server.messages
    assert [m.message_id for m in copies] == ["<d0@test>", "<d1@test>"]
    assert not any(m.acknowledged for m in copies) and not server.deliveries()
    if how == "persona":
        assert server.refusals["drop_after_dot"] == 2
    else:
        assert len(server.faults_triggered) == 2


# -- personas combine, validate, and reset ------------------------------------------------

def test_personas_combine_and_reset_keeps_the_persona(server: SMTPTestServer) -> None:
    server.set_persona(Persona(max_connections=1, rate=1))
    client = connect(server)
    with pytest.raises(smtplib.SMTPConnectError):
        connect(server)
    assert client.mail("a@example.test")[0] == 250
    client.rset()
    assert client.mail("a@example.test")[0] == 451
    assert server.refusals == {"connection_cap": 1, "rate_cap": 1}
    server.reset()
    assert not server.refusals and server.persona.max_connections == 1
    client.quit()


@pytest.mark.parametrize(("options", "words"), [
    ({"max_connections": 0}, "max_connections"),
    ({"rate": 0}, "rate must be"),
    ({"rate_on": "RCPT"}, "rate_on"),
    ({"rate_reply": "250 fine"}, "4xx or 5xx"),
    ({"connection_reply": "421"}, None),
])
def test_persona_values_are_checked(options: dict[str, object], words: str | None) -> None:
    if words is None:
        Persona(**options)  # type: ignore[arg-type]  # a bare code is a valid reply
        return
    with pytest.raises(ValueError, match=words):
        Persona(**options)  # type: ignore[arg-type]
