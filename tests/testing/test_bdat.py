"""BDAT (RFC 3030 CHUNKING) in SMTPTestServer, driven over raw sockets: pipelined
transactions, the errors Postfix's smtpd gives (checked against Postfix 3.7), and faults.

smtplib has no BDAT, and the point is the exact bytes and their order on the wire, so a
small raw client writes whole windows of commands and chunks at once and reads replies.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailworker.testing import Fault, Persona, SMTPTestServer, wait_until
from mailworker.testing.faults import FaultBook


def message(mid: str, body: bytes = b"hello\r\n") -> bytes:
    return f"Message-ID: <{mid}@test>\r\nSubject: {mid}\r\n\r\n".encode() + body


def bdat_transaction(mid: str, rcpts: tuple[str, ...] = ("b@y.test",),
                     body: bytes = b"hello\r\n", sender: str = "a@x.test") -> bytes:
    """MAIL, RCPTs and one ``BDAT n LAST`` with the message, as one pipelined write."""
    data = message(mid, body)
    return (f"MAIL FROM:<{sender}>\r\n".encode()
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
            + f"BDAT {len(data)} LAST\r\n".encode() + data)


class Raw:
    """A raw SMTP client: write bytes, read whole replies (``(code, text)``)."""

    def __init__(self, server: SMTPTestServer, ehlo: bool = True) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=5)
        self.buffer = b""
        assert self.replies(1)[0][0] == 220
        self.ehlo: list[str] = []
        if ehlo:
            self.send(b"EHLO client.test\r\n")
            self.ehlo = self.reply_lines()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the server (unread: {self.buffer!r})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply_lines(self) -> list[str]:
        lines = [self._line().decode()]
        while lines[-1][3:4] == "-":
            lines.append(self._line().decode())
        return lines

    def replies(self, count: int) -> list[tuple[int, str]]:
        out = []
        for _ in range(count):
            last = self.reply_lines()[-1]
            out.append((int(last[:3]), last[4:]))
        return out

    def closed(self) -> bool:
        """True once the server closed the connection (after any unread replies)."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer(chunking=True) as running:
        yield running


@pytest.fixture
def raw(server: SMTPTestServer) -> Iterator[Raw]:
    client = Raw(server)
    yield client
    client.close()


def codes(replies: list[tuple[int, str]]) -> list[int]:
    return [code for code, _ in replies]


# -- offering it -----------------------------------------------------------------------

def test_chunking_is_offered_only_when_asked_for() -> None:
    with SMTPTestServer() as plain, SMTPTestServer(chunking=True) as chunking:
        client = Raw(plain)
        assert "CHUNKING" not in " ".join(client.ehlo)
        client.send(b"HELP\r\n" + b"BDAT 5 LAST\r\n")
        help_text = client.replies(2)
        assert "BDAT" not in help_text[0][1]
        assert help_text[1][0] == 500  # unknown command: the chunk is then read as commands
        client.close()
        client = Raw(chunking)
        assert "250-CHUNKING" in client.ehlo and "250-PIPELINING" in client.ehlo
        client.send(b"HELP\r\n")
        assert "BDAT" in client.replies(1)[0][1]
        client.close()


# -- accepting -------------------------------------------------------------------------

def test_a_pipelined_window_of_bdat_transactions_is_recorded_byte_exact(
        server: SMTPTestServer, raw: Raw) -> None:
    # Content BDAT must not touch: leading dots, a lone-dot line, bare CR and LF, NULs.
    odd = b".leading dot\r\n.\r\nbare\nLF and bare\rCR\r\n\x00\xff\r\n..two\r\n"
    window = b"".join(bdat_transaction(f"m{i}", body=odd * i) for i in range(5))
    raw.send(window + b"QUIT\r\n")
    replies = raw.replies(16)
    assert codes(replies) == [250, 250, 250] * 5 + [221]
    assert [text for _, text in replies[2:15:3]] == [
        f"2.0.0 OK: queued as C1M{i}" for i in range(1, 6)]
    got = server.messages
    assert [m.data for m in got] == [message(f"m{i}", odd * i) for i in range(5)]
    assert all(m.acknowledged and m.recipients == ("b@y.test",) for m in got)
    assert [line for _, line in server.commands if line.startswith("BDAT")] == [
        f"BDAT {len(message(f'm{i}', odd * i))} LAST" for i in range(5)]


def test_a_message_in_several_chunks(server: SMTPTestServer, raw: Raw) -> None:
    data = message("multi", b"x" * 200_000)
    pieces = [data[:3], data[3:100_000], data[100_000:]]
    out = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
    for piece in pieces[:-1]:
        out += f"BDAT {len(piece)}\r\n".encode() + piece
    out += f"BDAT {len(pieces[-1])}\r\n".encode() + pieces[-1] + b"BDAT 0 LAST\r\n"
    raw.send(out)
    replies = raw.replies(6)
    assert replies[2:5] == [(250, f"2.0.0 {len(p)} octets received") for p in pieces]
    assert replies[5][0] == 250
    (got,) = server.messages
    assert got.data == data and got.message_id == "<multi@test>"


def test_data_still_works_and_transactions_may_alternate(server: SMTPTestServer,
                                                        raw: Raw) -> None:
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
    assert codes(raw.replies(3)) == [250, 250, 354]
    raw.send(b"Subject: d\r\n\r\n..dot\r\n.\r\n" + bdat_transaction("b"))
    assert codes(raw.replies(4)) == [250] * 4
    assert [m.data for m in server.messages] == [b"Subject: d\r\n\r\n.dot\r\n", message("b")]


# -- errors, as Postfix gives them ------------------------------------------------------

def test_bdat_without_mail_is_refused_and_its_chunks_discarded(
        server: SMTPTestServer, raw: Raw) -> None:
    raw.send(b"BDAT 5\r\nhelloBDAT 3\r\nabcBDAT 2 LAST\r\nxy" + bdat_transaction("after"))
    replies = raw.replies(6)
    assert replies[:3] == [(503, "5.5.1 Error: need MAIL command"),
                           (551, "5.0.0 Discarded 3 bytes after earlier error"),
                           (551, "5.0.0 Discarded 2 bytes after earlier error")]
    assert codes(replies[3:]) == [250, 250, 250]  # the stream stayed in step
    assert [m.data for m in server.messages] == [message("after")]


def test_bdat_without_an_accepted_recipient(server: SMTPTestServer, raw: Raw) -> None:
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="gone@"))
    raw.send(bdat_transaction("lost", rcpts=("gone@y.test",)) + bdat_transaction("ok"))
    replies = raw.replies(6)
    assert codes(replies) == [250, 550, 554, 250, 250, 250]
    assert replies[2][1] == "5.5.1 Error: no valid recipients"
    assert [m.message_id for m in server.messages] == ["<ok@test>"]


def test_data_after_bdat_is_refused_and_the_transaction_goes_on(
        server: SMTPTestServer, raw: Raw) -> None:
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5\r\nhelloDATA\r\n"
             b"BDAT 3 LAST\r\nabc")
    replies = raw.replies(5)
    assert replies[3] == (503, "5.5.1 Error: DATA after BDAT")
    assert codes(replies) == [250, 250, 250, 503, 250]
    assert [m.data for m in server.messages] == [b"helloabc"]


def test_only_the_last_chunk_may_be_empty(server: SMTPTestServer, raw: Raw) -> None:
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 0\r\nBDAT 1 LAST\r\nz"
             b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 0 LAST\r\n")
    replies = raw.replies(7)
    assert replies[2:4] == [(551, "5.7.1 Null BDAT request"),
                            (551, "5.0.0 Discarded 1 bytes after earlier error")]
    assert codes(replies[4:]) == [250, 250, 250]
    assert [m.data for m in server.messages] == [b""]


def test_a_malformed_bdat_hangs_up(server: SMTPTestServer, raw: Raw) -> None:
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5x\r\nhello"
             + bdat_transaction("never"))
    assert raw.replies(3)[2] == (521, "5.5.4 Syntax: BDAT count [LAST]")
    assert wait_until(raw.closed, 5)
    assert server.messages == []


@pytest.mark.parametrize("arg", ["", "-1", "5 NOTLAST", "5 LAST extra", "٣"])
def test_bdat_syntax(server: SMTPTestServer, arg: str) -> None:
    client = Raw(server)
    client.send(f"BDAT {arg}\r\n".encode())
    assert client.replies(1)[0][0] == 521
    client.close()


def test_a_chunk_over_the_size_limit_is_read_then_refused() -> None:
    with SMTPTestServer(chunking=True, size_limit=1000) as server:
        raw = Raw(server)
        assert "250-SIZE 1000" in raw.ehlo
        raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                 b"BDAT 600\r\n" + b"x" * 600 + b"BDAT 600\r\n" + b"y" * 600
                 + b"BDAT 3 LAST\r\nabc" + bdat_transaction("small"))
        replies = raw.replies(8)
        assert replies[2:5] == [(250, "2.0.0 600 octets received"),
                                (552, "5.3.4 Chunk exceeds message size limit"),
                                (551, "5.0.0 Discarded 3 bytes after earlier error")]
        assert codes(replies[5:]) == [250, 250, 250]
        assert [m.message_id for m in server.messages] == ["<small@test>"]
        raw.close()


def test_bdat_after_last_and_rset_clears_a_failed_transaction(
        server: SMTPTestServer, raw: Raw) -> None:
    raw.send(bdat_transaction("one") + b"BDAT 2\r\nxyRSET\r\n" + bdat_transaction("two"))
    replies = raw.replies(8)
    assert codes(replies) == [250, 250, 250, 503, 250, 250, 250, 250]
    raw.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 1\r\n")
    server.add_fault(Fault.reply("BDAT", 452, "4.3.1 Out of space", times=1))
    raw.send(b"z")
    assert codes(raw.replies(3)) == [250, 250, 452]
    raw.send(b"RSET\r\n" + bdat_transaction("three"))
    assert codes(raw.replies(4)) == [250, 250, 250, 250]
    assert [m.message_id for m in server.messages] == ["<one@test>", "<two@test>",
                                                       "<three@test>"]


# -- faults ----------------------------------------------------------------------------

def test_drop_after_the_kth_last_leaves_exactly_that_message_uncertain(
        server: SMTPTestServer, raw: Raw) -> None:
    server.add_fault(Fault.drop_after_dot(nth=2, times=1))
    raw.send(b"".join(bdat_transaction(f"w{i}") for i in range(4)))
    replies = []
    with pytest.raises(ConnectionError):
        while True:
            replies.append(raw.replies(1)[0])
    # The first transaction's three replies and the second's MAIL and RCPT, then nothing.
    assert codes(replies) == [250] * 5
    got = server.messages
    assert [(m.message_id, m.acknowledged) for m in got] == [("<w0@test>", True),
                                                             ("<w1@test>", False)]
    assert got[1].data == message("w1")
    # The transactions pipelined behind the drop were not run.
    assert sum(line.startswith("MAIL") for _, line in server.commands) == 2


def test_disconnect_before_the_chunk_and_in_the_middle_of_it(server: SMTPTestServer) -> None:
    server.add_fault(Fault.disconnect("BDAT", times=1))
    raw = Raw(server)
    raw.send(bdat_transaction("a"))
    assert raw.replies(3)[2] == (421, "4.3.2 Service shutting down, closing transmission "
                                      "channel")
    assert wait_until(raw.closed, 5)
    raw.close()
    server.add_fault(Fault.drop_during_data(times=1, match="mid@"))
    raw = Raw(server)
    # A BDAT that is refused anyway (no MAIL) does not use the fault up.
    raw.send(b"BDAT 1 LAST\r\nz"
             + bdat_transaction("b", rcpts=("mid@y.test",), body=b"x" * 100_000))
    assert codes(raw.replies(3)) == [503, 250, 250]
    assert wait_until(raw.closed, 5)
    raw.close()
    assert server.messages == []
    assert [f.kind for _, f in server.faults_triggered] == ["disconnect", "drop_during_data"]


def test_reply_faults_after_last_match_a_recipient_or_a_message_id(
        server: SMTPTestServer, raw: Raw) -> None:
    server.add_fault(Fault.reply("DOT", 451, "4.7.1 Try later", match="grey@"))
    server.add_fault(Fault.reply("DOT", 554, "5.7.1 Spam", match="<spam@test>"))
    raw.send(bdat_transaction("g", rcpts=("grey@y.test",)) + bdat_transaction("spam")
             + bdat_transaction("fine"))
    replies = raw.replies(9)
    assert [replies[i] for i in (2, 5, 8)] == [
        (451, "4.7.1 Try later"), (554, "5.7.1 Spam"), (250, "2.0.0 OK: queued as C1M1")]
    assert [m.message_id for m in server.messages] == ["<fine@test>"]


def test_delay_and_hostile_faults_act_on_bdat(server: SMTPTestServer, raw: Raw) -> None:
    server.add_fault(Fault.delay("BDAT", 0.05, times=1))
    server.add_fault(Fault.delay("DOT", 0.05, times=1))
    raw.send(bdat_transaction("slow"))
    assert codes(raw.replies(3)) == [250, 250, 250]
    assert [f.on for _, f in server.faults_triggered] == ["BDAT", "DOT"]
    server.add_fault(Fault.hang("BDAT", times=1))
    raw.send(bdat_transaction("hung"))
    assert codes(raw.replies(2)) == [250, 250]
    raw.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        raw.replies(1)
    assert [m.message_id for m in server.messages] == ["<slow@test>"]


def test_persona_limits_apply_after_last() -> None:
    with SMTPTestServer(chunking=True, persona=Persona(rate=1, rate_on="DOT")) as server:
        raw = Raw(server)
        raw.send(bdat_transaction("a") + bdat_transaction("b"))
        replies = raw.replies(6)
        assert (replies[2][0], replies[5]) == (250, (451, "4.7.1 rate limited, slow down"))
        assert [m.message_id for m in server.messages] == ["<a@test>"]
        raw.close()
        server.set_persona(Persona(drop_after_dot=True))
        raw = Raw(server)
        raw.send(bdat_transaction("c") + bdat_transaction("d"))
        assert codes(raw.replies(2)) == [250, 250]
        assert wait_until(raw.closed, 5)
        raw.close()
        assert [(m.message_id, m.acknowledged) for m in server.messages] == [
            ("<a@test>", True), ("<c@test>", False)]


def test_a_window_through_the_latency_proxy() -> None:
    """One write of a window, all replies back: what a pipelining client relies on."""
    with SMTPTestServer(chunking=True, latency=0.010) as server:
        raw = Raw(server)
        raw.send(b"".join(bdat_transaction(f"l{i}") for i in range(20)))
        assert codes(raw.replies(60)) == [250] * 60
        assert len(server.messages) == 20
        raw.close()


def test_nth_lets_the_first_matches_pass() -> None:
    book = FaultBook()
    book.add(Fault.reply("RCPT", 450, "4.2.0 busy", match="x@", nth=3, times=2))
    fired = [book.take("reply", "RCPT", (address,), 1) is not None
             for address in ["x@a", "y@a", "x@a", "x@a", "x@a", "x@a"]]
    assert fired == [False, False, False, True, True, False]
    with pytest.raises(ValueError, match="nth"):
        Fault.drop_after_dot(nth=0)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        Fault.reply("BDAT", 250, "fine")


@pytest.mark.parametrize("data", [
    b"Message-ID: <a@b>\r\n\r\nx", b"message-id:<a@b>  \r\nSubject: x\r\n\r\n",
    b"Subject: x\r\n\r\nMessage-ID: <in-body>\r\n", b"Message-ID:\r\n <folded@x>\r\n\r\n",
    b"X-Message-ID: <x>\r\nMessage-ID: <y>\r\n\r\n", b"Message-ID: <a@b>\n\nbody", b"",
    b"Message-ID: <a@b>", b"Message-ID: <one>\r\nMessage-ID: <two>\r\n\r\n",
    b"Message-ID: <\xc3\xa9@x>\r\n\r\n", b"Subject: Message-ID\r\n\r\n",
    b"Message-ID: <a@b>\r\n\tcomment\r\n\r\n", b"From: a\r\n  Message-ID: <x>\r\n\r\n",
])
def test_message_id_of_agrees_with_the_email_parser(data: bytes) -> None:
    """The server reads each message's Message-ID with a regular expression when it can
    (the email parser costs more than the rest of a small message's handling)."""
    from email.parser import BytesHeaderParser

    from mailworker.testing.records import message_id_of

    end = data.find(b"\r\n\r\n") if b"\r\n\r\n" in data else data.find(b"\n\n")
    value = BytesHeaderParser().parsebytes(data if end < 0 else data[:end + 2]).get(
        "Message-ID")
    assert message_id_of(data) == (None if value is None else str(value).strip())


@pytest.fixture(scope="module")
def shared_server() -> Iterator[SMTPTestServer]:
    with SMTPTestServer(chunking=True) as running:
        yield running


@settings(max_examples=40, deadline=None)
@given(content=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=5))
def test_any_split_into_chunks_arrives_as_sent(shared_server: SMTPTestServer,
                                               content: bytes, cuts: list[int]) -> None:
    """Whatever the bytes (dots, CR, LF, NUL, "\\r\\n.\\r\\n") and however they are cut into
    chunks (empty ones only last), the server records exactly the bytes sent."""
    shared_server.reset()
    bounds = sorted({0, len(content), *(c for c in cuts if c <= len(content))})
    pieces = [content[a:b] for a, b in itertools.pairwise(bounds)] or [b""]
    out = b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
    for piece in pieces[:-1]:
        out += f"BDAT {len(piece)}\r\n".encode() + piece
    out += f"BDAT {len(pieces[-1])} LAST\r\n".encode() + pieces[-1] + b"QUIT\r\n"
    client = Raw(shared_server)
    client.send(out)
    assert codes(client.replies(len(pieces) + 3)) == [250] * (len(pieces) + 2) + [221]
    client.close()
    assert [m.data for m in shared_server.messages] == [content]


def test_replies_held_for_a_pipelined_group_go_out_before_a_fault_writes(
        server: SMTPTestServer, raw: Raw) -> None:
    """The server answers a pipelined group in one write (as Postfix does); a fault that
    writes on its own (a trickled reply) or closes the connection comes after the replies
    already given, in order."""
    server.add_fault(Fault.trickle("MAIL", seconds=0.01, code=451, text="slow", match="t@"))
    raw.send(bdat_transaction("first") + bdat_transaction("second", sender="t@x.test"))
    assert codes(raw.replies(3)) == [250, 250, 250]
    raw.sock.settimeout(5)
    trickled = b""
    while len(raw.buffer + trickled) < 4:
        trickled += raw.sock.recv(1)
    assert (raw.buffer + trickled).startswith(b"451 ")
    assert [m.message_id for m in server.messages] == ["<first@test>"]


def test_a_group_ending_in_a_close_gets_its_replies_first(server: SMTPTestServer) -> None:
    server.add_fault(Fault.disconnect("RSET", code=None))
    raw = Raw(server)
    raw.send(bdat_transaction("a") + bdat_transaction("b") + b"NOOP\r\nRSET\r\nNOOP\r\n")
    assert codes(raw.replies(7)) == [250] * 7
    assert wait_until(raw.closed, 5)
    raw.close()
