"""Connection: transactions against the fault-injecting test server.

Each fault test asserts three things: what the server recorded, what the client raised
(class, code, stage), and what became of the connection.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailworker.smtp import Connection, DeliveryUncertain, NotAttempted, SendResult, Stage
from mailworker.smtp.errors import failure_of
from mailworker.testing import Fault, SMTPTestServer

from .helpers import envelope, relay_for, verbs

MakeServer = Callable[..., SMTPTestServer]


def connect(server: SMTPTestServer, **options: Any) -> Connection:
    conn = Connection(relay_for(server, **options))
    conn.open()
    return conn


# -- happy paths -------------------------------------------------------------------------


def test_pipelined_send_delivers_and_reports_every_recipient(server: SMTPTestServer) -> None:
    conn = connect(server)
    assert conn.supports_pipelining
    rcpts = ("a@example.test", "b@example.test")
    result = conn.send(envelope(1, rcpts))

    assert [r.recipient for r in result.recipients] == list(rcpts)
    assert all(r.accepted and r.code == 250 and r.stage is Stage.AFTER_DOT
               for r in result.recipients)
    assert result.recipients[0].enhanced_code == "2.0.0"
    assert result.transactions == 1 and result.accepted == result.recipients
    [msg] = server.wait_for_messages(1)
    assert msg.recipients == rcpts and msg.message_id == "<m1@example.test>"
    assert any(o.startswith("SIZE=") for o in msg.mail_options) is False  # no SIZE offered
    assert conn.messages_sent == 1 and not conn.is_closed
    conn.close()
    assert verbs(server)[-1] == "QUIT" and conn.is_closed


def test_line_endings_are_normalised_and_leading_dots_stuffed(server: SMTPTestServer) -> None:
    conn = connect(server)
    body = b"line one\n.starts with a dot\r\n..two dots\rlast line without newline"
    conn.send(envelope(2, body=body))
    [msg] = server.wait_for_messages(1)
    # The server unstuffs: what it stores is the message with CRLF line endings.
    assert msg.data.endswith(
        b"line one\r\n.starts with a dot\r\n..two dots\r\nlast line without newline\r\n")
    conn.close()


def test_non_pipelining_server_gets_one_command_at_a_time(make_server: MakeServer) -> None:
    server = make_server(pipelining=False)
    conn = connect(server)
    assert not conn.supports_pipelining
    result = conn.send(envelope(3, ("a@example.test", "b@example.test")))
    assert len(result.accepted) == 2
    assert verbs(server)[-4:] == ["MAIL", "RCPT", "RCPT", "DATA"]
    assert server.wait_for_messages(1)[0].recipients == ("a@example.test", "b@example.test")
    conn.close()


def test_pipelining_can_be_turned_off_by_the_relay(server: SMTPTestServer) -> None:
    conn = connect(server, pipelining=False)
    assert not conn.supports_pipelining and "pipelining" in conn.capabilities
    assert conn.send(envelope(4)).accepted
    conn.close()


def test_send_many_costs_one_round_trip_per_message(make_server: MakeServer) -> None:
    rtt = 0.05
    server = make_server(latency=rtt)
    conn = connect(server)
    batch = [envelope(i, (f"r{i}@example.test", "x@example.test")) for i in range(8)]
    started = time.monotonic()
    results = conn.send_many(batch)
    elapsed = time.monotonic() - started

    assert all(isinstance(r, SendResult) and len(r.accepted) == 2 for r in results)
    # One round trip per message plus the last dot (9); smtplib would need 5 per message.
    assert elapsed < 8 * 1.6 * rtt, elapsed
    assert verbs(server)[-32:] == ["MAIL", "RCPT", "RCPT", "DATA"] * 8  # no RSET, no NOOP
    assert [m.message_id for m in server.wait_for_messages(8)] == [
        f"<m{i}@example.test>" for i in range(8)]
    assert server.connections_opened == 1 and conn.messages_sent == 8
    conn.close()


# -- per-recipient outcomes and splitting --------------------------------------------------


def test_partial_rcpt_refusal_is_in_the_result(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    conn = connect(server)
    result = conn.send(envelope(5, ("good@example.test", "bad@example.test")))

    good, bad = result.recipients
    assert good.accepted and good.code == 250
    assert not bad.accepted and (bad.code, bad.stage, bad.enhanced_code) == (
        550, Stage.RCPT, "5.1.1")
    assert result.refused == (bad,)
    assert server.wait_for_messages(1)[0].recipients == ("good@example.test",)
    conn.close()


def test_all_recipients_refused_raises_with_the_result(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user"))
    conn = connect(server)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        conn.send(envelope(6, ("a@example.test", "b@example.test")))

    exc = info.value
    assert failure_of(exc).stage is Stage.RCPT and failure_of(exc).relay == "test"
    assert exc.recipients == {"a@example.test": (550, b"5.1.1 No such user"),
                              "b@example.test": (550, b"5.1.1 No such user")}
    assert [r.code for r in failure_of(exc).partial.recipients] == [550, 550]
    assert server.messages == []
    # The connection stays usable; the owed RSET rides in front of the next MAIL.
    server.clear_faults()
    assert conn.send(envelope(7)).accepted
    assert verbs(server)[-5:] == ["DATA", "RSET", "MAIL", "RCPT", "DATA"]
    conn.close()


def test_452_too_many_recipients_splits_into_more_transactions(make_server: MakeServer) -> None:
    server = make_server(max_recipients=2)
    conn = connect(server)
    rcpts = tuple(f"r{i}@example.test" for i in range(5))
    result = conn.send(envelope(8, rcpts))

    assert result.transactions == 3 and len(result.accepted) == 5
    assert [r.recipient for r in result.recipients] == list(rcpts)
    got = server.wait_for_messages(3)
    assert [m.recipients for m in got] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    assert server.connections_opened == 1
    conn.close()


# -- checks made before anything is sent ---------------------------------------------------


def test_message_over_the_advertised_size_is_refused_before_sending(
        make_server: MakeServer) -> None:
    server = make_server(size_limit=1000)
    conn = connect(server)
    assert conn.max_size == 1000
    with pytest.raises(smtplib.SMTPDataError) as info:
        conn.send(envelope(9, body=b"x" * 2000 + b"\r\n"))
    assert info.value.smtp_code == 552 and failure_of(info.value).enhanced_code == "5.3.4"
    assert failure_of(info.value).stage is Stage.MAIL
    assert [r.code for r in failure_of(info.value).partial.recipients] == [552]
    assert "MAIL" not in verbs(server)

    conn.send(envelope(10))  # a small one goes, and declares its size
    [msg] = server.wait_for_messages(1)
    assert any(o.startswith("SIZE=") for o in msg.mail_options)
    conn.close()


def test_non_ascii_address_without_smtputf8_is_refused_before_sending(
        make_server: MakeServer) -> None:
    server = make_server(smtputf8=False)
    conn = connect(server)
    with pytest.raises(smtplib.SMTPNotSupportedError, match="SMTPUTF8") as info:
        conn.send(envelope(11, ("jörg@example.test",)))
    assert failure_of(info.value).stage is Stage.MAIL
    assert "MAIL" not in verbs(server) and not conn.is_closed
    conn.close()


def test_non_ascii_address_uses_smtputf8(server: SMTPTestServer) -> None:
    conn = connect(server)
    conn.send(envelope(12, ("jörg@example.test",), body="Grüße\r\n".encode()))
    [msg] = server.wait_for_messages(1)
    assert msg.recipients == ("jörg@example.test",)
    assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(msg.mail_options)
    conn.close()


# -- refusals at each stage ---------------------------------------------------------------


@pytest.mark.parametrize(("on", "code", "exc_type", "stage"), [
    ("MAIL", 451, smtplib.SMTPSenderRefused, Stage.MAIL),
    ("MAIL", 553, smtplib.SMTPSenderRefused, Stage.MAIL),
    ("RCPT", 450, smtplib.SMTPRecipientsRefused, Stage.RCPT),
    ("DATA", 451, smtplib.SMTPDataError, Stage.DATA),
    ("DATA", 554, smtplib.SMTPDataError, Stage.DATA),
    ("DOT", 451, smtplib.SMTPDataError, Stage.AFTER_DOT),
    ("DOT", 554, smtplib.SMTPDataError, Stage.AFTER_DOT),
])
@pytest.mark.parametrize("pipelining", [True, False])
def test_refusal_at_each_stage(make_server: MakeServer, on: str, code: int,
                               exc_type: type[Exception], stage: Stage, pipelining: bool) -> None:
    server = make_server(pipelining=pipelining)
    enhanced = f"{code // 100}.7.1"
    server.add_fault(Fault.reply(on, code, f"{enhanced} refused by test", times=1))
    conn = connect(server)
    with pytest.raises(exc_type) as info:
        conn.send(envelope(13))
    exc = info.value
    assert failure_of(exc).stage is stage and failure_of(exc).enhanced_code == enhanced
    result = failure_of(exc).partial
    assert [(r.code, r.stage) for r in result.recipients] == [(code, stage)]
    assert server.messages == []
    # Still in step: the next message on the same connection goes through.
    assert conn.send(envelope(14)).accepted
    assert server.wait_for_messages(1)[0].message_id == "<m14@example.test>"
    assert server.connections_opened == 1
    conn.close()


def test_421_greeting(server: SMTPTestServer) -> None:
    server.add_fault(Fault.greeting(code=421))
    conn = Connection(relay_for(server))
    with pytest.raises(smtplib.SMTPConnectError) as info:
        conn.open()
    assert info.value.smtp_code == 421 and failure_of(info.value).stage is Stage.GREETING
    assert conn.is_closed and server.commands == []


@pytest.mark.parametrize(("on", "exc_type", "stage"), [
    ("MAIL", smtplib.SMTPSenderRefused, Stage.MAIL),
    ("RCPT", smtplib.SMTPRecipientsRefused, Stage.RCPT),
    ("DATA", smtplib.SMTPDataError, Stage.DATA),
    ("DOT", smtplib.SMTPDataError, Stage.AFTER_DOT),
])
def test_421_mid_session_closes_the_connection(server: SMTPTestServer, on: str,
                                               exc_type: type[Exception], stage: Stage) -> None:
    server.add_fault(Fault.disconnect(on, code=421))
    conn = connect(server)
    with pytest.raises(exc_type) as info:
        conn.send(envelope(15))
    exc = info.value
    assert failure_of(exc).stage is stage
    assert [r.code for r in failure_of(exc).partial.recipients] == [421]
    assert conn.is_closed and server.messages == []


# -- lost connections ---------------------------------------------------------------------


def test_drop_during_data_of_a_large_message_is_a_clean_failure(server: SMTPTestServer) -> None:
    server.add_fault(Fault.drop_during_data())
    conn = connect(server)
    big = b"y" * 998 + b"\r\n"
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        conn.send(envelope(16, body=big * 16_000))  # 16 MB: more than the socket buffers
    assert not isinstance(info.value, DeliveryUncertain)
    assert failure_of(info.value).stage is Stage.DATA
    assert conn.is_closed and server.messages == []


def test_drop_during_data_of_a_small_message_is_uncertain(server: SMTPTestServer) -> None:
    # The whole message and its dot left in one write before the server hung up; the
    # client cannot tell that from a hang-up after the dot, so it must not claim either.
    server.add_fault(Fault.drop_during_data())
    conn = connect(server)
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        conn.send(envelope(17))
    assert failure_of(info.value).stage in (Stage.DATA, Stage.AFTER_DOT)
    assert conn.is_closed and server.messages == []


def test_drop_after_dot_is_delivery_uncertain(server: SMTPTestServer) -> None:
    server.add_fault(Fault.drop_after_dot())
    conn = connect(server)
    with pytest.raises(DeliveryUncertain) as info:
        conn.send(envelope(18))
    exc = info.value
    assert failure_of(exc).stage is Stage.AFTER_DOT and failure_of(exc).possible_duplicate
    assert [r.code for r in failure_of(exc).partial.recipients] == [None]
    [msg] = server.wait_for_messages(1)
    assert not msg.acknowledged and conn.is_closed


def test_deadline_exceeded_waiting_after_the_dot(make_server: MakeServer) -> None:
    server = make_server(latency=0.02)
    server.add_fault(Fault.delay("DOT", 2.0))
    conn = connect(server, deadline=0.4)
    started = time.monotonic()
    with pytest.raises(DeliveryUncertain, match="deadline"):
        conn.send(envelope(19))
    assert time.monotonic() - started < 1.5
    assert conn.is_closed


def test_socket_timeout_before_the_dot(server: SMTPTestServer) -> None:
    server.add_fault(Fault.delay("RCPT", 2.0))
    conn = connect(server, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected) as info:
        conn.send(envelope(20))
    assert not isinstance(info.value, DeliveryUncertain)
    assert failure_of(info.value).stage is Stage.RCPT
    assert isinstance(info.value.__cause__, TimeoutError)
    assert time.monotonic() - started < 1.5 and conn.is_closed and server.messages == []


# -- the batch contract -------------------------------------------------------------------


def test_send_many_keeps_going_after_a_refused_message(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    conn = connect(server)
    batch = [envelope(21), envelope(22, ("bad@example.test",)), envelope(23)]
    first, second, third = conn.send_many(batch)

    assert isinstance(first, SendResult) and isinstance(third, SendResult)
    assert isinstance(second, smtplib.SMTPRecipientsRefused)
    assert [m.message_id for m in server.wait_for_messages(2)] == [
        "<m21@example.test>", "<m23@example.test>"]
    assert verbs(server)[1:] == ["MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA",
                                 "RSET", "MAIL", "RCPT", "DATA"]
    assert conn.messages_sent == 2 and not conn.is_closed
    conn.close()


def test_send_many_after_a_lost_connection_marks_the_rest_not_attempted(
        server: SMTPTestServer) -> None:
    server.add_fault(Fault.drop_after_dot(match="r1@"))
    conn = connect(server)
    batch = [envelope(i, (f"r{i}@example.test",)) for i in range(4)]
    results = conn.send_many(batch)

    assert isinstance(results[0], SendResult)
    assert isinstance(results[1], DeliveryUncertain)
    assert failure_of(results[1]).stage is Stage.AFTER_DOT
    for later in results[2:]:
        assert isinstance(later, NotAttempted) and not later.possible_duplicate
        assert failure_of(later).stage is Stage.MAIL
        assert [r.code for r in failure_of(later).partial.recipients] == [None]
    assert [m.message_id for m in server.wait_for_messages(2)] == [
        "<m0@example.test>", "<m1@example.test>"]
    assert conn.is_closed
    # A closed connection does not pretend: everything is NotAttempted.
    assert all(isinstance(r, NotAttempted) for r in conn.send_many(batch))


def test_bad_envelopes_are_refused_when_made() -> None:
    with pytest.raises(ValueError, match="CR"):
        envelope(24, ("a@example.test\r\nRCPT TO:<evil@example.test>",))
    with pytest.raises(ValueError, match="recipient"):
        envelope(25, ())
    assert envelope(26, ("<a@example.test>",)).recipients == ("a@example.test",)


class _BrokenLog:
    """A logger whose every event fails, as a closed stream or a full disk makes it."""

    def bind(self, **_: object) -> _BrokenLog:
        return self

    def info(self, *_: object, **__: object) -> None:
        raise ValueError("I/O operation on closed file")

    warning = info


def test_a_log_that_cannot_be_written_never_fails_a_delivery(server: SMTPTestServer) -> None:
    """The reply was read and decides its message: a failing log must not turn answered
    messages into failures (uncertain ones, sent again)."""
    conn = Connection(relay_for(server), logger=_BrokenLog())
    conn.open()
    results = conn.send_many([envelope(i) for i in range(3)])
    conn.close()
    assert all(not isinstance(r, BaseException) and r.accepted for r in results), results
    assert len(server.wait_for_messages(3)) == 3
