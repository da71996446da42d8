"""Headers and addresses from callers: control characters, reserved fields, parser
defects, invisible and full-width domains (review findings S2-05, S2-06, S2-16, S2-18)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import fakeredis
import pytest

import mailworker
from mailworker import runtime
from mailworker.config import Settings
from mailworker.message import (
    InvalidMessageError,
    build_message,
    from_email_message,
    validate_address,
)
from mailworker.relay import parse_relay

BASE: dict[str, Any] = {"sender": "s@example.com", "to": "a@example.com", "subject": "s",
                        "text": "t"}
# Every C0 control but TAB, and DEL. CR, LF and NUL have their own (older) message.
CONTROLS = [chr(c) for c in (*range(0x20), 0x7F) if c != 0x09]


@pytest.fixture
def queued() -> Iterator[None]:
    settings = Settings(relays={"default": parse_relay("default", "smtp://127.0.0.1:2525")})
    runtime.configure(settings, redis_client=fakeredis.FakeRedis(),
                      publisher=lambda ids, queue: None)
    yield
    runtime.reset_runtime()


# --- S2-05: headers= values -------------------------------------------------------------

@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_s2_05_control_characters_in_header_values_refused(char: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        build_message(**BASE, headers={"X-Customer": f"Joe{char}Bcc: evil@attacker.test"})
    assert info.value.field == "headers[X-Customer]"


def test_s2_05_the_review_repro_never_yields_a_bcc_on_reserialising() -> None:
    for char in "\x0b\x0c\x1c\x1d\x1e":
        with pytest.raises(InvalidMessageError, match=f"U\\+{ord(char):04X}"):
            build_message(**BASE, headers={"X-Customer": f"Joe{char}Bcc: evil@attacker.test"})
    # TAB stays allowed, and so does non-ASCII (RFC 2047 encoded, so never raw).
    built = build_message(**BASE, headers={"X-A": "a\tb", "X-B": "Zoë\u2028x"})
    again = email.message_from_bytes(
        email.message_from_bytes(built.data, policy=email.policy.default).as_bytes(),
        policy=email.policy.default)
    assert again["Bcc"] is None and again["X-A"] == "a\tb"


# --- S2-06: parsed messages --------------------------------------------------------------

@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x01", "\x7f"])
def test_s2_06_parsed_message_with_control_in_header_refused(char: str) -> None:
    raw = (b"From: s@example.com\r\nTo: a@example.com\r\nSubject: hello"
           + char.encode() + b"Reply-To: attacker@evil.test\r\n\r\nbody\r\n")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    with pytest.raises(InvalidMessageError) as info:
        from_email_message(msg)
    assert info.value.field == "headers[Subject]"


@pytest.mark.parametrize("sep", ["\x85", "\u2028", "\u2029"])
def test_s2_06_unicode_line_separators_in_parsed_headers_refused(sep: str) -> None:
    msg = email.message_from_string(
        f"From: s@example.com\nTo: a@example.com\nSubject: hi{sep}Reply-To: x@evil.test\n\nb\n",
        policy=email.policy.default)
    with pytest.raises(InvalidMessageError, match="control character"):
        from_email_message(msg)


def test_s2_06_send_message_queues_nothing(queued: None) -> None:
    raw = (b"From: s@example.com\r\nTo: a@example.com\r\nSubject: hello\x0bReply-To: "
           b"attacker@evil.test\r\n\r\nbody\r\n")
    with pytest.raises(mailworker.InvalidMessageError):
        mailworker.send_message(email.message_from_bytes(raw, policy=email.policy.default))
    rt = runtime.get_runtime()
    assert list(rt.redis.scan_iter("mw:m:*")) == []


def test_folded_parsed_headers_still_accepted() -> None:
    raw = (b"From: s@example.com\r\nTo: a@example.com\r\nSubject: a long\r\n\tfolded one\r\n"
           b"X-Tab: a\tb\r\n\r\nbody\r\n")
    built = from_email_message(email.message_from_bytes(raw, policy=email.policy.default))
    assert b"folded one" in built.data and built.recipients == ("a@example.com",)


# --- S2-18: parser defects ---------------------------------------------------------------

def test_s2_18_hidden_bcc_line_in_a_parsed_message_refused() -> None:
    raw = (b"From: s@example.com\r\nTo: a@example.com\r\nBCC : h3@example.com\r\n"
           b"Subject: x\r\n\r\nbody\r\n")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    with pytest.raises(InvalidMessageError) as info:
        from_email_message(msg)
    assert info.value.field == "message"
    assert "MissingHeaderBodySeparatorDefect" in info.value.reason


# --- S2-16: reserved trace and identity headers --------------------------------------------

@pytest.mark.parametrize("name", ["Resent-Bcc", "Resent-To", "resent-from", "Received",
                                  "Return-Path", "Sender"])
def test_s2_16_trace_and_identity_headers_reserved(name: str) -> None:
    with pytest.raises(InvalidMessageError) as info:
        build_message(**BASE, headers={name: "hidden@example.com"})
    assert info.value.field == f"headers[{name}]"
    if name == "Sender":
        assert "sender_header=" in info.value.reason


def test_sender_header_is_the_escape_hatch_for_sender(queued: None) -> None:
    built = build_message(**{**BASE, "sender": "Ada <ada@example.com>"},
                          sender_header="Shop bot <bot@shop.example>")
    msg = email.message_from_bytes(built.data, policy=email.policy.default)
    assert msg["Sender"] == "Shop bot <bot@shop.example>"
    assert msg["From"] == "Ada <ada@example.com>"
    assert built.sender == "ada@example.com"  # bounces still go to the author
    with pytest.raises(InvalidMessageError) as info:
        build_message(**BASE, sender_header="bot@shop.example\r\nBcc: x@evil.test")
    assert info.value.field == "sender_header"
    mid = mailworker.send(**BASE, sender_header="bot@shop.example")
    assert mailworker.status(mid) is not None


# --- S2-18: domains -------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["a@ex\u200bample.com", "a@ex\u00adample.com",
                                     "a@exa\u200dmple.com", "a@\ufeffexample.com"])
def test_s2_18_invisible_characters_in_domains_refused(address: str) -> None:
    with pytest.raises(InvalidMessageError, match="invisible character"):
        validate_address(address, "to")


def test_s2_18_full_width_domains_are_normalised() -> None:
    assert validate_address("a@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com") == "a@EXAMPLE.com"
    # An ideographic full stop is a dot (RFC 3490), not part of a label.
    assert validate_address("a@example.com\u3002evil.test") == "a@example.com.evil.test"
    assert validate_address("a@ex\u00e4mple.test") == "a@xn--exmple-cua.test"


def test_built_message_with_full_width_domain_needs_no_smtputf8() -> None:
    built = build_message(**{**BASE, "to": "a@\uff45\uff58ample.com"})
    assert built.recipients == ("a@example.com",) and not built.smtputf8


def test_email_message_built_by_the_app_still_works() -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "s@example.com", "a@example.com", "hi"
    msg["Sender"] = "bot@example.com"
    msg.set_content("body")
    built = from_email_message(msg)
    assert built.sender == "bot@example.com"  # the Sender header is the envelope sender
