"""build_message and from_email_message: round trips, validation, envelope, size."""

from __future__ import annotations

import copy
import email
import email.policy
import pickle
import re
from email.header import Header
from email.message import EmailMessage, Message
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailworker.message import (
    Attachment,
    BuiltMessage,
    InvalidMessageError,
    build_message,
    from_email_message,
    parse_mailbox,
    validate_address,
)

SENDER = "Shop <shop@example.com>"


def parse(built: BuiltMessage) -> EmailMessage:
    msg = email.message_from_bytes(built.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def unsurrogate(value: str) -> str:
    """The parser hands raw UTF-8 header bytes back as surrogate escapes."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8")


def lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def header_block(built: BuiltMessage) -> bytes:
    return built.data.partition(b"\r\n\r\n")[0]


def assert_well_formed(built: BuiltMessage) -> None:
    assert built.size == len(built.data)
    assert b"\n" not in built.data.replace(b"\r\n", b"")
    assert b"\r" not in built.data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in built.data.split(b"\r\n"))
    if not built.smtputf8:
        assert header_block(built).isascii()


# --- round trips -----------------------------------------------------------------------

# Header-safe text: anything but CR, LF, NUL and lone surrogates.
header_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\r\n\0"), max_size=120
)
body_line = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), max_size=60),
    st.sampled_from([".", "..", ".leading dot", "From the start", ">From", "", " ", "=", "-- "]),
    st.text("ab ", min_size=990, max_size=1200),  # over 998: must go quoted-printable
)
bodies = st.lists(body_line, max_size=12).flatmap(
    lambda lines: st.sampled_from(["\n", "\r\n", "\r"]).map(lambda end: end.join(lines))
)
atext = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
local_parts = st.lists(st.text(atext, min_size=1, max_size=10), min_size=1, max_size=3).map(
    ".".join
)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=3).map(lambda ls: ".".join([*ls, "example"]))
addresses = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)
filenames = st.text(
    st.characters(exclude_categories=("Cs", "Cc", "Cf", "Cn", "Co", "Zl", "Zp")), max_size=40
).filter(str.strip)


def same_name(name: str) -> str:
    """What a display name must read back as.

    Whitespace is normalised (parsers collapse it). A name whose encoded run is split
    into several encoded words reads back with a space at the split in Python's parser
    (a CPython bug that its own generator shares), so such names compare without spaces.
    """
    name = " ".join(name.split())
    return name if len(name.encode()) <= 42 else "".join(name.split())


def quoted(name: str, address: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{address}>'


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=header_text,
    names=st.lists(header_text, min_size=1, max_size=3),
    to=st.lists(addresses, min_size=1, max_size=3, unique_by=str.lower),
    text=bodies,
    html=st.one_of(st.none(), bodies),
)
@example(subject="=?utf-8?q?not_an_encoded_word?=", names=["=?x?"], to=["a@b.example"],
         text="From here\n.\n", html=None)
@example(subject=" leading and trailing ", names=["  Doe, Jane  "], to=["a@b.example"],
         text="x" * 1200, html="<p>" + "y " * 600 + "</p>")
def test_round_trip(subject: str, names: list[str], to: list[str], text: str,
                    html: str | None) -> None:
    mailboxes = [quoted(names[i % len(names)], a) for i, a in enumerate(to)]
    built = build_message(sender=SENDER, to=mailboxes, subject=subject, text=text, html=html)
    assert_well_formed(built)
    msg = parse(built)
    assert msg["subject"] == subject
    got = [(same_name(a.display_name), a.addr_spec) for a in msg["to"].addresses]
    assert got == [(same_name(names[i % len(names)]), a) for i, a in enumerate(to)]
    assert [(a.display_name, a.addr_spec) for a in msg["from"].addresses] == [
        ("Shop", "shop@example.com")]
    assert lf(msg.get_body(("plain",)).get_content()) == lf(text)
    if html is not None:
        assert msg.get_content_type() == "multipart/alternative"
        assert lf(msg.get_body(("html",)).get_content()) == lf(html)
    assert msg["message-id"] == built.message_id
    assert built.recipients == tuple(to)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(filenames, st.binary(max_size=3000)), min_size=1, max_size=4),
       text=st.one_of(st.none(), bodies))
@example(files=[("report 2024 (final).pdf", b"%PDF"), ("naïve résumé.txt", b"\xff")], text=None)
@example(files=[('quo"te\\slash.bin', b""), ("=?utf-8?q?x?=", b"\0"), (" a\u00a0b ", b"")],
         text="")
def test_attachments_round_trip(files: list[tuple[str, bytes]], text: str | None) -> None:
    built = build_message(sender=SENDER, to="a@b.example", text=text, attachments=files)
    assert_well_formed(built)
    msg = parse(built)
    assert msg.get_content_type() == "multipart/mixed"
    got = [(part.get_filename(), part.get_payload(decode=True)) for part in msg.iter_attachments()]
    assert got == [(name.strip(), data) for name, data in files]
    if text is not None:
        assert lf(msg.get_body(("plain",)).get_content()) == lf(text)


def test_international_addresses() -> None:
    built = build_message(sender="josé@example.com", to=["Zoë <zoë@faß.de>", "a@Bücher.example"],
                          text="hi")
    # ASCII local part: the domain becomes its A-label, so no SMTPUTF8 for that one.
    assert built.recipients == ("zoë@faß.de", "a@xn--bcher-kva.example")
    assert built.sender == "josé@example.com"
    assert built.smtputf8
    msg = parse(built)
    assert [unsurrogate(a.addr_spec) for a in msg["to"].addresses] == list(built.recipients)
    assert msg["to"].addresses[0].display_name == "Zoë"
    assert built.message_id.endswith("@example.com>")


def test_idn_domain_alone_needs_no_smtputf8() -> None:
    built = build_message(sender="shop@bücher.example", to="kunde@bücher.example", text="x")
    assert built.sender == "shop@xn--bcher-kva.example"
    assert not built.smtputf8
    assert header_block(built).isascii()


def test_idna2003_deviation_is_kept_in_utf8() -> None:
    # IDNA 2003 would turn faß.de into fass.de, a different domain.
    assert validate_address("info@faß.de") == "info@faß.de"
    assert build_message(sender=SENDER, to="info@faß.de", text="x").smtputf8


def test_non_ascii_bcc_needs_smtputf8() -> None:
    built = build_message(sender=SENDER, to="a@b.example", bcc="ünï@b.example", text="x")
    assert built.smtputf8
    assert header_block(built).isascii()


# --- envelope ----------------------------------------------------------------------------


def test_bcc_is_in_envelope_not_headers() -> None:
    built = build_message(sender=SENDER, to="a@b.example", bcc=["secret@c.example"], text="x")
    assert built.recipients == ("a@b.example", "secret@c.example")
    assert b"secret" not in built.data
    assert b"bcc" not in built.data.lower()


def test_bcc_only_gets_undisclosed_recipients() -> None:
    built = build_message(sender=SENDER, bcc="secret@c.example", text="x")
    msg = parse(built)
    assert str(msg["to"]) == "undisclosed-recipients:;"
    assert msg["to"].addresses == ()
    assert built.recipients == ("secret@c.example",)


def test_recipients_deduplicated_case_insensitively_in_order() -> None:
    built = build_message(sender=SENDER, to=["B@x.example", "a@x.example"],
                          cc="b@X.example, c@x.example", bcc=["A@X.EXAMPLE", "d@x.example"],
                          text="x")
    assert built.recipients == ("B@x.example", "a@x.example", "c@x.example", "d@x.example")


def test_string_address_lists_split_on_commas_outside_quotes() -> None:
    built = build_message(sender=SENDER, to='"Doe, Jane" <jane@x.example>, bob@x.example,',
                          text="x")
    assert built.recipients == ("jane@x.example", "bob@x.example")
    assert parse(built)["to"].addresses[0].display_name == "Doe, Jane"


def test_validate_and_parse_mailbox() -> None:
    assert validate_address("  Jane Doe <jane@x.example> ") == "jane@x.example"
    assert parse_mailbox('"Doe, \\"JD\\" Jane" <jane@x.example>', "to") == (
        'Doe, "JD" Jane', "jane@x.example")
    assert parse_mailbox("root@localhost", "to") == ("", "root@localhost")
    assert validate_address("a@[192.0.2.1]") == "a@[192.0.2.1]"
    assert validate_address("a@[IPv6:2001:db8::1]") == "a@[IPv6:2001:db8::1]"


def test_reply_to_and_long_recipient_lists_are_folded() -> None:
    many = [f"Recipient Number {i} <r{i}@x.example>" for i in range(100)]
    built = build_message(sender=SENDER, to=many, reply_to=["Support <help@x.example>",
                          "z@x.example"], text="x")
    msg = parse(built)
    assert [a.addr_spec for a in msg["to"].addresses] == [f"r{i}@x.example" for i in range(100)]
    assert [str(a) for a in msg["reply-to"].addresses] == [
        "Support <help@x.example>", "z@x.example"]
    assert "help@x.example" not in built.recipients
    assert max(len(line) for line in header_block(built).split(b"\r\n")) <= 78


def test_message_id_and_date() -> None:
    built = build_message(sender=SENDER, to="a@b.example", text="x", message_id="abc@b.example",
                          date=0.0)
    msg = parse(built)
    assert built.message_id == msg["message-id"] == "<abc@b.example>"
    assert b"\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n" in built.data
    assert msg["date"].datetime.timestamp() == 0
    generated = build_message(sender=SENDER, to="a@b.example", text="x").message_id
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.com>", generated)


def test_custom_headers_are_written_and_folded() -> None:
    long = " ".join(["word"] * 60)
    built = build_message(sender=SENDER, to="a@b.example", text="x",
                          headers={"X-Campaign": "spring", "X-Long": long, "X-Uni": "héllo"})
    msg = parse(built)
    assert (msg["x-campaign"], msg["x-long"], msg["x-uni"]) == ("spring", long, "héllo")
    assert max(len(line) for line in header_block(built).split(b"\r\n")) <= 78


# --- MIME structure ----------------------------------------------------------------------


def test_text_only_is_a_single_7bit_part() -> None:
    built = build_message(sender=SENDER, to="a@b.example", subject="Hi", text="Hello\n")
    msg = parse(built)
    assert msg.get_content_type() == "text/plain"
    assert msg["content-transfer-encoding"] == "7bit"
    assert msg["mime-version"] == "1.0"
    assert built.data.endswith(b"\r\n\r\nHello\r\n")


@pytest.mark.parametrize("text", ["héllo", "x" * 999, "nul\0byte"])
def test_quoted_printable_when_7bit_is_not_allowed(text: str) -> None:
    msg = parse(build_message(sender=SENDER, to="a@b.example", text=text))
    assert msg["content-transfer-encoding"] == "quoted-printable"
    assert msg.get_content() == text


def test_html_only() -> None:
    msg = parse(build_message(sender=SENDER, to="a@b.example", html="<b>hi</b>"))
    assert msg.get_content_type() == "text/html"


def test_inline_attachments_are_related_to_the_html_with_content_ids() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    built = build_message(
        sender=SENDER, to="a@b.example", text="see logo",
        html='<img src="cid:logo.png"><img src="cid:chart@shop">',
        attachments=[
            Attachment("logo.png", png, inline=True),
            Attachment("chart.svg", "<svg/>", inline=True, content_id="<chart@shop>"),
            ("invoice.pdf", b"%PDF-1.7"),
        ],
    )
    msg = parse(built)
    assert msg.get_content_type() == "multipart/mixed"
    alternative = msg.get_payload()[0]
    assert alternative.get_content_type() == "multipart/alternative"
    related = alternative.get_payload()[1]
    assert related.get_content_type() == "multipart/related"
    html, logo, chart = related.get_payload()
    assert html.get_content_type() == "text/html"
    assert (logo["content-id"], logo.get_content_disposition()) == ("<logo.png>", "inline")
    assert logo.get_payload(decode=True) == png
    assert logo.get_content_type() == "image/png"
    assert chart["content-id"] == "<chart@shop>"
    assert chart["content-type"] == "image/svg+xml"  # a charset only for text/* str content
    assert [p.get_filename() for p in msg.iter_attachments()] == ["invoice.pdf"]


def test_inline_attachment_without_usable_filename_gets_generated_content_id() -> None:
    built = build_message(sender=SENDER, to="a@b.example", html="<p>x</p>",
                          attachments=[Attachment("my logo.png", b"x", inline=True)])
    related = parse(built)
    cid = related.get_payload()[1]["content-id"]
    assert re.fullmatch(r"<[0-9a-f]{16}@example\.com>", cid)


def test_inline_without_html_is_an_ordinary_part() -> None:
    msg = parse(build_message(sender=SENDER, to="a@b.example", text="x",
                              attachments=[Attachment("a.png", b"x", inline=True)]))
    assert [p.get_content_type() for p in msg.get_payload()] == ["text/plain", "image/png"]


def test_attachments_only_and_type_guessing() -> None:
    msg = parse(build_message(sender=SENDER, to="a@b.example", attachments=[
        ("backup.tar.gz", b"\x1f\x8b"), ("data", b"?"), ("mail.eml", b"Subject: x\r\n\r\n"),
        ("explicit.bin", b"!", "Text/CSV"),
    ]))
    assert [p.get_content_type() for p in msg.iter_attachments()] == [
        "application/gzip", "application/octet-stream", "application/octet-stream", "text/csv"]


def test_base64_lines_are_76_characters() -> None:
    built = build_message(sender=SENDER, to="a@b.example", attachments=[("a", bytes(1000))])
    body = built.data.split(b"\r\n\r\n")[2].split(b"\r\n--")[0]
    assert {len(line) for line in body.split(b"\r\n")[:-1]} == {76}


# --- bad input ---------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"to": ["a@b.example", "bob@"]}, "to[1]", "'bob@' is not a valid email address: missing"),
    ({"to": "bob"}, "to[0]", "missing '@'"),
    ({"to": "@b.example"}, "to[0]", "missing the part before '@'"),
    ({"to": "a b@c.example"}, "to[0]", "contains a space"),
    ({"to": "a@b@c.example"}, "to[0]", "more than one '@'"),
    ({"to": "a..b@c.example"}, "to[0]", "'..'"),
    ({"to": "a(b)@c.example"}, "to[0]", "'(' is not allowed"),
    ({"to": '"a b"@c.example'}, "to[0]", "quoted local parts"),
    ({"to": "a@b..example"}, "to[0]", "empty label"),
    ({"to": "a@-b.example"}, "to[0]", "'-b'"),
    ({"to": "a@b_c.example"}, "to[0]", "contains '_'"),
    ({"to": "a@gmail"}, "to[0]", "has no dot"),
    ({"to": "a@192.0.2.1"}, "to[0]", "[192.0.2.1]"),
    ({"to": "a@[300.1.1.1]"}, "to[0]", "address literal"),
    ({"to": "a@example.com."}, "to[0]", "ends with '.'"),
    ({"to": "a@" + "b" * 64 + ".example"}, "to[0]", "domain label"),
    ({"to": "a" * 65 + "@b.example"}, "to[0]", "64"),
    ({"to": "a@" + ("b" * 60 + ".") * 5 + "example"}, "to[0]", "254"),
    ({"to": "a@b.example\r\nBcc: evil@x.example"}, "to[0]", "header injection"),
    ({"to": ["Eve <a@b.example>\nBcc: x@y.example"]}, "to[0]", "header injection"),
    ({"to": ["a@b.example, c@d.example"]}, "to[0]", "holds 2 addresses"),
    ({"to": "Jane <a@b.example"}, "to[0]", "without a closing '>'"),
    ({"to": "Jane a@b.example>"}, "to[0]", "without a matching '<'"),
    ({"to": '"Ja"ne" <a@b.example>'}, "to[0]", "unbalanced; escape it"),
    ({"to": '"Ja"ne" x" <a@b.example>'}, "to[0]", "must be escaped"),
    ({"to": [42]}, "to[0]", "expected an address string, got int"),
    ({"to": 42}, "to", "expected a string or a list of strings"),
    ({"cc": "x"}, "cc[0]", "missing '@'"),
    ({"bcc": ["ok@b.example", "x@"]}, "bcc[1]", "missing domain"),
    ({"reply_to": "x@"}, "reply_to[0]", "missing domain"),
    ({"to": ()}, "recipients", "pass an address in to=, cc= or bcc="),
    ({"sender": ""}, "sender", "required"),
    ({"sender": "shop@"}, "sender", "missing domain"),
    ({"sender": "a@b.example, c@d.example"}, "sender", "holds 2 addresses"),
    ({"subject": "Hi\r\nBcc: evil@x.example"}, "subject", "header injection"),
    ({"subject": "a\0b"}, "subject", "NUL"),
    ({"subject": "\ud800"}, "subject", "not valid Unicode"),
    ({"text": None}, "body", "pass text=, html= or attachments="),
    ({"text": "\udcff"}, "text", "not valid Unicode"),
    ({"html": b"<p>bytes</p>"}, "html", "expected a string, got bytes"),
    ({"headers": {"X-Bad": "a\r\nBcc: x@y.example"}}, "headers[X-Bad]", "header injection"),
    ({"headers": {"X Bad": "a"}}, "headers[X Bad]", "without spaces or ':'"),
    ({"headers": {"X:Bad": "a"}}, "headers[X:Bad]", "without spaces or ':'"),
    ({"headers": {"Ünï": "a"}}, "headers[Ünï]", "printable ASCII"),
    ({"headers": {"X-Num": 1}}, "headers[X-Num]", "expected a string value"),
    ({"headers": {"X-Long": "x" * 1000}}, "headers[X-Long]", "998 octets"),
    ({"headers": {"message-id": "<a@b>"}}, "headers[message-id]", "message_id="),
    ({"headers": {"From": "x@y.example"}}, "headers[From]", "sender="),
    ({"headers": {"BCC": "x@y.example"}}, "headers[BCC]", "bcc="),
    ({"headers": {"Subject": "x"}}, "headers[Subject]", "subject="),
    ({"headers": {"Content-Type": "text/html"}}, "headers[Content-Type]", "attachments="),
    ({"headers": {"MIME-Version": "1.0"}}, "headers[MIME-Version]", "mailworker writes it"),
    ({"message_id": "no-at-sign"}, "message_id", "<id@example.com>"),
    ({"message_id": "<a@b>\r\nX: y"}, "message_id", "<id@example.com>"),
    ({"attachments": [("a.txt",)]}, "attachments[0]", "(filename, content[, mimetype])"),
    ({"attachments": ["a.txt"]}, "attachments[0]", "Attachment(...)"),
    ({"attachments": [("", b"x")]}, "attachments[0].filename", "filename is required"),
    ({"attachments": [("a\r\nb.txt", b"x")]}, "attachments[0].filename", "control characters"),
    ({"attachments": [("  ", b"x")]}, "attachments[0].filename", "filename is required"),
    ({"attachments": [("a" * 256, b"x")]}, "attachments[0].filename", "over 255 octets"),
    ({"attachments": [("a.txt", 42)]}, "attachments[0].content", "expected bytes or str"),
    ({"attachments": [("a.txt", b"x", "text")]}, "attachments[0].mimetype", "type/subtype"),
    ({"attachments": [("a", b"x", "text/plain\r\nX: y")]}, "attachments[0].mimetype",
     "type/subtype"),
    ({"attachments": [("a.eml", b"x", "message/rfc822")]}, "attachments[0].mimetype",
     "application/octet-stream"),
    ({"attachments": [Attachment("a", b"x", content_id="a b")]}, "attachments[0].content_id",
     "printable ASCII"),
    ({"attachments": [Attachment("a", b"", inline=True), Attachment("b", b"", content_id="a")]},
     "attachments[1].content_id", "used twice"),
]


@pytest.mark.parametrize(("overrides", "field", "message"), BAD,
                         ids=[f"{i}-{case[1]}" for i, case in enumerate(BAD)])
def test_bad_input_is_refused_with_field_and_reason(overrides: dict[str, Any], field: str,
                                                    message: str) -> None:
    kwargs: dict[str, Any] = {"sender": SENDER, "to": "a@b.example", "text": "x", **overrides}
    with pytest.raises(InvalidMessageError) as info:
        build_message(**kwargs)
    assert info.value.field == field
    assert message in info.value.reason
    assert str(info.value) == f"{field}: {info.value.reason}"


def test_error_reads_well_and_pickles() -> None:
    with pytest.raises(InvalidMessageError) as info:
        build_message(sender=SENDER, to=["a@b.example", "bob@"], text="x")
    assert str(info.value) == (
        "to[1]: 'bob@' is not a valid email address: missing domain after '@'")
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.field, again.reason, str(again)) == (
        info.value.field, info.value.reason, str(info.value))
    assert isinstance(again, ValueError)


def test_size_limit() -> None:
    with pytest.raises(InvalidMessageError) as info:
        build_message(sender=SENDER, to="a@b.example", text="x" * 1450, max_size=1500)
    assert info.value.field == "size"
    assert re.fullmatch(r"message is 1\.[6-9] KB, over the 1\.5 KB limit "
                        r"\(MAILWORKER_MAX_MESSAGE_SIZE\).*", info.value.reason)
    ok = build_message(sender=SENDER, to="a@b.example", text="x" * 2000, max_size=10_000)
    assert ok.size == len(ok.data) < 10_000


def test_oversized_attachments_refused_before_encoding() -> None:
    with pytest.raises(InvalidMessageError) as info:
        build_message(sender=SENDER, to="a@b.example", text="x",
                      attachments=[("big.bin", bytes(12 * 1024 * 1024))])
    assert info.value.reason.startswith("message is at least 16.4 MB, over the 10 MB limit")


# --- from_email_message ------------------------------------------------------------------


def test_from_email_message_strips_bcc_and_adds_ids_without_mutating() -> None:
    msg = EmailMessage()
    msg["From"] = "Shop <shop@example.com>"
    msg["To"] = "Alice <alice@x.example>, bob@x.example"
    msg["Cc"] = "carol@x.example"
    msg["Bcc"] = "secret@x.example, ALICE@x.example"
    msg["Subject"] = "Héllo"
    msg.set_content("Hello\nFrom here\n.\n")
    before = msg.as_bytes()
    built = from_email_message(msg)
    assert msg.as_bytes() == before
    assert built.sender == "shop@example.com"
    assert built.recipients == ("alice@x.example", "bob@x.example", "carol@x.example",
                                "secret@x.example")
    assert b"secret" not in built.data and b"\nBcc" not in built.data
    parsed = parse(built)
    assert parsed["bcc"] is None
    assert parsed["message-id"] == built.message_id
    assert parsed["date"]
    assert parsed["subject"] == "Héllo"
    assert lf(parsed.get_content()) == "Hello\nFrom here\n.\n"
    assert_well_formed(built)


def test_from_email_message_keeps_message_id_and_uses_sender_header() -> None:
    msg = EmailMessage()
    msg["From"] = "a@x.example, b@x.example"
    msg["Sender"] = "bounces@x.example"
    msg["To"] = "undisclosed-recipients:;"
    msg["Message-ID"] = "<keep@x.example>"
    msg.set_content("x")
    built = from_email_message(msg, recipients=["r@y.example"])
    assert (built.sender, built.recipients) == ("bounces@x.example", ("r@y.example",))
    assert built.message_id == "<keep@x.example>"
    assert built.data.count(b"Message-ID") == 1


def test_from_email_message_with_django_like_mime_message() -> None:
    """The shape Django's EmailMessage.message() builds: compat32, Header objects."""
    msg = MIMEMultipart("mixed")
    msg["Subject"] = Header("Rapport für März", "utf-8")
    msg["From"] = "=?utf-8?b?U2jDtnA=?= <shop@example.com>"
    msg["To"] = "Ålice <alice@x.example>"
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText("Grüße\nFrom us\n", "plain", "utf-8"))
    alternative.attach(MIMEText("<p>Grüße</p>", "html", "utf-8"))
    msg.attach(alternative)
    pdf = bytes(range(256)) * 4
    part = MIMEApplication(pdf, "pdf")
    part.add_header("Content-Disposition", "attachment", filename="report.pdf")
    msg.attach(part)
    built = from_email_message(msg, sender="bounce@example.com")
    assert built.sender == "bounce@example.com"
    assert built.recipients == ("alice@x.example",)
    parsed = parse(built)
    assert parsed["subject"] == "Rapport für März"
    assert lf(parsed.get_body(("plain",)).get_content()) == "Grüße\nFrom us\n"
    [attachment] = parsed.iter_attachments()
    assert (attachment.get_filename(), attachment.get_payload(decode=True)) == ("report.pdf", pdf)
    assert not built.smtputf8
    assert_well_formed(built)


def test_from_email_message_refuses_injected_compat32_header() -> None:
    msg = MIMEText("x")
    msg["From"] = "a@x.example"
    msg["To"] = "b@x.example"
    msg["X-Bad"] = "a\r\nBcc: evil@x.example"
    with pytest.raises(InvalidMessageError, match="header injection") as info:
        from_email_message(msg)
    assert info.value.field == "headers[X-Bad]"
    folded = MIMEText("x")
    folded["From"], folded["To"] = "a@x.example", "b@x.example"
    folded["X-Ok"] = "a\r\n b"  # folding, not injection
    assert from_email_message(folded).recipients == ("b@x.example",)


@pytest.mark.parametrize(("headers", "field"), [
    ({"To": "b@x.example"}, "sender"),
    ({"From": "a@x.example"}, "recipients"),
    ({"From": "a@x.example", "To": "b@"}, "to[0]"),
    ({"From": "a@x.example, c@x.example", "To": "b@x.example"}, "sender"),
])
def test_from_email_message_bad_envelope(headers: dict[str, str], field: str) -> None:
    msg = Message()
    for name, value in headers.items():
        msg[name] = value
    msg.set_payload("x")
    with pytest.raises(InvalidMessageError) as info:
        from_email_message(msg)
    assert info.value.field == field


def test_from_email_message_size_limit() -> None:
    msg = EmailMessage()
    msg["From"], msg["To"] = "a@x.example", "b@x.example"
    msg.set_content("x" * 5000)
    with pytest.raises(InvalidMessageError) as info:
        from_email_message(msg, max_size=4000)
    assert info.value.field == "size"


def test_from_email_message_international_recipient() -> None:
    msg = EmailMessage()
    msg["From"] = "a@x.example"
    msg["To"] = "Zoë <zoë@x.example>"
    msg.set_content("x")
    built = from_email_message(copy.deepcopy(msg))
    assert built.smtputf8
    assert built.recipients == ("zoë@x.example",)
    assert "zoë@x.example".encode() in header_block(built)
