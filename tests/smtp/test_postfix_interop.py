"""mailworker's SMTP client against a real MTA: a private Postfix smtpd (tests/smtp/_postfix.py).

Postfix offers PIPELINING and CHUNKING, so with the relay's defaults the client pipelines
whole BDAT transactions; ``chunking=false`` takes the DATA path. What Postfix accepted is
read byte for byte from the capture server behind it, and which path the client took from
Postfix's own per-session command counts (``bdat=30`` vs ``data=30`` in its log).
Refusals come from Postfix's own restrictions: a recipient access map (550), a sender
access map (553 at MAIL), ``smtpd_recipient_limit`` (452) and ``message_size_limit``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from mailworker.relay import parse_relay
from mailworker.smtp import Connection, Envelope, Pool, SendResult, Stage, failure_of
from mailworker.testing import wait_until

from ._postfix import Postfix, PostfixConfig, content_of, postfix_missing

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(postfix_missing() is not None, reason=postfix_missing() or ""),
]

REFUSE = PostfixConfig(
    refuse_recipients={"gone@example.com": "550 5.1.1 No such user here"},
    refuse_senders={"spammer@example.com": "553 5.7.1 Not from you"},
    recipient_limit=3,
    size_limit=200_000,
)


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """One Postfix for the module (starting one takes about a second); each test resets
    the capture server's records."""
    with Postfix(REFUSE) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(postfix: Postfix) -> None:
    postfix.capture.reset()


def body(i: int, size: int = 0) -> bytes:
    """Content DATA would have to escape (leading dots, a lone dot), 8-bit text, and
    optionally bulk."""
    text = (f"line {i}\r\n.leading dot\r\n.\r\n..two\r\nça marche ✓\r\n" * 3).encode()
    return text + (b"x" * 76 + b"\r\n") * (size // 78)


def envelope(i: int, rcpts: tuple[str, ...] = ("r@example.com",), size: int = 0,
             sender: str = "app@example.com") -> Envelope:
    data = (f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: interop {i}\r\n"
            f"Message-ID: <i{i}@mailworker.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body(i, size)
    return Envelope(sender, rcpts, data, message_id=f"i{i}")


def send(postfix: Postfix, envelopes: list[Envelope], **options: Any
         ) -> list[SendResult | BaseException]:
    relay = parse_relay("postfix", postfix.dsn(timeout=10, connect_timeout=5, deadline=60,
                                               **options))
    conn = Connection(relay)
    conn.open()
    try:
        return conn.send_many(envelopes)
    finally:
        conn.close()


def results(outcomes: list[SendResult | BaseException]) -> list[SendResult]:
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes  # type: ignore[return-value]


def captured(postfix: Postfix) -> dict[str | None, list[tuple[tuple[str, ...], bytes]]]:
    """Message-ID -> (recipients, content as the client sent it) of each accepted copy."""
    out: dict[str | None, list[tuple[tuple[str, ...], bytes]]] = {}
    for m in postfix.capture.messages:
        out.setdefault(m.message_id, []).append((m.recipients, content_of(m.data)))
    return out


def last_session(postfix: Postfix, sessions_before: int) -> dict[str, int]:
    """The command counts of the first session logged after *sessions_before* that sent
    mail (Postfix may log the fixture's own start-up probe late)."""
    def found() -> dict[str, int] | None:
        sent = [c for c in postfix.command_counts()[sessions_before:] if "mail" in c]
        return dict(sent[0]) if sent else None

    return wait_until(found, 10, message="Postfix to log the session")  # type: ignore[no-any-return]


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_many_messages_pipelined_arrive_byte_exact(postfix: Postfix, chunking: bool) -> None:
    envelopes = [envelope(i, size=(i % 4) * 20_000) for i in range(30)]
    before = len(postfix.command_counts())
    sent = results(send(postfix, envelopes, chunking=chunking, pipeline_window=8))
    assert all(r.accepted and not r.refused for r in sent)
    got = captured(postfix)
    for env in envelopes:
        assert got[f"<i{env.message_id[1:]}@mailworker.test>"] == [  # type: ignore[index]
            (env.recipients, env.data)], "one copy, the exact bytes sent"
    counts = last_session(postfix, before)
    if chunking:  # one BDAT ... LAST per message, no DATA
        assert (counts.get("bdat"), counts.get("data"), counts["mail"]) == (30, None, 30)
    else:
        assert (counts.get("data"), counts.get("bdat"), counts["mail"]) == (30, None, 30)


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_refusals_in_the_middle_of_a_window(postfix: Postfix, chunking: bool) -> None:
    envelopes = [envelope(i) for i in range(10)]
    envelopes[3] = envelope(3, ("a3@example.com", "gone@example.com"))   # one refused
    envelopes[5] = envelope(5, ("gone@example.com",))                    # all refused
    envelopes[6] = envelope(6, sender="spammer@example.com")             # MAIL refused
    envelopes[8] = envelope(8, size=300_000)                             # too big
    outcomes = send(postfix, envelopes, chunking=chunking)
    by_id = dict(zip((e.message_id for e in envelopes), outcomes, strict=True))

    partial = by_id["i3"]
    assert isinstance(partial, SendResult)
    assert [(x.recipient, x.code, x.stage) for x in partial.recipients] == [
        ("a3@example.com", 250, Stage.AFTER_DOT), ("gone@example.com", 550, Stage.RCPT)]
    refused = {mid: failure_of(by_id[mid]) for mid in ("i5", "i6", "i8")  # type: ignore[arg-type]
               if isinstance(by_id[mid], BaseException)}
    assert sorted(refused) == ["i5", "i6", "i8"], by_id
    assert (refused["i5"].code, refused["i5"].stage) == (550, Stage.RCPT)
    assert "No such user here" in refused["i5"].text
    assert (refused["i6"].code, refused["i6"].stage) == (553, Stage.MAIL)
    assert (refused["i8"].code, refused["i8"].stage) == (552, Stage.MAIL)  # SIZE= at MAIL
    assert not any(f.possible_duplicate for f in refused.values())

    got = captured(postfix)
    delivered = {0, 1, 2, 3, 4, 7, 9}
    assert sorted(str(k) for k in got) == sorted(f"<i{i}@mailworker.test>" for i in delivered)
    assert got["<i3@mailworker.test>"] == [(("a3@example.com",), envelopes[3].data)]
    for i in delivered - {3}:
        result = by_id[f"i{i}"]
        assert isinstance(result, SendResult) and result.accepted and not result.refused
        assert got[f"<i{i}@mailworker.test>"] == [(envelopes[i].recipients, envelopes[i].data)]


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_too_many_recipients_is_split_into_transactions(postfix: Postfix,
                                                        chunking: bool) -> None:
    rcpts = tuple(f"u{k}@example.com" for k in range(8))
    envelopes = [envelope(0), envelope(1, rcpts), envelope(2)]
    sent = results(send(postfix, envelopes, chunking=chunking))
    assert [r.transactions for r in sent] == [1, 3, 1]  # Postfix takes 3 RCPTs at a time
    assert all(x.accepted for r in sent for x in r.recipients)
    got = captured(postfix)
    copies = got["<i1@mailworker.test>"]
    assert [len(r) for r, _ in copies] == [3, 3, 2]
    assert sorted(x for r, _ in copies for x in r) == sorted(rcpts)
    assert {content for _, content in copies} == {envelopes[1].data}
    assert len(got["<i0@mailworker.test>"]) == len(got["<i2@mailworker.test>"]) == 1


def test_a_pool_sends_through_postfix(postfix: Postfix) -> None:
    relay = parse_relay("postfix", postfix.dsn(timeout=10, connect_timeout=5, deadline=60))
    pool = Pool(relay)
    try:
        first = results(pool.send_many([envelope(i) for i in range(12)]))
        second = results(pool.send_many([envelope(i) for i in range(12, 20)]))
    finally:
        pool.close()
    assert all(r.accepted and not r.refused for r in first + second)
    assert len(postfix.capture.messages) == 20


# -- the test server answers BDAT as Postfix does ---------------------------------------

_MAIL = b"MAIL FROM:<app@example.com>\r\nRCPT TO:<r@example.com>\r\n"
SCRIPTS = {
    "accepted in chunks": _MAIL + b"BDAT 5\r\nhelloBDAT 3 LAST\r\nabc"
                          + _MAIL + b"BDAT 0 LAST\r\n",
    "an empty chunk before LAST": _MAIL + b"BDAT 5\r\nhelloBDAT 0\r\nBDAT 3 LAST\r\nabc",
    "no MAIL, chunks discarded": b"BDAT 5\r\nhelloBDAT 3\r\nabcBDAT 2 LAST\r\nxy" + _MAIL
                                 + b"BDAT 1 LAST\r\nz",
    "no accepted RCPT": b"MAIL FROM:<app@example.com>\r\nRCPT TO:<gone@example.com>\r\n"
                        b"BDAT 5\r\nhelloBDAT 3 LAST\r\nabcNOOP\r\n",
    # The failed LAST ends the transaction: the next MAIL is not a nested one (no RSET).
    "no accepted RCPT, next message": b"MAIL FROM:<app@example.com>\r\n"
                                      b"RCPT TO:<gone@example.com>\r\nBDAT 3 LAST\r\nabc"
                                      + _MAIL + b"BDAT 1 LAST\r\nz",
    "MAIL refused": b"MAIL FROM:<spammer@example.com>\r\nRCPT TO:<r@example.com>\r\n"
                    b"BDAT 3 LAST\r\nabc" + _MAIL + b"BDAT 1 LAST\r\nz",
    "DATA after BDAT": _MAIL + b"BDAT 5\r\nhelloDATA\r\nBDAT 3 LAST\r\nabc",
    "chunk over the size limit": _MAIL + b"BDAT 250000\r\n" + b"x" * 250_000
                                 + b"BDAT 3 LAST\r\nabc" + _MAIL + b"BDAT 1 LAST\r\nz",
    "too many recipients": b"MAIL FROM:<app@example.com>\r\n"
                           + b"".join(b"RCPT TO:<u%d@example.com>\r\n" % k for k in range(4))
                           + b"BDAT 1 LAST\r\nz",
    "BDAT after LAST, RSET": _MAIL + b"BDAT 1 LAST\r\nzBDAT 2\r\nxyRSET\r\n",
    "malformed BDAT hangs up": _MAIL + b"BDAT 5x\r\nhelloNOOP\r\n",
}


def _conversation(host: str, port: int, script: bytes) -> list[str]:
    """EHLO, then *script* in one write and QUIT; the reply codes (with the enhanced
    code when there is one) until the server closes."""
    import socket

    with socket.create_connection((host, port), timeout=10) as sock:
        data = sock.recv(65536)  # the greeting first
        sock.sendall(b"EHLO client.test\r\n" + script + b"QUIT\r\n")
        while chunk := sock.recv(65536):
            data += chunk
    finals = [line.decode() for line in data.split(b"\r\n") if line[3:4] == b" "]
    return [" ".join(line.split(" ")[:2]) if line[4:5].isdigit() else line[:3]
            for line in finals[2:-1] + ([] if finals[-1].startswith("221") else finals[-1:])]


@pytest.fixture(scope="module")
def lenient_postfix() -> Iterator[Postfix]:
    """The scripts put DATA, NOOP and QUIT inside a pipelined group on purpose, which the
    module's Postfix refuses (smtpd_forbid_unauth_pipelining): this one lets them be."""
    with Postfix(replace(REFUSE, forbid_unauth_pipelining=False)) as running:
        yield running


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_the_test_server_answers_bdat_like_postfix(lenient_postfix: Postfix, name: str
                                                   ) -> None:
    postfix = lenient_postfix
    from mailworker.testing import Fault, SMTPTestServer

    with SMTPTestServer(chunking=True, max_recipients=3, size_limit=200_000) as server:
        server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user here", match="gone@"))
        server.add_fault(Fault.reply("MAIL", 553, "5.7.1 Not from you", match="spammer@"))
        ours = _conversation(server.host, server.port, SCRIPTS[name])
    theirs = _conversation(postfix.host, postfix.port, SCRIPTS[name])
    assert [code[:3] for code in ours] == [code[:3] for code in theirs]
    # Enhanced codes too, where both give one (aiosmtpd's own replies have none).
    assert [a for a, b in zip(ours, theirs, strict=True) if len(a) > 3 and len(b) > 3] == \
        [b for a, b in zip(ours, theirs, strict=True) if len(a) > 3 and len(b) > 3]


def test_the_fixture_refuses_improper_pipelining_and_cleans_up(postfix: Postfix) -> None:
    """The strictness the client tests rely on is live (MAIL sent with EHLO, before its
    reply, is refused), and a stopped instance leaves no process and no directory."""
    import os
    import socket

    with socket.create_connection((postfix.host, postfix.port), timeout=10) as sock:
        data = sock.recv(65536)
        sock.sendall(b"EHLO client.test\r\nMAIL FROM:<app@example.com>\r\n")
        while chunk := sock.recv(65536):
            data += chunk
    assert b"554 5.5.0 Error: SMTP protocol synchronization" in data

    other = Postfix()
    other.start()
    master, directory = other._master, other.dir
    assert master is not None and directory is not None and directory.exists()
    other.stop()
    assert master.poll() is not None and not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(master.pid, 0)
