"""BDAT pipelining (RFC 3030 CHUNKING + RFC 2920 PIPELINING) on the client side.

Against :class:`BdatServer`, a small real SMTP peer written for these tests: it answers
BDAT the way Postfix does (the chunk is always read; 503 without MAIL, 554 without an
accepted RCPT), takes faults per message, and holds its replies until the client stops
writing, so it can count how many transactions were in flight (written, final reply
not yet sent) and prove the window bound.
"""

from __future__ import annotations

import contextlib
import select
import smtplib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailworker.relay import InvalidRelayError, Relay, parse_relay
from mailworker.smtp import (
    Connection,
    DeliveryUncertain,
    Envelope,
    NotAttempted,
    SendResult,
    Stage,
    failure_of,
)
from mailworker.smtp.connection import prepare

from .helpers import envelope

CLOSE = b"<close>"
"""A script answer: send what is pending, then hang up without replying."""


@dataclass
class Txn:
    """What the server saw of one MAIL transaction."""

    mail: str
    rcpts: list[str] = field(default_factory=list)
    accepted: int = 0
    mail_ok: bool = True
    bdat: str = ""
    content: bytes | None = None


Script = Callable[[str, int, str], bytes | None]
"""``script(verb, message number, command line)``: the reply (None: the default)."""


class BdatServer:
    """One connection, answered from *script*; advertises PIPELINING and CHUNKING.

    Replies are held until the client has been quiet for a moment, then sent together:
    ``flights`` records, at each send, how many BDAT LAST commands had arrived whose
    reply was among those held (the transactions the client had in flight).
    """

    def __init__(self, script: Script | None = None, *, chunking: bool = True) -> None:
        self.script = script or (lambda verb, n, line: None)
        self.chunking = chunking
        self.txns: list[Txn] = []
        self.commands: list[str] = []
        self.flights: list[int] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def relay(self, **options: Any) -> Relay:
        defaults: dict[str, Any] = {"timeout": 5, "connect_timeout": 5, "deadline": 10}
        query = "&".join(f"{k}={v}" for k, v in {**defaults, **options}.items())
        return parse_relay("bdat", f"smtp://127.0.0.1:{self.port}?tls=none&{query}")

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)

    # -- the conversation --------------------------------------------------------------
    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._listener.accept()
            with conn:
                self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        buf = b""
        pending: list[bytes] = []
        held = 0  # BDAT LASTs among the pending replies

        def flush() -> None:
            nonlocal held
            if pending:
                self.flights.append(held)
                conn.sendall(b"".join(pending))
                pending.clear()
                held = 0

        conn.sendall(b"220 bdat-test ESMTP\r\n")
        while True:
            if b"\n" not in buf:
                if pending and not select.select([conn], [], [], 0.05)[0]:
                    flush()
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                continue
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.commands.append(line)
            verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
            n = len(self.txns) - 1
            if verb == "BDAT":
                size = int(line.split()[1])
                while len(buf) < size:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                chunk, buf = buf[:size], buf[size:]
            elif verb == "DATA":
                chunk = b""
            if verb == "MAIL":
                self.txns.append(Txn(line))
                n += 1
            answer = self.script(verb, n, line)
            if answer == CLOSE:  # FIN, not RST: read on until the client lets go
                flush()
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):
                    pass
                return
            reply = answer or self._default(verb, n, line)
            if verb == "MAIL" and not reply.startswith(b"2"):
                self.txns[n].mail_ok = False
            elif verb == "RCPT" and n >= 0:
                self.txns[n].rcpts.append(line)
                self.txns[n].accepted += reply.startswith(b"2")
            elif verb == "BDAT" and n >= 0:
                txn = self.txns[n]
                txn.bdat = line
                if not txn.mail_ok:
                    reply = b"503 5.5.1 Error: need RCPT command\r\n"
                elif not txn.accepted:
                    reply = b"554 5.5.1 Error: no valid recipients\r\n"
                elif reply.startswith(b"2"):
                    txn.content = chunk
                held += 1
            elif verb == "DATA" and n >= 0:
                pending.append(reply)
                flush()
                content = b""
                while b"\r\n.\r\n" not in b"\r\n" + content:
                    data = conn.recv(65536)
                    if not data:
                        return
                    content += data
                    if b"\r\n.\r\n" in b"\r\n" + buf + content:
                        break
                content = buf + content
                end = (b"\r\n" + content).index(b"\r\n.\r\n")
                self.txns[n].content, buf = content[:end], content[end + 3:]
                reply = b"250 2.0.0 ok\r\n"
            pending.append(reply)
            if verb == "QUIT":
                flush()
                return

    def _default(self, verb: str, n: int, line: str) -> bytes:
        if verb == "EHLO":
            chunking = b"250-CHUNKING\r\n" if self.chunking else b""
            return b"250-bdat-test\r\n250-PIPELINING\r\n" + chunking + b"250 SIZE 10000000\r\n"
        if verb == "DATA":
            return b"354 go on\r\n"
        if verb == "QUIT":
            return b"221 bye\r\n"
        if verb == "BDAT":
            return f"250 2.0.0 Ok: queued as Q{n}\r\n".encode()
        return b"250 2.0.0 Ok\r\n"


@pytest.fixture
def bdat_server() -> Any:
    servers: list[BdatServer] = []

    def make(script: Script | None = None, **kwargs: Any) -> BdatServer:
        servers.append(BdatServer(script, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def send(server: BdatServer, envelopes: list[Envelope], gate: Any = None, **options: Any
         ) -> tuple[list[SendResult | BaseException], Connection]:
    return send_over(server.relay(**options), envelopes, gate)


def send_over(relay: Relay, envelopes: list[Envelope], gate: Any = None
              ) -> tuple[list[SendResult | BaseException], Connection]:
    """One connection: open, send the batch, close (the connection is returned closed)."""
    conn = Connection(relay)
    conn.open()
    try:
        return conn.send_many(envelopes, gate=gate), conn
    finally:
        conn.close()


def body(i: int) -> bytes:
    """Content with what DATA would have to escape: leading dots, a lone dot line."""
    return (f"Subject: {i}\r\n\r\n.leading dot\r\n.\r\n..two\r\nline {i}\r\n" * (i + 1)).encode()


def ok(entry: SendResult | BaseException) -> SendResult:
    assert isinstance(entry, SendResult), entry
    return entry


def kind(entry: SendResult | BaseException) -> str:
    """``ok``, ``uncertain``, ``not-attempted`` or the refusal's ``<stage> <code>``."""
    if isinstance(entry, SendResult):
        return "ok" if len(entry.accepted) == len(entry.recipients) else "partial"
    if isinstance(entry, DeliveryUncertain):
        assert failure_of(entry).stage is Stage.AFTER_DOT
        assert failure_of(entry).possible_duplicate
        return "uncertain"
    if isinstance(entry, NotAttempted):
        return "not-attempted"
    f = failure_of(entry)
    return f"{f.stage} {f.code}"


# -- the happy path --------------------------------------------------------------------------

def test_many_messages_byte_exact_in_one_window(bdat_server: Any) -> None:
    server = bdat_server()
    envs = [Envelope("s@example.test", (f"r{i}@example.test",), body(i), message_id=f"m{i}")
            for i in range(20)]
    entries, conn = send(server, envs, pipeline_window=8)
    assert all(kind(e) == "ok" for e in entries)
    assert [t.content for t in server.txns] == [body(i) for i in range(20)]
    assert [t.bdat for t in server.txns] == [f"BDAT {len(body(i))} LAST" for i in range(20)]
    assert all(f"SIZE={len(body(i))}" in t.mail for i, t in enumerate(server.txns))
    assert "DATA" not in server.commands
    assert max(server.flights) == 8  # the first write carried a whole window
    assert conn.messages_sent == 20


@pytest.mark.parametrize("window", [1, 3, 8])
def test_never_more_than_the_window_in_flight(bdat_server: Any, window: int) -> None:
    server = bdat_server()
    entries, _ = send(server, [envelope(i) for i in range(12)], pipeline_window=window)
    assert all(kind(e) == "ok" for e in entries)
    assert max(server.flights) == window
    assert sum(server.flights) == 12


def test_prepare_for_bdat_normalises_line_ends_only() -> None:
    env = Envelope("s@example.test", ("r@example.test",), b".a\n.\r\nb\rc")
    p = prepare(env, {"size": "0"}, chunking=True)
    assert p.content == b".a\r\n.\r\nb\r\nc\r\n"
    assert p.mail == b"MAIL FROM:<s@example.test> SIZE=%d\r\n" % len(p.content)
    d = prepare(env, {"size": "0"})
    assert d.content == b"..a\r\n..\r\nb\r\nc\r\n.\r\n"  # DATA keeps its smuggling guards
    assert d.mail == p.mail


# -- refusals inside a window -------------------------------------------------------------

def test_refusals_mid_window_keep_their_transactions_apart(bdat_server: Any) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "MAIL" and n == 1:
            return b"550 5.1.8 bad sender\r\n"
        if verb == "RCPT" and n == 2:
            return b"550 5.1.1 no such user\r\n"
        if verb == "RCPT" and n == 3 and line.startswith("RCPT TO:<b"):
            return b"550 5.1.1 no b\r\n"
        return None

    server = bdat_server(script)
    envs = [envelope(0), envelope(1), envelope(2),
            envelope(3, ("a@example.test", "b@example.test", "c@example.test")), envelope(4)]
    entries, conn = send(server, envs, pipeline_window=8)
    assert [kind(e) for e in entries] == ["ok", "mail 550", "rcpt 550", "partial", "ok"]
    partial = ok(entries[3])
    assert [r.recipient for r in partial.accepted] == ["a@example.test", "c@example.test"]
    assert [(r.recipient, r.code, r.stage) for r in partial.refused] == [
        ("b@example.test", 550, Stage.RCPT)]
    assert isinstance(entries[1], smtplib.SMTPSenderRefused)
    assert isinstance(entries[2], smtplib.SMTPRecipientsRefused)
    assert "RSET" not in server.commands  # the BDAT LAST reply ended each transaction
    assert [t.content is not None for t in server.txns] == [True, False, False, True, True]
    assert conn.messages_sent == 3


@pytest.mark.parametrize("code", [451, 554])
def test_refusal_after_bdat_last(bdat_server: Any, code: int) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        return f"{code} 4.3.0 not now\r\n".encode() if verb == "BDAT" and n == 1 else None

    server = bdat_server(script)
    entries, _ = send(server, [envelope(i) for i in range(3)])
    assert [kind(e) for e in entries] == ["ok", f"after-dot {code}", "ok"]
    assert isinstance(entries[1], smtplib.SMTPDataError)


def test_452_split_goes_in_a_later_transaction(bdat_server: Any) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "RCPT" and n == 0 and line.startswith(("RCPT TO:<c", "RCPT TO:<d")):
            return b"452 4.5.3 too many recipients\r\n"
        return None

    server = bdat_server(script)
    rcpts = ("a@example.test", "b@example.test", "c@example.test", "d@example.test")
    entries, conn = send(server, [envelope(0, rcpts), envelope(1), envelope(2)],
                         pipeline_window=3)
    first = ok(entries[0])
    assert len(first.accepted) == 4 and first.transactions == 2
    assert all(kind(e) == "ok" for e in entries[1:])
    # envelopes 1 and 2 were in flight; the deferred recipients follow them
    assert [len(t.rcpts) for t in server.txns] == [4, 1, 1, 2]
    assert server.txns[3].rcpts == ["RCPT TO:<c@example.test>", "RCPT TO:<d@example.test>"]
    assert server.txns[3].content == server.txns[0].content
    assert conn.messages_sent == 4


# -- the connection failing with transactions in flight -------------------------------------

def test_disconnect_mid_window(bdat_server: Any) -> None:
    # window 3: 0, 1, 2 go out; 0 is answered and the server hangs up on 1's MAIL. After
    # reading 0 the client wrote 3; then reading 1 fails, so 4 and 5 were never written.
    server = bdat_server(lambda verb, n, line: CLOSE if verb == "MAIL" and n == 1 else None)
    entries, conn = send(server, [envelope(i) for i in range(6)], pipeline_window=3)
    assert [kind(e) for e in entries] == ["ok", "uncertain", "uncertain", "uncertain",
                                          "not-attempted", "not-attempted"]
    assert conn.is_closed


def test_disconnect_keeps_a_refusal_read_before_it(bdat_server: Any) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "MAIL" and n == 1:
            return b"550 5.7.1 no\r\n"
        return CLOSE if verb == "RCPT" and n == 1 else None

    server = bdat_server(script)
    entries, _ = send(server, [envelope(i) for i in range(4)], pipeline_window=8)
    assert [kind(e) for e in entries] == ["ok", "mail 550", "uncertain", "uncertain"]


def test_421_mid_window(bdat_server: Any) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        return b"421 4.3.2 shutting down\r\n" if verb == "MAIL" and n == 2 else None

    server = bdat_server(script)
    entries, conn = send(server, [envelope(i) for i in range(8)], pipeline_window=4)
    kinds = [kind(e) for e in entries]
    assert kinds[:3] == ["ok", "ok", "mail 421"]
    # 3 was written with 0-2 and never answered; 4 and 5 may have been written after 0 and
    # 1 were read (the client refills once it has read what already arrived), 6 and 7 not
    uncertain = kinds.count("uncertain")
    assert 1 <= uncertain <= 3
    assert kinds[3:] == ["uncertain"] * uncertain + ["not-attempted"] * (5 - uncertain)
    assert len(server.txns) == 3 + uncertain
    assert conn.is_closed


def test_421_after_bdat_last(bdat_server: Any) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        return b"421 4.3.2 bye\r\n" if verb == "BDAT" and n == 1 else None

    server = bdat_server(script)
    entries, _ = send(server, [envelope(i) for i in range(4)], pipeline_window=8)
    assert [kind(e) for e in entries] == ["ok", "after-dot 421", "uncertain", "uncertain"]


@pytest.mark.parametrize("bound", ["timeout", "deadline"])
def test_timeout_mid_window(bdat_server: Any, bound: str) -> None:
    gate = threading.Event()

    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "BDAT" and n == 1:
            gate.wait(10)  # never answers 1 while the client waits
        return None

    server = bdat_server(script)
    try:
        entries, _ = send(server, [envelope(i) for i in range(3)], pipeline_window=8,
                          **{bound: 0.5})
    finally:
        gate.set()
    assert [kind(e) for e in entries] == ["uncertain"] * 3  # replies are sent together


# -- the gate ---------------------------------------------------------------------------------

def test_gate_stops_mid_window(bdat_server: Any) -> None:
    asked: list[int] = []

    def gate(i: int) -> bool:
        asked.append(i)
        return i < 3

    server = bdat_server()
    entries, _ = send(server, [envelope(i) for i in range(6)], gate=gate, pipeline_window=8)
    assert [kind(e) for e in entries] == ["ok"] * 3 + ["not-attempted"] * 3
    assert asked == [0, 1, 2, 3]
    assert len(server.txns) == 3


def test_gate_asked_ahead_of_earlier_replies(bdat_server: Any) -> None:
    server = bdat_server()
    seen: list[tuple[int, int]] = []  # (envelope asked about, BDAT replies sent by then)
    entries, _ = send(server, [envelope(i) for i in range(5)], pipeline_window=2,
                      gate=lambda i: seen.append((i, sum(server.flights))) or True)
    assert all(kind(e) == "ok" for e in entries)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert seen[1][1] == 0  # envelope 1 started before any reply came back


# -- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["chunking=false", "pipelining=false"])
def test_options_turn_bdat_off(bdat_server: Any, option: str) -> None:
    server = bdat_server()
    key, value = option.split("=")
    entries, conn = send(server, [envelope(i) for i in range(3)], **{key: value})
    assert all(kind(e) == "ok" for e in entries)
    assert not conn.supports_chunking
    assert not any(c.startswith("BDAT") for c in server.commands)
    assert server.commands.count("DATA") == 3


def test_no_chunking_offered_means_data(bdat_server: Any) -> None:
    server = bdat_server(chunking=False)
    entries, _ = send(server, [envelope(i, body=b".dot\r\n") for i in range(2)])
    assert all(kind(e) == "ok" for e in entries)
    assert server.commands.count("DATA") == 2
    assert server.txns[0].content is not None and b"\r\n...dot\r\n" not in server.txns[0].content


def test_relay_options_are_validated() -> None:
    relay = parse_relay("r", "smtp://h?chunking=false&pipeline_window=3")
    assert (relay.chunking, relay.pipeline_window) == (False, 3)
    assert parse_relay("r", "smtp://h").pipeline_window == 8
    assert relay.key != parse_relay("r", "smtp://h?pipeline_window=3").key
    for bad in ("pipeline_window=0", "pipeline_window=101", "pipeline_window=x",
                "chunking=maybe"):
        with pytest.raises(InvalidRelayError, match=bad.split("=")[0]):
            parse_relay("r", f"smtp://h?{bad}")


def test_prepare_fast_checks_agree_with_the_plain_rules() -> None:
    """Every body over a small alphabet of troublemakers, up to 7 bytes: the fast checks
    in prepare() give exactly what the plain regex rules give."""
    import itertools
    import re

    eol, dot = re.compile(rb"\r\n|\r|\n"), re.compile(rb"(?m)^\.")
    for n in range(8):
        for chars in itertools.product(b"a\r\n.", repeat=n):
            raw = bytes(chars)
            crlf = eol.sub(b"\r\n", raw)
            if crlf and not crlf.endswith(b"\r\n"):
                crlf += b"\r\n"
            env = Envelope("s@example.test", ("r@example.test",), raw)
            assert prepare(env, {}, chunking=True).content == crlf, raw
            assert prepare(env, {}).content == dot.sub(b"..", crlf) + b".\r\n", raw


# -- against the test server (mailworker.testing, BDAT and its faults) -----------------------

def test_test_server_receives_bdat_byte_exact(make_server: Any) -> None:
    from .helpers import relay_for

    server = make_server(chunking=True)
    envs = [envelope(i, body=body(i)) for i in range(30)]
    entries, _ = send_over(relay_for(server, pipeline_window=5), envs)
    assert all(kind(e) == "ok" for e in entries)
    assert [m.data for m in server.messages] == [e.data for e in envs]
    assert sum(c.startswith("BDAT") for _, c in server.commands) == 30


def test_replies_sent_before_a_drop_are_read_after_a_failed_write(make_server: Any) -> None:
    """The server answers 0-3, then hangs up after reading 4's content: the client's next
    write fails, but the replies already sent still decide 0-3; only what was in flight
    from 4 on is uncertain, at most a window of it."""
    from mailworker.testing import Fault

    from .helpers import relay_for

    server = make_server(chunking=True)
    server.add_fault(Fault.drop_after_dot(nth=5, times=1))
    envs = [envelope(i, body=b"body line\r\n" * 300) for i in range(40)]
    conn = Connection(relay_for(server, pipeline_window=8))
    conn.open()
    entries = conn.send_many(envs)
    kinds = [kind(e) for e in entries]
    assert kinds[:5] == ["ok"] * 4 + ["uncertain"]
    uncertain = kinds.count("uncertain")
    assert uncertain <= 8
    assert kinds[4:] == ["uncertain"] * uncertain + ["not-attempted"] * (36 - uncertain)
    acknowledged = [m.message_id for m in server.messages if m.acknowledged]
    assert acknowledged == [f"<m{i}@example.test>" for i in range(4)]


def test_one_reply_log_event_per_reply_in_order(bdat_server: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mailworker.smtp.replylog import ReplyLog

    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(ReplyLog, "on_reply", lambda relay, command, code: seen.append(
        (command, code)))
    server = bdat_server(lambda verb, n, line: b"550 5.1.1 no\r\n"
                         if verb == "RCPT" and "b@" in line else None)
    envs = [envelope(i, ("a@example.test", "b@example.test")) for i in range(3)]
    entries, _ = send(server, envs, pipeline_window=2)
    assert all(kind(e) == "partial" for e in entries)
    size = len(prepare(envs[0], {}, chunking=True).content)
    per_message = [(f"MAIL FROM:<sender@example.test> SIZE={size}", 250),
                   ("RCPT TO:<a@example.test>", 250), ("RCPT TO:<b@example.test>", 550),
                   (f"BDAT {size} LAST", 250)]
    transactions = [s for s in seen if s[0].split(" ", 1)[0] in ("MAIL", "RCPT", "BDAT")]
    assert transactions == per_message * 3


def test_pool_send_of_one_message_uses_bdat(make_server: Any) -> None:
    from mailworker.smtp import Pool

    from .helpers import relay_for

    server = make_server(chunking=True)
    pool = Pool(relay_for(server))
    try:
        result = pool.send(envelope(0))
    finally:
        pool.close()
    assert len(result.accepted) == 1
    assert [c.split(" ", 1)[0] for _, c in server.commands][-4:-1] == ["MAIL", "RCPT", "BDAT"]


def test_large_messages_go_in_writes_of_bounded_size(make_server: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mailworker.smtp import chunking

    from .helpers import relay_for

    monkeypatch.setattr(chunking, "WRITE_BYTES", 100_000)
    server = make_server(chunking=True)
    envs = [envelope(i, body=(b"%d" % i) * 70_000 + b"\r\n") for i in range(5)]
    conn = Connection(relay_for(server, pipeline_window=8))
    conn.open()
    writes: list[int] = []
    client = conn._client
    assert client is not None
    real = client.write
    monkeypatch.setattr(client, "write", lambda data, **kw: (writes.append(len(data)),
                                                             real(data, **kw))[1])
    try:
        entries = conn.send_many(envs)
    finally:
        conn.close()
    assert all(kind(e) == "ok" for e in entries)
    assert [m.data for m in server.messages] == [e.data for e in envs]
    assert max(writes) < 100_000 + 80_000  # never more than one transaction past the bound


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_bdat_over_tls(make_server: Any, tls: str) -> None:
    from .helpers import relay_for

    server = make_server(chunking=True, tls=tls)
    envs = [envelope(i, body=body(i) * 50) for i in range(12)]
    conn = Connection(relay_for(server, pipeline_window=4))
    conn.open()
    try:
        assert conn.encrypted and conn.supports_chunking
        entries = conn.send_many(envs)
    finally:
        conn.close()
    assert all(kind(e) == "ok" for e in entries)
    assert [m.data for m in server.messages] == [e.data for e in envs]
