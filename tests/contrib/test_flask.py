"""The Flask extension and the example app (examples/flask_app), with a real worker."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, ClassVar

import flask
import pytest
from flaskshop import LOGO_PNG, create_app, terms_pdf

from mailworker.config import ConfigError
from mailworker.contrib.flask import MailWorker
from mailworker.message import InvalidMessageError
from mailworker.runtime import get_runtime
from mailworker.store import Record
from mailworker.testing import SMTPTestServer
from tests.conftest import WorkerProcess, wait_until
from tests.contrib.conftest import parse, queue_names, store_keys

StartWorker = Callable[..., WorkerProcess]


def app_config(env: dict[str, str], **extra: Any) -> dict[str, Any]:
    """app.config entries pointing the extension at this test's Redis, prefix and queues."""
    return {
        "MAILWORKER_REDIS_URL": env["MAILWORKER_REDIS_URL"],
        "MAILWORKER_KEY_PREFIX": env["MAILWORKER_KEY_PREFIX"],
        "MAILWORKER_CONFIG": env["MAILWORKER_CONFIG"],
        "MAILWORKER_RELAYS": {"default": env.get("MAILWORKER_RELAY_DEFAULT", "smtp://127.0.0.1:2525")},
        **extra,
    }


def record(mid: str) -> tuple[Record, bytes]:
    store = get_runtime().store
    rec, raw = store.get(mid), store.raw(mid)
    assert rec is not None and raw is not None
    return rec, raw


# --- a stand-in for Flask-Mail (not installed): the attributes the extension reads -------


@dataclass
class FlaskMailAttachment:
    filename: str | None = None
    content_type: str | None = None
    data: bytes = b""
    disposition: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FlaskMailMessage:
    subject: str = ""
    recipients: list[str | tuple[str, str]] = field(default_factory=list)
    body: str | None = None
    html: str | None = None
    sender: str | tuple[str, str] | None = None
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    reply_to: str | None = None
    attachments: list[FlaskMailAttachment] = field(default_factory=list)
    extra_headers: dict[str, str] = field(default_factory=dict)


# --- the example app with a real worker --------------------------------------------------


@pytest.mark.integration
def test_example_app_mail_is_delivered_intact(
    worker_env: dict[str, str], smtp_server: SMTPTestServer, start_worker: StartWorker,
) -> None:
    start_worker(env=worker_env)
    client = create_app(app_config(worker_env)).test_client()
    resp = client.post("/welcome", json={"email": "Ann <ann@example.com>", "name": "Ann",
                                         "source": "ad"})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    mid = resp.get_json()["id"]

    [got] = smtp_server.wait_for_messages(1, timeout=20)
    assert got.sender == "shop@example.com" and got.recipients == ("ann@example.com",)
    msg = parse(got.data)
    assert msg["Subject"] == "Welcome, Ann!" and msg["X-Signup-Source"] == "ad"
    assert msg["From"] == "Flask Shop <shop@example.com>"
    html, text = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html is not None and "Hello <b>Ann</b>" in html.get_content()
    assert text is not None
    assert text.get_content().replace("\r\n", "\n") == "Hello Ann, thanks for signing up.\n"
    parts = {p.get_filename(): p for p in msg.walk() if p.get_filename()}
    assert parts["terms.pdf"].get_content() == terms_pdf()
    assert parts["terms.pdf"].get_content_type() == "application/pdf"
    assert parts["logo.png"].get_content() == LOGO_PNG
    assert parts["logo.png"]["Content-ID"] == "<logo.png>"  # what the HTML's cid: names

    def delivered() -> bool:
        body = client.get(f"/messages/{mid}").get_json()
        return bool(body["state"] == "delivered"
                    and body["recipients"] == {"ann@example.com": "delivered"})

    wait_until(delivered, 10, message="status to say delivered")


@pytest.mark.parametrize(("payload", "field_name"), [
    ({"email": "bob@@example.com"}, "to[0]"),
    ({"email": "bob@example.com", "name": "Eve\r\nBcc: victim@example.com"}, "subject"),
    ({"name": "nobody to send to"}, "recipients"),
])
def test_bad_input_is_a_400_and_queues_nothing(mw_env: dict[str, str], payload: dict[str, str],
                                               field_name: str) -> None:
    client = create_app(app_config(mw_env)).test_client()
    resp = client.post("/welcome", json=payload)
    assert resp.status_code == 400
    assert resp.get_json()["field"] == field_name
    assert resp.get_json()["error"].startswith(f"{field_name}: ")
    assert store_keys(mw_env["MAILWORKER_KEY_PREFIX"]) == []


# --- init_app and configuration ------------------------------------------------------------


def test_init_app_with_two_apps(mw_env: dict[str, str]) -> None:
    mw = MailWorker()
    _, bulk = queue_names(mw_env)
    one = flask.Flask("one")
    one.config.update(app_config(mw_env, MAILWORKER_DEFAULT_SENDER="one@example.com"))
    two = flask.Flask("two")
    two.config.update(app_config(mw_env, MAIL_DEFAULT_SENDER=("Two", "two@example.com"),
                                 MAILWORKER_DEFAULT_QUEUE=bulk,
                                 MAILWORKER_KEY_PREFIX=mw_env["MAILWORKER_KEY_PREFIX"] + "b"))
    mw.init_app(one)
    mw.init_app(two)
    assert one.extensions["mailworker"] is mw and two.extensions["mailworker"] is mw

    with one.app_context():
        first = mw.send(to="a@example.com", subject="from one", text="1")
        rec, raw = record(first)
        assert rec.sender == "one@example.com" and rec.queue == queue_names(mw_env)[0]
    with two.app_context():
        second = mw.send(to="a@example.com", subject="from two", text="2")
        rec, raw = record(second)
        assert rec.sender == "two@example.com" and rec.queue == bulk
        assert parse(raw)["From"] == "Two <two@example.com>"
        assert get_runtime().settings.key_prefix == mw_env["MAILWORKER_KEY_PREFIX"] + "b"
        assert mw.status(first) is None  # another store: app two's prefix
    with one.app_context():
        assert mw.status(first) is not None and mw.status(second) is None
        # Apps with equal connection settings share one runtime: no rebuild per send.
        rt = get_runtime()
        mw.send(to="b@example.com", subject="again", text="x")
        assert get_runtime() is rt


def test_single_app_works_without_an_app_context(mw_env: dict[str, str]) -> None:
    app = flask.Flask("single")
    app.config.update(app_config(mw_env, MAILWORKER_DEFAULT_SENDER="solo@example.com"))
    mw = MailWorker(app)
    mid = mw.send(to="a@example.com", subject="s", text="t")
    assert record(mid)[0].sender == "solo@example.com"
    with pytest.raises(RuntimeError, match="no Flask app context"):
        MailWorker().send(to="a@example.com", subject="s", text="t")
    with flask.Flask("other").app_context(), pytest.raises(RuntimeError, match="init_app"):
        MailWorker().send(to="a@example.com", subject="s", text="t")


def test_config_is_checked_at_init_app(mw_env: dict[str, str]) -> None:
    def init(**extra: Any) -> None:
        app = flask.Flask("bad")
        app.config.update(app_config(mw_env, **extra))
        MailWorker(app)

    with pytest.raises(ConfigError, match=r"unknown setting\(s\) REDIS_URI"):
        init(MAILWORKER_REDIS_URI="redis://x")
    with pytest.raises(ConfigError, match="scheme 'http' is not supported"):
        init(MAILWORKER_RELAY_BACKUP="http://mail.example.com")
    with pytest.raises(ConfigError, match="unknown queue 'urgent'"):
        init(MAILWORKER_DEFAULT_QUEUE="urgent")
    with pytest.raises(ConfigError, match="unknown relay 'backup'"):
        init(MAILWORKER_DEFAULT_RELAY="backup")
    # MAILWORKER_RELAY_<NAME> and MAILWORKER_QUEUES define new ones.
    init(MAILWORKER_RELAY_BACKUP="smtp://127.0.0.1:2526", MAILWORKER_DEFAULT_RELAY="backup",
         MAILWORKER_QUEUES={"urgent": {"lifetime": "10m"}}, MAILWORKER_DEFAULT_QUEUE="urgent")


# --- message objects ---------------------------------------------------------------------------


def test_flask_mail_style_message(mw_env: dict[str, str]) -> None:
    app = flask.Flask("fm")
    app.config.update(app_config(mw_env, MAIL_DEFAULT_SENDER=("Shop", "shop@example.com")))
    mw = MailWorker(app)
    pdf = b"%PDF-1.4\n" + bytes(range(256))
    msg = FlaskMailMessage(
        subject="Your invoice", recipients=[("To", "to@example.com")], cc=["cc@example.com"],
        bcc=["audit@example.com"], reply_to="billing@example.com", body="See attached.",
        html='<p>See attached. <img src="cid:logo"></p>', extra_headers={"X-Invoice": "7"},
        attachments=[
            FlaskMailAttachment("invoice.pdf", "application/pdf", pdf),
            FlaskMailAttachment("logo.png", "image/png", LOGO_PNG, "inline",
                                {"Content-ID": "<logo>"}),
        ],
    )
    with app.app_context():
        mid = mw.send_message(msg)
    rec, raw = record(mid)
    assert rec.sender == "shop@example.com"
    assert [r.address for r in rec.recipients] == ["to@example.com", "cc@example.com",
                                                  "audit@example.com"]
    parsed = parse(raw)
    assert "Bcc" not in parsed and b"audit@" not in raw
    assert parsed["From"] == "Shop <shop@example.com>" and parsed["To"] == "To <to@example.com>"
    assert parsed["Cc"] == "cc@example.com"
    assert parsed["Reply-To"] == "billing@example.com" and parsed["X-Invoice"] == "7"
    parts = {p.get_filename(): p for p in parsed.walk() if p.get_filename()}
    assert parts["invoice.pdf"].get_content() == pdf
    assert parts["logo.png"]["Content-ID"] == "<logo>"
    assert parts["logo.png"].get_content_disposition() == "inline"

    msg.attachments[0].headers = {"X-Custom": "1"}
    with app.app_context(), pytest.raises(InvalidMessageError, match="only Content-ID"):
        mw.send_message(msg)


def test_email_message_and_django_style_objects(mw_env: dict[str, str]) -> None:
    app = flask.Flask("em")
    app.config.update(app_config(mw_env))
    mw = MailWorker(app)
    em = EmailMessage()
    em["From"], em["To"], em["Subject"] = "a@example.com", "b@example.com", "plain"
    em.set_content("hi")

    class MailmanStyle:  # Flask-Mailman's EmailMessage has Django's interface
        from_email = "c@example.com"
        mailworker_metadata: ClassVar[dict[str, str]] = {"via": "mailman"}

        def message(self) -> EmailMessage:
            return em

        def recipients(self) -> list[str]:
            return ["d@example.com", "e@example.com"]

    with app.app_context():
        first, second = mw.send_many([em, MailmanStyle()])
        third = mw.send_message(em, recipients=["f@example.com"])
        fourth = mw.send_message(MailmanStyle(), sender="g@example.com", metadata={"x": 1})
    assert [r.address for r in record(first)[0].recipients] == ["b@example.com"]
    rec = record(second)[0]
    assert rec.sender == "c@example.com" and rec.metadata == {"via": "mailman"}
    assert [r.address for r in rec.recipients] == ["d@example.com", "e@example.com"]
    assert [r.address for r in record(third)[0].recipients] == ["f@example.com"]
    rec = record(fourth)[0]  # explicit arguments win over the message's
    assert rec.sender == "g@example.com" and rec.metadata == {"x": 1}
    with app.app_context(), pytest.raises(TypeError, match="not int"):
        mw.send_message(42)


def test_framework_settings_get_the_same_checks_as_the_config_file() -> None:
    from mailworker.config import ConfigError
    from mailworker.contrib import build_settings

    env = {"SMTP_PW": "s3cret"}
    ok = build_settings({"relays": {"r": {"dsn": "smtp://u@h:25", "password_env": "SMTP_PW",
                                          "timeout": 5}},
                         "queues": {"slow": {"max_attempts": 3}}},
                        where="app", environ=env)
    assert ok.relays["r"].password == "s3cret" and ok.relays["r"].timeout == 5
    assert ok.queues["slow"].lifetime is None  # unset: the retry policy's own lifetime
    with pytest.raises(ConfigError, match="lease_seconds=1s is too short"):
        build_settings({"relays": {"r": {"dsn": "smtp://h:25"}}, "lease_seconds": "1"},
                       where="app", environ=env)
    with pytest.raises(ConfigError, match="unknown key"):
        build_settings({"queues": {"q": {"lifetme": "1h"}}}, where="app", environ=env)
