"""prepare(): the pure part of a transaction (wire bytes, SIZE, SMTPUTF8), no sockets."""

from __future__ import annotations

import smtplib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailworker.smtp import Envelope, RecipientResult, SendResult, Stage
from mailworker.smtp.connection import prepare

ESMTP = {"size": "1000", "8bitmime": "", "smtputf8": "", "pipelining": ""}


def env(data: bytes, *rcpts: str, sender: str = "a@example.test") -> Envelope:
    return Envelope(sender, rcpts or ("b@example.test",), data)


def test_mail_command_declares_size_and_body() -> None:
    p = prepare(env(b"Subject: x\n\nhi\n"), ESMTP)
    assert p.mail == b"MAIL FROM:<a@example.test> SIZE=18\r\n"
    assert p.content == b"Subject: x\r\n\r\nhi\r\n.\r\n"
    p = prepare(env("Grüße\r\n".encode()), ESMTP)
    assert p.mail_cmd.endswith("BODY=8BITMIME")
    p = prepare(env(b"x", "j\u00f6rg@example.test"), ESMTP)
    assert p.mail_cmd.endswith("BODY=8BITMIME SMTPUTF8")
    assert prepare(env(b"x"), {}).mail == b"MAIL FROM:<a@example.test>\r\n"
    assert prepare(env(b"x", sender=""), {}).mail == b"MAIL FROM:<>\r\n"


def test_too_big_and_utf8_unsupported_fail_before_sending() -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        prepare(env(b"x" * 1001), ESMTP)
    assert info.value.smtp_code == 552 and info.value.smtp_error[:5] == b"5.3.4"
    with pytest.raises(smtplib.SMTPNotSupportedError):
        prepare(env(b"x", "j\u00f6rg@example.test"), {"8bitmime": ""})
    assert prepare(env(b"x" * 5000), {"size": "0"}).content  # SIZE 0: no limit declared


def test_empty_message() -> None:
    assert prepare(env(b""), {}).content == b".\r\n"


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x.y", b" "]),
                max_size=40))
def test_content_is_crlf_dot_stuffed_and_round_trips(parts: list[bytes]) -> None:
    data = b"".join(parts)
    content = prepare(env(data), {}).content
    assert content.endswith(b".\r\n")
    body = content[:-3]
    lines = body.split(b"\r\n")
    assert b"\r" not in body.replace(b"\r\n", b"") and b"\n" not in body.replace(b"\r\n", b"")
    assert body == b"" or body.endswith(b"\r\n")
    # What a server recovers by unstuffing is the input with CRLF line endings.
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    normalized = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    assert unstuffed == normalized


def test_results_say_what_was_accepted() -> None:
    ok = RecipientResult("a@x", 250, "2.0.0 OK", "2.0.0", Stage.AFTER_DOT)
    rcpt_ok_but_data_failed = RecipientResult("b@x", 451, "4.3.0", "4.3.0", Stage.DATA)
    refused = RecipientResult("c@x", 550, "5.1.1", "5.1.1", Stage.RCPT)
    lost = RecipientResult("d@x", None, "lost", None, Stage.AFTER_DOT)
    result = SendResult(env(b"x", "a@x", "b@x", "c@x", "d@x"),
                        (ok, rcpt_ok_but_data_failed, refused, lost), 1)
    assert result.accepted == (ok,)
    assert result.refused == (rcpt_ok_but_data_failed, refused, lost)
