"""Adversarial review of BDAT pipelining: "deliver once, never stall" against hostile relays.

Each test is a finding's repro (or a confirmation that a suspected hole holds): which
transactions are uncertain, NotAttempted or refused when a relay misbehaves at every
position of a window, and that nothing possibly sent is ever sent again without the
uncertainty travelling with it.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailworker.smtp import (
    Connection,
    DeliveryUncertain,
    Envelope,
    NotAttempted,
    Pool,
    SendResult,
    Stage,
    failure_of,
)
from mailworker.smtp.connection import prepare

from .helpers import envelope, relay_for
from .test_bdat import CLOSE, BdatServer, bdat_server, kind, send, send_over

__all__ = ["bdat_server"]  # the fixture, re-used from test_bdat


def copies(server: Any) -> dict[str, int]:
    """How many times the test server recorded each Message-ID."""
    out: dict[str, int] = {}
    for m in server.messages:
        out[m.message_id] = out.get(m.message_id, 0) + 1
    return out


# -- a reply to the first MAIL of a window on a reused connection ------------------------------

def test_pool_never_resends_a_window_it_marked_uncertain(make_server: Any) -> None:
    """A 421 to the first MAIL of a window looks like a stale connection, but the rest of
    the window was written (content included): those transactions are uncertain and the
    pool must not send them again on a fresh connection as if nothing had gone out."""
    from mailworker.testing import Fault

    server = make_server(chunking=True)
    # The 2nd MAIL the server sees (the first of the second batch) gets 421, but the server
    # carries on (a hostile relay): the rest of that window is taken and queued.
    server.add_fault(Fault.reply("MAIL", 421, "4.3.2 busy", nth=2, times=1))
    pool = Pool(relay_for(server, pipeline_window=8))
    try:
        assert isinstance(pool.send(envelope(100)), SendResult)
        entries = pool.send_many([envelope(i) for i in range(4)])
    finally:
        pool.close()
    counts = copies(server)
    for i, entry in enumerate(entries):
        mid = f"<m{i}@example.test>"
        if isinstance(entry, SendResult):  # reported delivered: exactly once, unflagged
            assert counts.get(mid, 0) == 1, (i, counts)
        else:
            assert counts.get(mid, 0) <= 1
    assert kind(entries[0]) == "mail 421"
    assert [kind(e) for e in entries[1:]] == ["uncertain"] * 3


# -- a 452 split waiting while the connection dies ------------------------------------------------

def test_split_part_not_written_keeps_the_accepted_part(bdat_server: Any) -> None:
    """Envelope 0: a accepted, b 452 (split into a later transaction). The connection dies
    on message 1 before the split part goes out: envelope 0 must not be NotAttempted (the
    caller would send it again, a second copy for a) but a failure that carries a's
    acceptance, with b left to retry."""
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "RCPT" and n == 0 and "b@" in line:
            return b"452 4.5.3 too many recipients\r\n"
        return CLOSE if verb == "RCPT" and n == 1 else None

    server = bdat_server(script)
    envs = [envelope(0, ("a@example.test", "b@example.test")), envelope(1), envelope(2)]
    entries, _ = send(server, envs, pipeline_window=2)
    first = entries[0]
    assert not isinstance(first, NotAttempted), first
    assert isinstance(first, BaseException)
    partial = failure_of(first).partial
    assert partial is not None
    assert [r.recipient for r in partial.accepted] == ["a@example.test"]
    assert kind(entries[1]) == "uncertain"
    assert kind(entries[2]) == "not-attempted"


# -- the stale pooled connection --------------------------------------------------------------

def test_idle_connection_proves_itself_before_content(bdat_server: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The server closes an idle connection just as the next window is written (the race
    the idle poll cannot see). After an idle spell the first transaction's MAIL and RCPT go
    out alone and the MAIL reply is read before any content: the failure is a clean
    "stale connection" (nothing sent), not a window of possible duplicates."""
    from mailworker.smtp import chunking

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)
    batches = [0]

    def script(verb: str, n: int, line: str) -> bytes | None:
        return CLOSE if verb == "MAIL" and n == 1 else None

    server = bdat_server(script)
    conn = Connection(server.relay(pipeline_window=8))
    conn.open()
    try:
        assert kind(conn.send_many([envelope(0)])[0]) == "ok"
        batches[0] += 1
        entries = conn.send_many([envelope(i) for i in range(1, 5)])
    finally:
        conn.close()
    first = entries[0]
    assert isinstance(first, BaseException)
    assert failure_of(first).stage is Stage.MAIL
    assert not isinstance(first, DeliveryUncertain | NotAttempted)
    assert [kind(e) for e in entries[1:]] == ["not-attempted"] * 3
    assert [t.bdat for t in server.txns] == [server.txns[0].bdat, ""]  # no BDAT after idle


def test_probe_after_idle_still_pipelines_and_decides(bdat_server: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With the probe, a batch after an idle spell is still byte-exact, MAIL refusals and
    RCPT refusals of the probed transaction are kept apart, and one reply-log event per reply."""
    from mailworker.smtp import chunking

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)

    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "MAIL" and n == 1:
            return b"550 5.7.1 not you\r\n"
        if verb == "RCPT" and n == 2 and "b@" in line:
            return b"550 5.1.1 no such user\r\n"
        return None

    server = bdat_server(script)
    envs = [envelope(i, ("a@example.test", "b@example.test")) for i in range(5)]
    conn = Connection(server.relay(pipeline_window=3))
    conn.open()
    try:
        first = conn.send_many(envs[:1])
        second = conn.send_many(envs[1:3])
        third = conn.send_many(envs[3:])
    finally:
        conn.close()
    kinds = [kind(e) for e in (*first, *second, *third)]
    assert kinds == ["ok", "mail 550", "partial", "ok", "ok"]
    assert [t.content for t in server.txns if t.content is not None] == [
        prepare(e, {}, chunking=True).content for e in (envs[0], envs[2], envs[3], envs[4])]


def test_pool_retries_a_stale_window_cleanly_after_the_probe(
        make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race through the pool: the probe's failure is "stale", the batch goes again
    on a fresh connection, every message exactly once and none flagged."""
    from mailworker.smtp import chunking
    from mailworker.testing import Fault

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)
    server = make_server(chunking=True)
    server.add_fault(Fault.disconnect("MAIL", code=None, nth=2, times=1))
    pool = Pool(relay_for(server, pipeline_window=8))
    try:
        assert isinstance(pool.send(envelope(100)), SendResult)
        entries = pool.send_many([envelope(i) for i in range(5)])
        stale = pool.stats().discarded_stale
    finally:
        pool.close()
    assert [kind(e) for e in entries] == ["ok"] * 5
    assert stale == 1
    assert copies(server) == {f"<m{i}@example.test>": 1 for i in (100, 0, 1, 2, 3, 4)}


# -- the write side: a server that stops reading -----------------------------------------------

def test_server_that_stops_reading_bounds_the_window(bdat_server: Any) -> None:
    """The server reads a little and then nothing: the window's write blocks. It must end
    within the write bound; what was (possibly) written is uncertain, the rest untouched."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.sendall(b"220 stuck ESMTP\r\n")
            buf = b""
            while b"\n" not in buf:
                buf += conn.recv(1024)
            conn.sendall(b"250-stuck\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
            stop.wait(30)  # never reads again

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    from mailworker.relay import parse_relay

    relay = parse_relay("stuck", f"smtp://127.0.0.1:{port}?tls=none&timeout=0.5"
                        "&connect_timeout=5&deadline=10&pipeline_window=4")
    envs = [envelope(i, body=b"x" * 998 + b"\r\n" * 1 + b"y\r\n" * 1_500_000) for i in range(6)]
    conn = Connection(relay)
    conn.open()
    try:
        entries = conn.send_many(envs)
    finally:
        stop.set()
        conn.close()
        listener.close()
        thread.join(5)
    _after_a_stalled_write([kind(e) for e in entries])
    assert conn.is_closed


def _after_a_stalled_write(kinds: list[str]) -> int:
    """Uncertain: what the kernel took in full (the server may have read it); then those
    whose content was cut by the stalled write (the server cannot have them: a connection
    failure at DATA, sent again without a duplicate flag); then the unwritten. Returns how
    many are uncertain."""
    uncertain, cut = kinds.count("uncertain"), kinds.count("data None")
    assert cut >= 1, kinds  # the write that timed out carried at least one
    assert kinds == (["uncertain"] * uncertain + ["data None"] * cut
                     + ["not-attempted"] * (len(kinds) - uncertain - cut)), kinds
    return uncertain


# -- replies the client did not ask for, and odd segmentation ---------------------------------

def test_extra_reply_never_lets_the_connection_be_reused_in_step(bdat_server: Any) -> None:
    """A server that sends one reply too many: the next batch on that connection must not
    run with its replies out of step (nothing of it is written; a clean stale failure)."""
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "BDAT" and n == 0:
            return b"250 2.0.0 queued\r\n250 2.0.0 and once more\r\n"
        return None

    server = bdat_server(script)
    conn = Connection(server.relay(pipeline_window=4))
    conn.open()
    try:
        assert kind(conn.send_many([envelope(0)])[0]) == "ok"
        entries = conn.send_many([envelope(1), envelope(2)])
    finally:
        conn.close()
    assert failure_of(entries[0]).stage is Stage.MAIL
    assert not isinstance(entries[0], DeliveryUncertain)
    assert kind(entries[1]) == "not-attempted"
    assert len(server.txns) == 1


class _Dribble:
    """A server socket whose writes go out one byte per segment."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def sendall(self, data: bytes) -> None:
        for i in range(len(data)):
            self._conn.send(data[i:i + 1])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class DribbleServer(BdatServer):
    def _converse(self, conn: socket.socket) -> None:
        super()._converse(_Dribble(conn))  # type: ignore[arg-type]


def test_multiline_replies_in_one_byte_segments() -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "RCPT" and "b@" in line:
            return b"550-5.1.1 first line\r\n550-5.1.1 second line\r\n550 5.1.1 no\r\n"
        if verb == "BDAT":
            return b"250-2.0.0 queued\r\n250 2.0.0 as Q\r\n"
        return None

    server = DribbleServer(script)
    try:
        envs = [envelope(i, ("a@example.test", "b@example.test")) for i in range(4)]
        entries, _ = send(server, envs, pipeline_window=3)
    finally:
        server.close()
    assert [kind(e) for e in entries] == ["partial"] * 4
    refused = [r for e in entries if isinstance(e, SendResult)
               for r in e.recipients if r.code == 550]
    assert len(refused) == 4
    assert all("second line" in r.text for r in refused)


# -- gate, window 1, bodies --------------------------------------------------------------------

def test_gate_raising_mid_window_stops_cleanly(bdat_server: Any) -> None:
    def gate(i: int) -> bool:
        if i == 2:
            raise RuntimeError("lease lost")
        return True

    server = bdat_server()
    entries, _ = send(server, [envelope(i) for i in range(5)], gate=gate, pipeline_window=8)
    assert [kind(e) for e in entries] == ["ok", "ok"] + ["not-attempted"] * 3
    assert len(server.txns) == 2


def test_window_of_one_is_one_transaction_at_a_time(bdat_server: Any) -> None:
    def script(verb: str, n: int, line: str) -> bytes | None:
        return CLOSE if verb == "BDAT" and n == 2 else None

    server = bdat_server(script)
    entries, _ = send(server, [envelope(i) for i in range(5)], pipeline_window=1)
    assert [kind(e) for e in entries] == ["ok", "ok", "uncertain", "not-attempted",
                                          "not-attempted"]
    assert len(server.txns) == 3


@pytest.mark.parametrize("data", [b"", b"no final line end", b"a\nb\rc\r\n.\r\n", b"\r\n"])
def test_size_and_bdat_count_agree(bdat_server: Any, data: bytes) -> None:
    server = bdat_server()
    env = Envelope("s@example.test", ("r@example.test",), data, message_id="m0")
    entries, _ = send(server, [env])
    assert kind(entries[0]) == "ok"
    txn = server.txns[0]
    size = int(txn.mail.split("SIZE=")[1].split()[0])
    assert txn.bdat == f"BDAT {size} LAST"
    assert txn.content is not None and len(txn.content) == size
    assert txn.content == (b"" if not data else prepare(env, {}, chunking=True).content)


def test_size_refusal_before_sending_and_utf8_params(bdat_server: Any) -> None:
    server = bdat_server()
    big = Envelope("s@example.test", ("r@example.test",), b"x" * 11_000_000 + b"\r\n")
    utf8 = Envelope("s@example.test", ("r@example.test",), "Subject: é\r\n\r\nü\r\n".encode())
    entries, _ = send(server, [envelope(0), big, utf8])
    assert [kind(e) for e in entries] == ["ok", "mail 552", "ok"]
    assert len(server.txns) == 2
    assert "BODY=8BITMIME" not in server.txns[1].mail  # not offered by this server
    assert server.txns[1].content == "Subject: é\r\n\r\nü\r\n".encode()


# -- every failure at every position of a window -----------------------------------------------

_POSITIONS = 4 * 4  # 4 messages x (MAIL, 2 RCPT, BDAT)


@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("how", ["eof", "421"])
@pytest.mark.parametrize("at", range(_POSITIONS))
def test_failure_at_every_position(bdat_server: Any, window: int, how: str, at: int) -> None:
    """The server fails at the at-th command of the conversation (a hang-up without a
    reply, or a 421 then a hang-up). Whatever the client wrote is never NotAttempted; a
    message the server took is ok (reply read) or uncertain, never refused or unsent; a
    refusal is only ever the server's own reply."""
    _failure_at(bdat_server, window, how, at, probe=False)


@pytest.mark.parametrize("how", ["eof", "421"])
@pytest.mark.parametrize("at", range(_POSITIONS))
def test_failure_at_every_position_after_idle(bdat_server: Any, monkeypatch: pytest.MonkeyPatch,
                                              how: str, at: int) -> None:
    """The same with the probe (the batch follows an idle spell): a failure at the first
    MAIL is a clean failure at MAIL with nothing else written."""
    from mailworker.smtp import chunking

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)
    _failure_at(bdat_server, 3, how, at, probe=True)


def _failure_at(bdat_server: Any, window: int, how: str, at: int, *, probe: bool) -> None:
    seen = [0]
    hung = [False]

    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb not in ("MAIL", "RCPT", "BDAT"):
            return None
        k, seen[0] = seen[0], seen[0] + 1
        if hung[0] or (how == "eof" and k == at):
            hung[0] = True
            return CLOSE
        if how == "421" and k == at:
            hung[0] = True  # the next command (if any) finds it gone
            return b"421 4.3.2 closing\r\n"
        return None

    server = bdat_server(script)
    envs = [envelope(i, ("a@example.test", "b@example.test"), sender=f"s{i}@example.test")
            for i in range(4)]
    entries, conn = send(server, envs, pipeline_window=window)
    assert conn.is_closed
    by_sender = {t.mail.split("<", 1)[1].split(">", 1)[0]: t for t in server.txns}
    failed_at = at // 4  # the message whose command failed
    for i, entry in enumerate(entries):
        txn = by_sender.get(f"s{i}@example.test")
        k = kind(entry)
        if txn is not None:  # the client wrote it: never NotAttempted
            assert k != "not-attempted", (i, entries)
        if probe and at == 0:  # the probe's MAIL: nothing but MAIL and RCPT was written
            assert k == ("mail 421" if how == "421" else "mail None") if i == 0 else (
                k == "not-attempted" and txn is None), (i, k)
        elif i < failed_at:
            assert k == "ok", (i, k)  # every reply before the failure was read
        elif i == failed_at and how == "421":
            # A 421 to MAIL or to BDAT LAST decides; one to a RCPT refuses that recipient,
            # but the content went out behind it: the other recipient is uncertain.
            expected = ["mail 421", "uncertain", "uncertain", "after-dot 421"][at % 4]
            assert k == expected, (i, k)
            if expected == "uncertain":
                partial = failure_of(entries[i]).partial
                assert partial is not None
                codes = {r.recipient: r.code for r in partial.recipients}
                assert codes["a@example.test" if at % 4 == 1 else "b@example.test"] == 421
        elif i == failed_at:
            assert k == "uncertain", (i, k)  # its BDAT may have been written
        else:
            assert k in ("uncertain", "not-attempted"), (i, k)
            if txn is not None and txn.bdat:
                assert k == "uncertain"
    if window == 1:  # nothing written past the failed one
        assert len(server.txns) == failed_at + 1


# -- 452 splits inside a window ----------------------------------------------------------------

def test_452_split_inside_a_window_with_refusals(bdat_server: Any) -> None:
    """Envelope 0: a ok, b 550, c and d 452. The split (c, d) goes after the transactions
    already in flight, without asking the gate again; the split itself gets d 452 again:
    a third transaction. Every BDAT LAST counts toward max_messages."""
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb != "RCPT":
            return None
        if "b@" in line:
            return b"550 5.1.1 no such user\r\n"
        if ("c@" in line and n == 0) or ("d@" in line and n in (0, 3)):
            return b"452 4.5.3 too many recipients\r\n"
        return None

    asked: list[int] = []
    server = bdat_server(script)
    envs = [envelope(0, ("a@example.test", "b@example.test", "c@example.test", "d@example.test")),
            envelope(1), envelope(2)]
    conn = Connection(server.relay(pipeline_window=4))
    conn.open()
    try:
        entries = conn.send_many(envs, gate=lambda i: asked.append(i) or True)
        dots = conn.messages_sent
    finally:
        conn.close()
    assert asked == [0, 1, 2]
    first = entries[0]
    assert isinstance(first, SendResult)
    assert first.transactions == 3
    assert {r.recipient: r.code for r in first.recipients} == {
        "a@example.test": 250, "b@example.test": 550, "c@example.test": 250,
        "d@example.test": 250}
    assert [kind(e) for e in entries[1:]] == ["ok", "ok"]
    assert [len(t.rcpts) for t in server.txns] == [4, 1, 1, 2, 1]
    assert all(t.content is not None for t in server.txns)
    assert dots == 5


def test_split_after_a_refused_bdat_is_still_sent(bdat_server: Any) -> None:
    """452s in a transaction whose BDAT LAST is refused: the 452 recipients still get their
    own transaction, as on the DATA path (there the split is made at the 354, before the
    dot's reply); they never had the message, so no copy is doubled. Here it 452s again:
    they keep a temporary refusal."""
    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb == "RCPT" and "b@" in line:
            return b"452 4.5.3 too many recipients\r\n"
        if verb == "BDAT" and n == 0:
            return b"554 5.7.1 content rejected\r\n"
        return None

    server = bdat_server(script)
    envs = [envelope(0, ("a@example.test", "b@example.test")), envelope(1)]
    entries, _ = send(server, envs, pipeline_window=4)
    assert kind(entries[0]) == "after-dot 554"
    partial = failure_of(entries[0]).partial
    assert partial is not None
    assert {r.recipient: r.code for r in partial.recipients} == {
        "a@example.test": 554, "b@example.test": 452}
    assert kind(entries[1]) == "ok"
    assert [len(t.rcpts) for t in server.txns] == [2, 1, 1]


# -- the pool after a failed window, max_messages --------------------------------------------------

def test_pool_never_reuses_a_connection_after_a_failed_window(make_server: Any) -> None:
    from mailworker.testing import Fault

    server = make_server(chunking=True)
    server.add_fault(Fault.drop_after_dot(nth=3, times=1))
    pool = Pool(relay_for(server, pipeline_window=8))
    try:
        first = pool.send_many([envelope(i) for i in range(6)])
        second = pool.send_many([envelope(i) for i in range(10, 14)])
        opened = pool.stats().opened
    finally:
        pool.close()
    kinds = [kind(e) for e in first]
    assert kinds[:3] == ["ok", "ok", "uncertain"]
    assert set(kinds[3:]) <= {"uncertain", "not-attempted"}
    assert [kind(e) for e in second] == ["ok"] * 4
    assert opened == 2


def test_max_messages_splits_a_batch_across_connections(make_server: Any) -> None:
    server = make_server(chunking=True)
    pool = Pool(relay_for(server, pipeline_window=8, max_messages=5))
    try:
        entries = pool.send_many([envelope(i) for i in range(12)])
        opened = pool.stats().opened
    finally:
        pool.close()
    assert [kind(e) for e in entries] == ["ok"] * 12
    assert opened == 3
    assert copies(server) == {f"<m{i}@example.test>": 1 for i in range(12)}


class _StallingServer:
    """Answers every command at once; from the ``stall_at``-th MAIL on it reads nothing
    more (a content filter stuck on a message, a full disk) but keeps the connection."""

    def __init__(self, stall_at: int, refuse_mail: set[int], *, slow: bool = False) -> None:
        self.stall_at, self.refuse_mail = stall_at, refuse_mail
        self.slow = slow  # read content at about 8 MB/s (400 KB every 50 ms), never stalled
        self.stop = threading.Event()
        self._listener = socket.socket()
        # A fixed receive buffer (inherited by the accepted socket): loopback autotuning
        # may otherwise grow it to tcp_rmem's maximum (32 MB on some hosts), and a stalled
        # server would then still absorb the whole window: no write would ever stall.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._converse()
        except (ConnectionResetError, BrokenPipeError):
            return  # the client closed with bytes unread (its RST): the test's business

    def _converse(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.sendall(b"220 stall ESMTP\r\n")
            buf, mails = b"", -1
            while True:
                while b"\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                line, buf = buf.split(b"\n", 1)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-stall\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                elif verb == b"MAIL":
                    mails += 1
                    if mails == self.stall_at:
                        self.stop.wait(30)
                        return
                    conn.sendall(b"550 5.7.1 no\r\n" if mails in self.refuse_mail
                                 else b"250 ok\r\n")
                elif verb == b"BDAT":
                    size, chunk = int(line.split()[1]), bytearray(buf)
                    while len(chunk) < size:
                        data = conn.recv(400_000 if self.slow else 1 << 20)
                        if not data:
                            return
                        chunk += data
                        if self.slow:
                            self.stop.wait(0.05)
                    buf = bytes(chunk[size:])
                    conn.sendall(b"503 5.5.1 need MAIL\r\n" if mails in self.refuse_mail
                                 else b"250 2.0.0 queued\r\n")
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.stop.set()
        self._listener.close()
        self._thread.join(5)


def _send_over_a_slow_link(monkeypatch: pytest.MonkeyPatch, options: str,
                           envs: list[Envelope]) -> list[Any]:
    """*envs* to a server reading about 8 MB/s, with small client socket buffers, so that
    the write itself waits on the server (not the kernel's buffers, which the reply wait
    would pay for)."""
    from mailworker.relay import parse_relay
    from mailworker.smtp import connection

    real = connection._no_delay

    def small_buffers(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        real(sock)

    monkeypatch.setattr(connection, "_no_delay", small_buffers)
    server = _StallingServer(stall_at=10**9, refuse_mail=set(), slow=True)
    relay = parse_relay("slow", f"smtp://127.0.0.1:{server.port}?tls=none&{options}")
    conn = Connection(relay)
    conn.open()
    try:
        return list(conn.send_many(envs))
    finally:
        conn.close()
        server.close()


def test_write_stall_keeps_the_replies_already_received() -> None:
    """The server answered messages 0 (MAIL refused) and 1 (queued), then stopped reading
    while the client was still writing the window: the write times out, but 0 and 1 are
    decided by what the server said; only what followed is uncertain."""
    from mailworker.relay import parse_relay

    server = _StallingServer(stall_at=2, refuse_mail={0})
    relay = parse_relay("stall", f"smtp://127.0.0.1:{server.port}?tls=none&timeout=1"
                        "&connect_timeout=5&deadline=10&pipeline_window=4")
    envs = [envelope(i, body=b"z" * 998 + b"\r\n" * 2_000_000) for i in range(6)]
    try:
        entries, _ = send_over(relay, envs)
    finally:
        server.close()
    kinds = [kind(e) for e in entries]
    assert kinds[:2] == ["mail 550", "ok"], kinds
    _after_a_stalled_write(kinds[2:])  # uncertain: only what the kernel took in full
    assert any("could not write 1 BDAT transaction(s)" in str(e) for e in entries)


def test_probe_over_starttls_byte_exact(make_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailworker.smtp import chunking

    from .test_bdat import body

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)
    server = make_server(chunking=True, tls="starttls")
    envs = [envelope(i, body=body(i) * 20) for i in range(9)]
    conn = Connection(relay_for(server, pipeline_window=4))
    conn.open()
    try:
        assert conn.encrypted and conn.supports_chunking
        entries = [*conn.send_many(envs[:1]), *conn.send_many(envs[1:5]),
                   *conn.send_many(envs[5:], gate=lambda i: i < 3)]
    finally:
        conn.close()
    assert [kind(e) for e in entries] == ["ok"] * 8 + ["not-attempted"]
    assert [m.data for m in server.messages] == [e.data for e in envs[:8]]


def test_smtputf8_and_8bitmime_with_bdat(make_server: Any) -> None:
    server = make_server(chunking=True)
    data = "From: s@example.test\r\nSubject: é\r\nMessage-ID: <u@example.test>\r\n\r\nü\r\n"
    env = Envelope("s@example.test", ("jörg@example.test",), data.encode(), message_id="u")
    conn = Connection(relay_for(server))
    conn.open()
    try:
        assert {"smtputf8", "8bitmime"} <= set(conn.capabilities)
        entries = conn.send_many([env, envelope(1)])
    finally:
        conn.close()
    assert [kind(e) for e in entries] == ["ok", "ok"]
    mails = [c for _, c in server.commands if c.upper().startswith("MAIL")]
    assert mails[0].endswith(" BODY=8BITMIME SMTPUTF8")
    assert "BODY" not in mails[1] and "SMTPUTF8" not in mails[1]
    assert server.messages[0].data == data.encode()


def test_drop_in_the_middle_of_a_chunk(make_server: Any) -> None:
    """The server hangs up halfway through message 2's chunk: 0 and 1 were answered; 2 is
    uncertain only if its write had finished (the client cannot tell the kernel's buffer
    from the server's), a message whose write was cut is a plain connection failure."""
    from mailworker.testing import Fault

    server = make_server(chunking=True)
    server.add_fault(Fault.drop_during_data(nth=3, times=1))
    envs = [envelope(i, body=b"w" * 900 + b"\r\n" * 1_000_000) for i in range(6)]
    entries, _ = send_over(relay_for(server, pipeline_window=4), envs)
    kinds = [kind(e) for e in entries]
    assert kinds[:2] == ["ok", "ok"], kinds
    uncertain, cut = kinds.count("uncertain"), kinds.count("data None")
    assert kinds[2:] == (["uncertain"] * uncertain + ["data None"] * cut
                         + ["not-attempted"] * (4 - uncertain - cut)), kinds
    assert copies(server) == {"<m0@example.test>": 1, "<m1@example.test>": 1}


def test_a_large_message_on_a_slow_link_is_not_a_timeout(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """``timeout`` bounds a stall, not a whole write: a server that keeps reading, only
    slower than the body takes to write in ``timeout``, gets the message (the transaction
    ``deadline`` still bounds the whole). Small socket buffers, so that the write itself
    waits on the server (not the kernel's buffers, which the reply wait would pay for)."""
    envs = [envelope(i, body=b"s" * 998 + b"\r\n" * 2_000_000) for i in range(2)]
    entries = _send_over_a_slow_link(
        monkeypatch, "timeout=0.5&connect_timeout=5&deadline=30&pipeline_window=2", envs)
    assert [kind(e) for e in entries] == ["ok", "ok"]


# -- the probe and the splits against a real Postfix smtpd ------------------------------------

def _postfix_missing() -> str | None:
    from ._postfix import postfix_missing

    return postfix_missing()


@pytest.mark.integration
@pytest.mark.skipif(_postfix_missing() is not None, reason=_postfix_missing() or "")
def test_probe_and_splits_against_postfix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch probed (PROBE_IDLE 0): a refused sender, a refused recipient and a 452
    split (Postfix's recipient limit 3) in the probed transaction and behind it; what
    Postfix passes on is byte-exact, each message once."""
    from mailworker.relay import parse_relay
    from mailworker.smtp import chunking

    from ._postfix import Postfix, PostfixConfig, content_of

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)
    config = PostfixConfig(refuse_recipients={"gone@example.com": "550 5.1.1 No such user"},
                           refuse_senders={"spammer@example.com": "553 5.7.1 Not from you"},
                           recipient_limit=3)
    many = tuple(f"r{j}@example.com" for j in range(5))
    envs = [
        envelope(0, ("a@example.com",), sender="app@example.com"),
        envelope(1, ("a@example.com",), sender="spammer@example.com"),
        envelope(2, ("gone@example.com", "b@example.com"), sender="app@example.com"),
        envelope(3, many, sender="app@example.com"),
        envelope(4, ("c@example.com",), sender="spammer@example.com"),
        envelope(5, many, sender="app@example.com"),
    ]
    with Postfix(config) as pf:
        conn = Connection(parse_relay("postfix", pf.dsn(timeout=10, connect_timeout=5,
                                                         deadline=60, pipeline_window=4)))
        conn.open()
        try:
            entries = [*conn.send_many(envs[1:2]), *conn.send_many(envs[2:4]),
                       *conn.send_many(envs[4:]), *conn.send_many(envs[:1])]
        finally:
            conn.close()
        got = [content_of(m.data) for m in pf.capture.messages]
    order = [envs[i] for i in (1, 2, 3, 4, 5, 0)]
    kinds = [kind(e) for e in entries]
    assert kinds == ["mail 553", "partial", "ok", "mail 553", "ok", "ok"], kinds
    split = entries[2]
    assert isinstance(split, SendResult) and split.transactions == 2
    # Postfix's proxy passes each transaction on: 2 (b), 3 twice (3 + 2 recipients), 5
    # twice, 0: the same bytes each time.
    assert sorted(got) == sorted([order[1].data, order[2].data, order[2].data,
                                  order[4].data, order[4].data, order[5].data])


def test_tls_write_stall_never_calls_a_delivered_message_cut(make_server: Any) -> None:
    """Over TLS a send() that times out may already have pushed whole records of its buffer
    to the server (OpenSSL reports all or nothing). The server took message 0 and answered
    it, then hung before reading message 1's chunk: message 0 must come out delivered (its
    reply was there), never as a cut write that would be sent again unflagged."""
    from mailworker.testing import Fault

    server = make_server(chunking=True, tls="starttls")
    server.add_fault(Fault.delay("BDAT", seconds=20, nth=2, times=1))
    # 0 is small, so that its end and all of 1 (large) go in the same write: one send()
    envs = [envelope(i, body=b"t" * 998 + b"\r\n" * (100_000 if i == 0 else 3_000_000))
            for i in range(4)]
    conn = Connection(relay_for(server, pipeline_window=8, timeout=1))
    conn.open()
    try:
        assert conn.encrypted
        entries = conn.send_many(envs)
    finally:
        conn.close()
    kinds = [kind(e) for e in entries]
    recorded = copies(server)
    for i, k in enumerate(kinds):
        if recorded.get(f"<m{i}@example.test>"):
            assert k in ("ok", "uncertain"), (i, kinds)
    assert kinds[0] == "ok", kinds


# -- any mix of replies and failures (property) -------------------------------------------------

_ANSWERS = {
    "MAIL": [None] * 6 + [b"550 5.7.1 no\r\n", b"421 4.3.2 bye\r\n", CLOSE],
    "RCPT": [None] * 6 + [b"550 5.1.1 no\r\n", b"452 4.5.3 later\r\n", b"421 4.3.2 bye\r\n",
                          CLOSE],
    "BDAT": [None] * 6 + [b"554 5.7.1 no\r\n", b"451 4.3.0 later\r\n", b"421 4.3.2 bye\r\n",
                          CLOSE],
}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(picks=st.lists(st.integers(0, 9), min_size=60, max_size=60),
       window=st.sampled_from([1, 2, 3, 8]), probe=st.booleans())
def test_any_mix_of_replies_and_failures(picks: list[int], window: int, probe: bool) -> None:
    """Random replies and failures (a hostile server that carries on after its 421) over 5
    messages of 2 recipients, with 452 splits. Whatever happens: the client never reports a
    recipient accepted that the server did not queue it for; a recipient the server queued
    is reported accepted, or its message is uncertain; a message whose MAIL reached the
    server is never NotAttempted."""
    calls = iter(picks)
    taken: dict[int, set[str]] = {}  # server transaction -> recipients it accepted
    server: BdatServer

    def script(verb: str, n: int, line: str) -> bytes | None:
        if verb not in _ANSWERS:
            return None
        answer = _ANSWERS[verb][next(calls, 0) % len(_ANSWERS[verb])]
        if verb == "RCPT" and answer is None:
            taken.setdefault(n, set()).add(line.split("<", 1)[1].split(">", 1)[0])
        return answer

    from mailworker.smtp import chunking

    server = BdatServer(script)
    saved, chunking.PROBE_IDLE = chunking.PROBE_IDLE, 0.0 if probe else chunking.PROBE_IDLE
    try:
        envs = [envelope(i, ("a@example.test", "b@example.test"), sender=f"s{i}@example.test")
                for i in range(5)]
        entries, _ = send(server, envs, pipeline_window=window)
    finally:
        chunking.PROBE_IDLE = saved
        server.close()
    queued: dict[str, set[str]] = {}
    seen: set[str] = set()
    for n, txn in enumerate(server.txns):
        sender = txn.mail.split("<", 1)[1].split(">", 1)[0]
        seen.add(sender)
        if txn.content is not None:
            queued.setdefault(sender, set()).update(taken.get(n, set()))
    for i, entry in enumerate(entries):
        sender = f"s{i}@example.test"
        if isinstance(entry, SendResult):
            claimed = {r.recipient for r in entry.accepted}
        else:
            partial = failure_of(entry).partial
            claimed = {r.recipient for r in partial.accepted} if partial is not None else set()
        assert claimed <= queued.get(sender, set()), (i, entries)
        if not isinstance(entry, DeliveryUncertain):
            assert queued.get(sender, set()) <= claimed, (i, entries)
        if sender in seen:
            assert not isinstance(entry, NotAttempted), (i, entries)


@pytest.mark.parametrize("reset", [False, True])
def test_421_and_hang_up_while_the_window_is_still_being_written(reset: bool) -> None:
    """The server answers the first MAIL with 421 at once and hangs up (FIN, or RST) while
    the client is still writing a window of large messages: the 421 decides message 0 (a
    clean refusal at MAIL), nothing is claimed delivered, nothing unwritten is uncertain."""
    import struct

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"220 busy ESMTP\r\n")
            buf = b""
            while True:
                while b"\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                line, buf = buf.split(b"\n", 1)
                if line[:4].upper() == b"EHLO":
                    conn.sendall(b"250-busy\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                    continue
                conn.sendall(b"421 4.7.0 too busy, try later\r\n")
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    from mailworker.relay import parse_relay

    relay = parse_relay("busy", f"smtp://127.0.0.1:{port}?tls=none&timeout=2"
                        "&connect_timeout=5&deadline=10&pipeline_window=4")
    envs = [envelope(i, body=b"q" * 998 + b"\r\n" * 1_500_000) for i in range(6)]
    try:
        entries, conn = send_over(relay, envs)
    finally:
        listener.close()
        thread.join(5)
    kinds = [kind(e) for e in entries]
    assert conn.is_closed
    assert kinds[0] in ("mail 421", "data None"), kinds  # data None: the RST ate the 421
    assert not any(isinstance(e, SendResult) for e in entries)
    written = [k for k in kinds[1:] if k != "not-attempted"]
    assert all(k in ("uncertain", "data None") for k in written), kinds


def test_probe_never_stalls_on_a_server_that_holds_replies_to_the_group_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that keeps its MAIL and RCPT replies until the group ends (at BDAT),
    against RFC 2920 3.2 (flush when the input runs dry): the probe's MAIL reply never
    comes on its own, so after PROBE_WAIT the batch goes on as without a probe (it must not
    wait out the timeout and fail)."""
    from mailworker.relay import parse_relay
    from mailworker.smtp import chunking

    monkeypatch.setattr(chunking, "PROBE_IDLE", 0.0)
    monkeypatch.setattr(chunking, "PROBE_WAIT", 0.2)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"220 holder ESMTP\r\n")
            buf, held = b"", []
            while True:
                while b"\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                line, buf = buf.split(b"\n", 1)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-holder\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                elif verb == b"BDAT":
                    size = int(line.split()[1])
                    while len(buf) < size:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    got.append(buf[:size])
                    buf = buf[size:]
                    conn.sendall(b"".join([*held, b"250 2.0.0 queued\r\n"]))
                    held = []
                else:
                    held.append(b"250 ok\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    relay = parse_relay("holder", f"smtp://127.0.0.1:{port}?tls=none&timeout=5"
                        "&connect_timeout=5&deadline=10&pipeline_window=4")
    envs = [envelope(i) for i in range(3)]
    try:
        entries, _ = send_over(relay, envs)
    finally:
        listener.close()
        thread.join(5)
    assert [kind(e) for e in entries] == ["ok"] * 3
    assert got == [prepare(e, {}, chunking=True).content for e in envs]


def test_window_longer_than_a_deadline_still_reads_the_replies_that_came(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Large messages on a slow link: writing the window takes longer than the first
    transaction's deadline, which bounds the write. Its reply arrived long ago: after the
    write times out it must still decide that message (not leave it uncertain, a flagged
    duplicate on retry), and nothing is ever claimed that the server did not answer."""
    envs = [envelope(i, body=b"s" * 998 + b"\r\n" * 500_000) for i in range(4)]
    entries = _send_over_a_slow_link(
        monkeypatch, "timeout=5&connect_timeout=5&deadline=1&pipeline_window=3", envs)
    kinds = [kind(e) for e in entries]
    assert kinds[0] == "ok", kinds
    assert all(k in ("ok", "uncertain", "data None", "not-attempted") for k in kinds), kinds
