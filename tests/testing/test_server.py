"""mailworker.testing.SMTPTestServer, driven by plain smtplib (and raw sockets where the
exact bytes on the wire matter): recording, every fault, TLS, AUTH, limits and latency."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import re
import smtplib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import aiosmtpd.smtp
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from mailworker.relay import parse_relay
from mailworker.testing import Fault, ReceivedMessage, SMTPTestServer, wait_until
from mailworker.testing.content import has_long_line, read_content, unstuff
from mailworker.testing.session import FaultySMTP


def message(mid: str = "m1@test", body: bytes = b"hello\r\n") -> bytes:
    return f"Message-ID: <{mid}>\r\nSubject: test\r\n\r\n".encode() + body


def connect(server: SMTPTestServer, timeout: float = 5.0) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, timeout=timeout)


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read until *count* complete replies (final lines ``NNN <text>``) arrived."""
    buffer = b""
    while True:
        lines = buffer.split(b"\r\n")[:-1]
        finals = [line for line in lines if len(line) >= 4 and line[3:4] == b" "]
        if len(finals) >= count:
            return finals
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {finals!r}")
        buffer += chunk


@pytest.fixture
def server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer() as running:
        yield running


# -- recording --------------------------------------------------------------------------


def test_records_messages_commands_and_connections(server: SMTPTestServer) -> None:
    client = connect(server)
    client.sendmail("a@x.test", ["b@y.test", "c@y.test"], message(body=b".leading dot\r\n"))
    client.sendmail("a@x.test", ["b@y.test"], message("m2@test"))
    client.quit()

    first, second = server.wait_for_messages(2)
    assert first == ReceivedMessage(
        sender="a@x.test", recipients=("b@y.test", "c@y.test"),
        data=message(body=b".leading dot\r\n"), connection_id=1, message_id="<m1@test>",
        acknowledged=True,
    )
    assert second.message_id == "<m2@test>"
    assert server.deliveries() == {
        ("<m1@test>", "b@y.test"): 1, ("<m1@test>", "c@y.test"): 1, ("<m2@test>", "b@y.test"): 1,
    }
    verbs = [line.split(" ")[0] for _, line in server.commands]
    assert verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT"]
    assert server.commands[1] == (1, "MAIL FROM:<a@x.test>")
    assert server.connections_opened == 1
    wait_until(lambda: server.active_connections == 0, 5.0, message="the connection to close")


def test_counts_concurrent_connections_and_gives_each_an_id(server: SMTPTestServer) -> None:
    clients = [connect(server) for _ in range(3)]
    for index, client in enumerate(clients):
        client.sendmail("a@x.test", ["b@y.test"], message(f"m{index}@test"))
    assert server.active_connections == 3
    for client in clients:
        client.quit()
    wait_until(lambda: server.active_connections == 0, 5.0, message="connections to close")
    assert server.connections_opened == 3
    assert server.max_concurrent_connections == 3
    assert sorted(m.connection_id for m in server.messages) == [1, 2, 3]


def test_wait_for_messages_wakes_up_and_times_out(server: SMTPTestServer) -> None:
    def send_later() -> None:
        with connect(server) as client:
            client.sendmail("a@x.test", ["b@y.test"], message())

    sender = threading.Thread(target=send_later)
    sender.start()
    assert len(server.wait_for_messages(1, timeout=5)) == 1
    sender.join()
    with pytest.raises(TimeoutError, match=r"expected 2 messages within 0\.05s, got 1"):
        server.wait_for_messages(2, timeout=0.05)


def test_messages_is_a_snapshot_and_reset_forgets_everything(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    with connect(server) as client:
        client.sendmail("a@x.test", ["b@y.test", "bad@y.test"], message())
    snapshot = server.messages
    snapshot.clear()
    assert len(server.messages) == 1
    server.reset()
    assert (server.messages, server.commands, server.faults_triggered) == ([], [], [])
    assert server.connections_opened == 0
    with connect(server) as client:
        assert client.sendmail("a@x.test", ["bad@y.test"], message()) == {}


def test_ehlo_advertises_the_configured_extensions(server: SMTPTestServer) -> None:
    with connect(server) as client:
        client.ehlo()
        assert {"pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes"} <= set(
            client.esmtp_features
        )
        assert "size" not in client.esmtp_features and "auth" not in client.esmtp_features
        assert b"MAIL" in client.help()
        assert client.docmd("AUTH", "PLAIN AGFAYg==")[0] == 503
    bare = SMTPTestServer(smtputf8=False, pipelining=False, size_limit=1000)
    with bare, connect(bare) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "1000"
        assert not {"pipelining", "smtputf8", "8bitmime"} & set(client.esmtp_features)


def test_smtputf8_addresses_and_options_are_kept(server: SMTPTestServer) -> None:
    with connect(server) as client:
        client.sendmail("ü@x.test", ["ö@y.test"], message(), mail_options=["SMTPUTF8"])
    (received,) = server.messages
    assert (received.sender, received.recipients) == ("ü@x.test", ("ö@y.test",))
    assert "SMTPUTF8" in received.mail_options


def test_many_pipelined_transactions_are_all_recorded(server: SMTPTestServer) -> None:
    per_connection, connections = 300, 3
    socks = [socket.create_connection((server.host, server.port), timeout=10)
             for _ in range(connections)]
    for number, sock in enumerate(socks):
        read_replies(sock, 1)
        batch = [b"EHLO client\r\n"]
        for index in range(per_connection):
            batch.append(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            batch.append(message(f"{number}.{index}@test") + b".\r\n")
        sock.sendall(b"".join([*batch, b"QUIT\r\n"]))
    for sock in socks:
        replies = read_replies(sock, 2 + 4 * per_connection)
        assert sum(r.startswith(b"250 2.0.0") for r in replies) == per_connection
        sock.close()
    assert len(server.wait_for_messages(per_connection * connections)) == 900
    assert len(server.deliveries()) == 900


# -- limits -----------------------------------------------------------------------------


def test_max_recipients_answers_452_beyond_the_limit() -> None:
    with SMTPTestServer(max_recipients=2) as server, connect(server) as client:
        refused = client.sendmail("a@x.test", ["1@y.test", "2@y.test", "3@y.test"], message())
        assert refused == {"3@y.test": (452, b"4.5.3 Too many recipients")}
        # The limit is per transaction.
        assert client.sendmail("a@x.test", ["3@y.test"], message("m2@test")) == {}
    assert [m.recipients for m in server.messages] == [("1@y.test", "2@y.test"), ("3@y.test",)]


def test_size_limit_refuses_mail_size_and_oversized_data() -> None:
    big = message(body=b"x" * 200 + b"\r\n")
    with SMTPTestServer(size_limit=150) as server, connect(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@x.test", ["b@y.test"], big)  # smtplib declares SIZE=
        assert refused.value.smtp_code == 552
        assert refused.value.smtp_error.startswith(b"5.3.4")
        client.rset()
        client.mail("a@x.test")  # no SIZE: found out after the dot
        client.rcpt("b@y.test")
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.sendmail("a@x.test", ["b@y.test"], message()) == {}
    assert len(server.messages) == 1


# -- message content: bulk DATA reading -------------------------------------------------


def dotted_body(size: int) -> bytes:
    """About *size* bytes of lines, many of them starting with one or more dots."""
    lines = [b"plain line of text", b".one leading dot", b"..two leading dots", b".", b"..",
             b"...", b"ends with a dot.", b"", b". .", b"x" * 200]
    block = b"\r\n".join(lines) + b"\r\n"
    return block * (size // len(block) + 1)


@pytest.mark.parametrize("size", [100_000, 3_000_000])
def test_large_messages_round_trip_byte_exact(server: SMTPTestServer, size: int) -> None:
    mixed = message("mixed@test", dotted_body(size))
    only_dots = b".\r\n..\r\n.x\r\n...y\r\n" * (size // 16)
    with connect(server, timeout=30) as client:
        for data in (mixed, only_dots):
            assert client.sendmail("a@x.test", ["b@y.test"], data) == {}  # smtplib stuffs
        # The next transaction on the same connection is unaffected.
        assert client.sendmail("a@x.test", ["b@y.test"], message("after@test")) == {}
    assert [m.data for m in server.messages] == [mixed, only_dots, message("after@test")]


def test_large_message_over_tls_and_latency() -> None:
    data = message("tls@test", dotted_body(3_000_000))
    with SMTPTestServer(tls="implicit", latency=0.01) as server:
        assert server.ca_file is not None
        context = ssl.create_default_context(cafile=server.ca_file)
        with smtplib.SMTP_SSL(server.host, server.port, context=context, timeout=30) as client:
            client.sendmail("a@x.test", ["b@y.test"], data)
            client.sendmail("a@x.test", ["b@y.test"], message())
        assert [m.data for m in server.messages] == [data, message()]
        assert server.messages[0].tls


def transaction(sock: socket.socket, content: bytes, then: bytes = b"NOOP\r\n") -> list[bytes]:
    """MAIL, RCPT and DATA; then *content* (terminator included) and *then* in one write."""
    sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert read_replies(sock, 3)[-1].startswith(b"354")
    sock.sendall(content + then)
    return read_replies(sock, 1 + then.count(b"\r\n"))


def test_empty_message_and_a_lone_blank_line(server: SMTPTestServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO client\r\n")
        read_replies(sock, 1)
        assert transaction(sock, b".\r\n")[0].startswith(b"250 2.0.0")
        assert transaction(sock, b"\r\n.\r\n")[0].startswith(b"250 2.0.0")
        assert transaction(sock, b"..\r\n.\r\n")[0].startswith(b"250 2.0.0")
    assert [m.data for m in server.messages] == [b"", b"\r\n", b".\r\n"]


def test_next_envelope_pipelined_behind_the_dot(server: SMTPTestServer) -> None:
    first, second = message("p1@test", b"last line ends with a dot.\r\n"), message("p2@test")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        read_replies(sock, 1)
        sock.sendall(b"EHLO client\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        assert read_replies(sock, 4)[-1].startswith(b"354")
        # The dot and the whole next envelope in one segment.
        sock.sendall(first + b".\r\nMAIL FROM:<c@x.test>\r\nRCPT TO:<d@y.test>\r\nDATA\r\n")
        replies = read_replies(sock, 4)
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
        # An empty message, with RSET and NOOP riding behind its dot.
        sock.sendall(second + b".\r\nMAIL FROM:<e@x.test>\r\nRCPT TO:<f@y.test>\r\nDATA\r\n")
        assert read_replies(sock, 4)[-1].startswith(b"354")
        sock.sendall(b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == [b"250", b"250", b"250", b"221"]
    assert [(m.sender, m.data) for m in server.messages] == [
        ("a@x.test", first), ("c@x.test", second), ("e@x.test", b""),
    ]
    verbs = [line.split(" ")[0] for _, line in server.commands]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA"] * 1 + ["MAIL", "RCPT", "DATA"] * 2 + [
        "RSET", "NOOP", "QUIT"]


def test_size_limit_counts_the_unstuffed_content_of_large_messages() -> None:
    limit = 50_000
    exact = b".\r\n" * 16_600 + b"x" * 198 + b"\r\n"  # 16,600 bytes more once stuffed
    assert len(exact) == limit
    with SMTPTestServer(size_limit=limit) as server, connect(server, timeout=30) as client:
        client.ehlo()
        many_lines = (b"y" * 70 + b"\r\n") * 3000
        for data, expected in ((exact, 250), (exact + b"x\r\n", 552), (many_lines, 552)):
            client.mail("a@x.test")  # no SIZE=: found out after the dot
            client.rcpt("b@y.test")
            code, text = client.data(data)
            assert code == expected, (code, text)
            if code == 552:
                assert text.startswith(b"5.3.4")
    assert [m.data for m in server.messages] == [exact]


def test_over_long_lines_are_refused_after_the_dot(server: SMTPTestServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO client\r\n")
        read_replies(sock, 1)
        # aiosmtpd's limit: 1001 octets with the CRLF (one more than RFC 5321's 1000).
        assert transaction(sock, b"x" * 999 + b"\r\n.\r\n")[0].startswith(b"250")
        for line in (b"x" * 1000, b"." + b"x" * 999, b"y" * 70_000):
            replies = transaction(sock, b"ok\r\n" + line + b"\r\nok\r\n.\r\n")
            assert replies == [b"500 Line too long (see RFC5321 4.5.3.1.6)", b"250 OK"]
    assert [len(m.data) for m in server.messages] == [1001]


def test_help_data_keeps_aiosmtpds_syntax(server: SMTPTestServer) -> None:
    with connect(server) as client:
        assert client.docmd("HELP", "DATA") == (250, b"Syntax: DATA")


def test_idle_time_counts_from_the_last_content_bytes(server: SMTPTestServer) -> None:
    server.add_fault(Fault.idle_disconnect(0.3, code=None))
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO client\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
        read_replies(sock, 4)
        deadline = time.monotonic() + 0.9  # three times the idle time, trickled
        while time.monotonic() < deadline:
            sock.sendall(b"more content\r\n")
            time.sleep(0.05)
        sock.sendall(b".\r\n")
        assert read_replies(sock, 1)[0].startswith(b"250 2.0.0")
    assert len(server.messages) == 1


# Raw content (terminator included) whose handling is compared with aiosmtpd's own
# line-at-a-time smtp_DATA below.
TRICKY_CONTENT = [
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n.\r\n",
    b".x\r\n..y\r\n...\r\n.\r\n",
    b"a.\r\n.\r\n",
    b"a\n.b\r\n.\r\n",  # a bare LF: ".b" does not start a line
    b"a\r.\r\nb\r\n.\r\n",  # a bare CR before ".\r\n"
    b"a\r\n.\n.\r\n.\r\n",
    b"a\r\n.\r\r\n.\r\n",
    b"\r\n\r\n..\r\n\r\n.\r\n",
    b"x" * 998 + b"\r\n.\r\n",
    b"x" * 999 + b"\r\n.\r\n",
    b"x" * 1000 + b"\r\n.\r\n",
    b"." + b"x" * 998 + b"\r\n.\r\n",
    b"." + b"x" * 999 + b"\r\n.\r\n",
    b"x" * 5000 + b"\r\n.\r\n",
    b"y" * 1001 + b".\r\nz\r\n.\r\n",
    b"ab.\r\n" * 300 + b".\r\n",
    b"x" * 997 + b"\r\n..\r\n" + b"y" * 1500 + b".\r\n.\r\n",
]


def run_content(server: SMTPTestServer) -> list[tuple[list[bytes], bytes | None]]:
    """Send TRICKY_CONTENT, each in three writes cut near its end, with a NOOP behind."""
    results = []
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        read_replies(sock, 1)
        sock.sendall(b"EHLO client\r\n")
        read_replies(sock, 1)
        for content in TRICKY_CONTENT:
            before = len(server.messages)
            sock.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
            assert read_replies(sock, 3)[-1].startswith(b"354")
            stream = content + b"NOOP\r\n"
            cuts = sorted({0, max(0, len(content) - 4), len(content) - 1, len(stream)})
            for start, end in itertools.pairwise(cuts):
                sock.sendall(stream[start:end])
                time.sleep(0.005)
            replies = read_replies(sock, 2)
            recorded = server.messages[before].data if len(server.messages) > before else None
            results.append((replies, recorded))
    return results


def test_content_handling_matches_aiosmtpd(monkeypatch: pytest.MonkeyPatch) -> None:
    with SMTPTestServer() as fast:
        ours = run_content(fast)
    monkeypatch.setattr(FaultySMTP, "smtp_DATA", aiosmtpd.smtp.SMTP.smtp_DATA)
    with SMTPTestServer() as reference:
        theirs = run_content(reference)
    queued = re.compile(rb"queued as C\d+M\d+")
    assert [([queued.sub(b"", r) for r in replies], data) for replies, data in ours] == [
        ([queued.sub(b"", r) for r in replies], data) for replies, data in theirs
    ]
    for (_, data), content in zip(ours, TRICKY_CONTENT, strict=True):
        assert data == line_by_line(content, 1001)[0], content


def line_by_line(stream: bytes, limit: int) -> tuple[bytes | None, bytes]:
    """aiosmtpd 1.4's DATA, one CRLF line at a time: the unstuffed content (None when a
    line, CRLF included, is longer than *limit*) and the bytes after the terminator."""
    lines, pos, too_long = [], 0, False
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line, pos = stream[pos:end], end
        if line == b".\r\n":
            break
        too_long |= len(line) > limit
        lines.append(line[1:] if line[:1] == b"." else line)
    return (None if too_long else b"".join(lines)), stream[pos:]


@settings(max_examples=400, deadline=None)
@given(
    body=st.lists(
        st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n.", b".\r\n", b"x" * 20]),
        max_size=40,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 1000), max_size=8),
    limit=st.sampled_from([4, 8, 16, 40, 1001]),
)
def test_bulk_reading_matches_line_by_line(body: bytes, cuts: list[int], limit: int) -> None:
    stream = body + b"\r\n.\r\nMAIL FROM:<next@x.test>\r\n"
    expected, rest = line_by_line(stream, limit)
    edges = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})

    async def receive() -> tuple[bytes | None, bytes]:
        reader = asyncio.StreamReader(limit=limit)

        async def feed() -> None:
            for start, end in itertools.pairwise(edges):
                reader.feed_data(stream[start:end])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        raw = await read_content(reader)
        await feeder
        content = None if has_long_line(raw, limit - 1) else unstuff(raw)
        return content, await reader.read()

    assert asyncio.run(receive()) == (expected, rest)


# -- reply faults -----------------------------------------------------------------------


def test_reply_fault_refuses_one_recipient_by_match(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="BAD@"))
    with connect(server) as client:
        refused = client.sendmail("a@x.test", ["good@y.test", "bad@y.test"], message())
    assert refused == {"bad@y.test": (550, b"5.1.1 No such user")}
    assert server.messages[0].recipients == ("good@y.test",)


def test_reply_fault_with_times_fires_that_often(server: SMTPTestServer) -> None:
    fault = Fault.reply("MAIL", 451, "4.3.0 Try again later", times=1)
    server.add_fault(fault)
    with connect(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@x.test", ["b@y.test"], message())
        assert refused.value.smtp_code == 451
        assert refused.value.smtp_error == b"4.3.0 Try again later"
        assert client.sendmail("a@x.test", ["b@y.test"], message()) == {}
    assert server.faults_triggered == [(1, fault)]


def test_positive_reply_fault_accepts_with_its_own_text(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("RCPT", 251, "2.1.5 User not local; will forward"))
    server.add_fault(Fault.reply("DOT", 250, "2.0.0 Custom OK"))
    with connect(server) as client:
        client.ehlo()
        client.mail("a@x.test")
        assert client.rcpt("b@y.test") == (251, b"2.1.5 User not local; will forward")
        assert client.data(message()) == (250, b"2.0.0 Custom OK")
    assert server.deliveries() == {("<m1@test>", "b@y.test"): 1}


def test_reply_fault_on_data_and_on_dot(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("DATA", 451, "4.3.0 No DATA now", times=1))
    server.add_fault(Fault.reply("DOT", 554, "5.7.1 Message rejected as spam", match="spam@"))
    with connect(server) as client:
        client.ehlo()
        client.mail("a@x.test")
        client.rcpt("b@y.test")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.data(message())
        assert (refused.value.smtp_code, refused.value.smtp_error) == (451, b"4.3.0 No DATA now")
        client.rset()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("a@x.test", ["spam@y.test"], message())
        assert refused.value.smtp_code == 554
        assert client.sendmail("a@x.test", ["b@y.test"], message("ok@test")) == {}
    assert [m.message_id for m in server.messages] == ["<ok@test>"]


def test_reply_fault_on_other_commands(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("EHLO", 502, "5.5.1 EHLO not implemented", times=1))
    with connect(server) as client:
        assert client.ehlo()[0] == 502
        assert client.helo()[0] == 250
        assert client.sendmail("a@x.test", ["b@y.test"], message()) == {}


# -- greeting, disconnect and drop faults -----------------------------------------------


def test_greeting_fault_refuses_connections(server: SMTPTestServer) -> None:
    server.add_fault(Fault.greeting(times=1))
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(server)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        421, b"4.3.2 Service not available"
    )
    server.add_fault(Fault.greeting(554, "5.3.2 No SMTP service here", times=1))
    with pytest.raises(smtplib.SMTPConnectError, match="554"):
        connect(server)
    with connect(server) as client:
        assert client.noop()[0] == 250
    wait_until(lambda: server.active_connections == 0, 5.0, message="connections to close")


def test_disconnect_fault_replies_421_then_closes(server: SMTPTestServer) -> None:
    server.add_fault(Fault.disconnect("RCPT", times=1))
    with connect(server) as client:
        client.ehlo()
        client.mail("a@x.test")
        assert client.rcpt("b@y.test") == (
            421, b"4.3.2 Service shutting down, closing transmission channel"
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    server.add_fault(Fault.disconnect("MAIL", code=None))
    with connect(server) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.mail("a@x.test")
    assert server.messages == []


def test_disconnect_fault_after_the_dot_records_nothing(server: SMTPTestServer) -> None:
    server.add_fault(Fault.disconnect("DOT"))
    with connect(server) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("a@x.test", ["b@y.test"], message())
    assert refused.value.smtp_code == 421
    assert server.messages == []


def test_drop_during_data_loses_the_message(server: SMTPTestServer) -> None:
    server.add_fault(Fault.drop_during_data(times=1))
    client = connect(server)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@x.test", ["b@y.test"], message(body=b"x" * 100_000 + b"\r\n"))
    client.close()
    wait_until(lambda: server.active_connections == 0, 5.0, message="the connection to close")
    assert server.messages == []
    assert "DATA" in [line for _, line in server.commands]


def test_drop_after_dot_records_an_unacknowledged_message(server: SMTPTestServer) -> None:
    server.add_fault(Fault.drop_after_dot(times=1))
    client = connect(server)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@x.test", ["b@y.test"], message())
    client.close()
    (received,) = server.messages
    assert received.acknowledged is False
    assert server.deliveries() == {}
    with connect(server) as client:
        client.sendmail("a@x.test", ["b@y.test"], message())
    assert server.deliveries() == {("<m1@test>", "b@y.test"): 1}


def test_idle_disconnect_sends_an_unsolicited_421(server: SMTPTestServer) -> None:
    with connect(server) as client:
        client.ehlo()
        started = time.monotonic()
        server.add_fault(Fault.idle_disconnect(0.2, times=1))  # also reaches open connections
        assert client.getreply() == (421, b"4.4.2 Idle timeout")
        assert time.monotonic() - started >= 0.15
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.getreply()


def test_idle_disconnect_spares_busy_connections(server: SMTPTestServer) -> None:
    server.add_fault(Fault.idle_disconnect(0.3, code=None))
    with connect(server) as client:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:  # keeps talking for twice the idle time
            assert client.noop()[0] == 250
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.getreply()  # then falls silent, and is closed without a reply


def test_delay_fault_holds_a_reply_back(server: SMTPTestServer) -> None:
    server.add_fault(Fault.delay("MAIL", 0.5, times=1))
    with connect(server, timeout=0.2) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            client.mail("a@x.test")
    server.add_fault(Fault.delay("DOT", 0.2, times=1))
    with connect(server) as client:
        started = time.monotonic()
        client.sendmail("a@x.test", ["b@y.test"], message())
        assert time.monotonic() - started >= 0.2
    server.add_fault(Fault.delay("GREETING", 0.5, times=1))
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        connect(server, timeout=0.2)


def test_clear_faults(server: SMTPTestServer) -> None:
    server.add_fault(Fault.reply("MAIL", 451, "4.3.0 Try again later"))
    server.clear_faults()
    with connect(server) as client:
        assert client.sendmail("a@x.test", ["b@y.test"], message()) == {}


def test_fault_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="on must be one of"):
        Fault.reply("BOGUS", 550, "no")
    with pytest.raises(ValueError, match="times"):
        Fault.drop_after_dot(times=0)
    with pytest.raises(ValueError, match="3xx"):
        Fault.reply("DATA", 354, "go ahead")
    with pytest.raises(ValueError, match="require_auth"):
        SMTPTestServer(require_auth=True)
    assert Fault.reply("rcpt", 550, "x").on == "RCPT"


# -- TLS and AUTH -----------------------------------------------------------------------


def test_starttls_with_the_servers_ca() -> None:
    with SMTPTestServer(tls="starttls") as server:
        assert isinstance(server.ca, trustme.CA)
        assert server.ca_file is not None
        with connect(server) as client:
            client.starttls(context=ssl.create_default_context(cafile=server.ca_file))
            client.sendmail("a@x.test", ["b@y.test"], message())
        with connect(server) as client, pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())
        with connect(server) as client:
            client.sendmail("a@x.test", ["b@y.test"], message("plain@test"))
        assert [m.tls for m in server.messages] == [True, False]


def test_implicit_tls_with_the_servers_ca() -> None:
    with SMTPTestServer(tls="implicit") as server:
        assert server.ca_file is not None
        context = ssl.create_default_context(cafile=server.ca_file)
        with smtplib.SMTP_SSL(server.host, server.port, context=context, timeout=5) as client:
            client.ehlo()
            assert "starttls" not in client.esmtp_features
            client.sendmail("a@x.test", ["b@y.test"], message())
        with pytest.raises(ssl.SSLCertVerificationError):
            smtplib.SMTP_SSL(server.host, server.port, timeout=5,
                             context=ssl.create_default_context())
        assert server.messages[0].tls is True


def test_auth_plain_and_login_with_redacted_commands() -> None:
    with SMTPTestServer(auth={"user": "s3cret"}) as server:
        with connect(server) as client:
            client.login("user", "s3cret")  # smtplib picks PLAIN
            client.sendmail("a@x.test", ["b@y.test"], message())
        with connect(server) as client:
            client.ehlo()
            client.user, client.password = "user", "s3cret"
            assert client.auth("LOGIN", client.auth_login)[0] == 235
        with connect(server) as client, pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            client.login("user", "wrong")
        assert bad.value.smtp_code == 535
        assert server.messages[0].user == "user"
        auth_lines = [line for _, line in server.commands if line.startswith("AUTH")]
        # smtplib's login() falls back from PLAIN to LOGIN when the password is refused.
        assert auth_lines == ["AUTH PLAIN ********", "AUTH LOGIN ********",
                              "AUTH PLAIN ********", "AUTH LOGIN ********"]
        assert not any("s3cret" in line or "wrong" in line for _, line in server.commands)


def test_require_auth_refuses_mail_until_authenticated() -> None:
    server = SMTPTestServer(auth={"user": "pw"}, require_auth=True)
    with server, connect(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@x.test", ["b@y.test"], message())
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            530, b"5.7.0 Authentication required"
        )
        client.login("user", "pw")
        assert client.sendmail("a@x.test", ["b@y.test"], message()) == {}


def test_auth_require_tls_hides_auth_until_starttls() -> None:
    with SMTPTestServer(tls="starttls", auth={"user": "pw"}, auth_require_tls=True) as server:
        assert server.ca_file is not None
        with connect(server) as client:
            client.ehlo()
            assert "auth" not in client.esmtp_features
            assert client.docmd("AUTH", "PLAIN AHVzZXIAcHc=")[0] == 538
            client.starttls(context=ssl.create_default_context(cafile=server.ca_file))
            client.login("user", "pw")
            client.sendmail("a@x.test", ["b@y.test"], message())
        assert server.messages[0].user == "user"


def test_dsn_is_a_relay_dsn_for_this_server() -> None:
    with SMTPTestServer(tls="starttls") as server:
        relay = parse_relay("test", server.dsn(user="u@x", password="p:/?&"))
        assert (relay.host, relay.port, relay.security) == (server.host, server.port, "starttls")
        assert (relay.username, relay.password, relay.ca_file) == ("u@x", "p:/?&", server.ca_file)
        assert server.dsn("smtp").startswith("smtp://")
    with SMTPTestServer(tls="implicit") as server:
        assert parse_relay("test", server.dsn()).security == "tls"
    with SMTPTestServer() as server:
        assert server.dsn(timeout=3, allow_plain_auth=True) == (
            f"smtp://127.0.0.1:{server.port}?timeout=3&allow_plain_auth=true"
        )


# -- life cycle and robustness ----------------------------------------------------------


def test_stop_closes_connections_and_start_reuses_the_port() -> None:
    server = SMTPTestServer()
    server.start()
    port = server.port
    client = connect(server)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, port), timeout=5)
    server.start()
    try:
        assert server.port == port
        with connect(server) as client:
            assert client.noop()[0] == 250
    finally:
        server.stop()


def test_start_fails_loudly_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            SMTPTestServer(port=taken.getsockname()[1]).start()


def test_client_misbehaviour_logs_no_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with SMTPTestServer(tls="starttls") as server:
        server.add_fault(Fault.drop_after_dot(times=1))
        # A reset (RST) in the middle of a pipelined transaction.
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nSub")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        # A client that hangs up in the middle of the content, and one that never reads.
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nS")
        sock.close()
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"NOOP\r\n" * 2000)
        sock.close()
        # A client that distrusts the certificate, and the dropped-after-dot fault.
        with connect(server) as client, pytest.raises(ssl.SSLError):
            client.starttls(context=ssl.create_default_context())
        with connect(server) as client, pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail("a@x.test", ["b@y.test"], message())
        wait_until(lambda: server.active_connections == 0, 5.0, message="connections to close")
        # And stop() with a connection still open.
        left_open = connect(server)
    left_open.close()
    gc.collect()  # "Task exception was never retrieved" is reported at collection
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- latency ----------------------------------------------------------------------------


def test_latency_pipelined_commands_cost_one_round_trip() -> None:
    rtt = 0.05
    with SMTPTestServer(latency=rtt) as server:
        sock = socket.create_connection((server.host, server.port), timeout=5)
        started = time.monotonic()
        read_replies(sock, 1)
        greeting = time.monotonic() - started
        sock.sendall(b"EHLO client\r\n")
        read_replies(sock, 1)

        started = time.monotonic()
        sock.sendall(b"NOOP\r\n" * 4)
        assert len(read_replies(sock, 4)) == 4
        pipelined = time.monotonic() - started

        started = time.monotonic()
        for _ in range(4):
            sock.sendall(b"NOOP\r\n")
            read_replies(sock, 1)
        sequential = time.monotonic() - started
        sock.close()
    # The greeting models a TCP handshake plus the reply's way back: 1.5 round trips.
    assert 1.2 * rtt < greeting < 4 * rtt, greeting
    assert 0.8 * rtt < pipelined < 2.5 * rtt, pipelined
    assert sequential > 3 * rtt, sequential


def test_latency_proxy_passes_tls_and_closes_both_ways() -> None:
    with SMTPTestServer(latency=0.02, tls="implicit", auth={"u": "p"}) as server:
        assert server.ca_file is not None
        context = ssl.create_default_context(cafile=server.ca_file)
        with smtplib.SMTP_SSL(server.host, server.port, context=context, timeout=5) as client:
            client.login("u", "p")
            client.sendmail("a@x.test", ["b@y.test"], message())
        wait_until(lambda: server.active_connections == 0, 5.0,
                   message="the client's close to reach the server")
        # The server hanging up reaches the client after its last reply.
        server.add_fault(Fault.disconnect("NOOP"))
        with smtplib.SMTP_SSL(server.host, server.port, context=context, timeout=5) as client:
            assert client.noop()[0] == 421
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()
        assert server.messages[0].tls is True


def _raw_session(server: SMTPTestServer, command: bytes | None) -> socket.socket:
    """A raw client: read the greeting (unless it is the fault), send *command*."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    if command is not None:
        assert sock.recv(1024).startswith(b"220")
        sock.sendall(command)
    return sock


def test_hostile_faults_misbehave_as_described() -> None:
    with SMTPTestServer() as server:
        server.add_fault(Fault.trickle("EHLO", seconds=0.01, times=1))
        with _raw_session(server, b"EHLO me\r\n") as sock:
            chunks = [sock.recv(1024) for _ in range(8)]
        assert all(len(c) == 1 for c in chunks) and b"".join(chunks) == b"250 OKxx"

        server.add_fault(Fault.endless("NOOP", times=1))
        with _raw_session(server, b"NOOP\r\n") as sock:
            got = b""
            while len(got) < 100_000:
                got += sock.recv(65536)
        lines = got.split(b"\r\n")[:-1]
        assert len(lines) > 1000 and all(line == b"250-" + b"x" * 60 for line in lines)

        server.add_fault(Fault.hang("GREETING", times=1))
        with _raw_session(server, None) as sock:
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1024)

        server.add_fault(Fault.overlong("HELP", length=5000, times=1))
        with _raw_session(server, b"HELP\r\n") as sock, sock.makefile("rb") as f:
            assert f.readline() == b"250 " + b"x" * 5000 + b"\r\n"
        assert [f.kind for _, f in server.faults_triggered] == [
            "trickle", "endless", "hang", "reply"]
        with pytest.raises(ValueError, match="on must be one of"):
            Fault.hang("BOGUS")
