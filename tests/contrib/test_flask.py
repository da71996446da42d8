"""The Flask extension and the example app (examples/flask_app), with a real worker."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ClassVar

import flask
import pytest
from flaskshop import LOGO_PNG, create_app, terms_pdf

from mailworker.config import ConfigError
from mailworker.contrib.flask import MailWorker
from mailworker.message import Attachment, InvalidMessageError
from mailworker.runtime import get_runtime
from mailworker.store import MessageState, Record
from mailworker.testing import SMTPTestServer
from tests.conftest import ROOT, WorkerProcess, wait_until
from tests.contrib.conftest import framework_worker, parse, queue_names, store_keys

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


# --- Flask-Mail habits ---------------------------------------------------------------------


def test_flask_mail_argument_names_tuples_and_attachments(mw_env: dict[str, str]) -> None:
    import flask_mail

    app = flask.Flask("names")
    app.config.update(app_config(mw_env))
    mw = MailWorker(app)
    pdf = b"%PDF-1.4\n" + bytes(range(256))
    mid = mw.send(
        recipients=[("Ann Äbel", "ann@example.com"), "bob@example.com"], subject="Invoice",
        body="See attached.", html="<p>See attached.</p>",
        sender=("Shop, Inc.", "shop@example.com"), cc=[("Cy", "cy@example.com")],
        bcc=["audit@example.com"], reply_to=("Help", "help@example.com"),
        extra_headers={"X-Invoice": "7"},
        attachments=[flask_mail.Attachment("invoice.pdf", "application/pdf", pdf),
                     ("notes.txt", "plain notes", "text/plain")],
    )
    rec, raw = record(mid)
    assert rec.sender == "shop@example.com"
    assert [r.address for r in rec.recipients] == ["ann@example.com", "bob@example.com",
                                                  "cy@example.com", "audit@example.com"]
    msg = parse(raw)
    assert msg["From"] == '"Shop, Inc." <shop@example.com>'
    assert msg["To"] == "Ann Äbel <ann@example.com>, bob@example.com"
    assert msg["Cc"] == "Cy <cy@example.com>" and msg["Reply-To"] == "Help <help@example.com>"
    assert msg["X-Invoice"] == "7" and "Bcc" not in msg
    assert msg.get_body(("plain",)).get_content().strip() == "See attached."  # type: ignore[union-attr]
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    assert parts["invoice.pdf"].get_content() == pdf
    assert parts["notes.txt"].get_content().strip() == "plain notes"

    with pytest.raises(TypeError, match="both recipients= and to="):
        mw.send(recipients=["a@example.com"], to=["b@example.com"], body="x")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) bodyy; it takes"):
        mw.send(recipients=["a@example.com"], bodyy="x")


def test_swapped_attachment_is_a_short_clear_error(mw_env: dict[str, str]) -> None:
    app = flask.Flask("swap")
    app.config.update(app_config(mw_env, MAILWORKER_DEFAULT_SENDER="shop@example.com"))
    mw = MailWorker(app)
    big = b"%PDF-1.4\n" + bytes(range(256)) * 100  # 25 KB: none of it may be in the error
    for swapped in (("invoice.pdf", "application/pdf", big),
                    Attachment("invoice.pdf", "application/pdf", big)):  # type: ignore[arg-type]
        with pytest.raises(InvalidMessageError) as err:
            mw.send(to="a@example.com", text="x", attachments=[swapped])
        assert err.value.field == "attachments[0]"
        assert "swap" in str(err.value) and "Flask-Mail's order" in str(err.value)
        assert len(str(err.value)) < 300
    assert store_keys(mw_env["MAILWORKER_KEY_PREFIX"]) == []


def test_flask_mail_message_through_send_without_mail_initialised(mw_env: dict[str, str]) -> None:
    """``mw.send(flask_mail.Message(...))``; Message() needs no Mail(app) for its sender."""
    import flask_mail

    app = flask.Flask("fmsend")
    app.config.update(app_config(mw_env, MAIL_DEFAULT_SENDER=("Shop", "shop@example.com")))
    mw = MailWorker(app)
    with app.app_context():
        msg = flask_mail.Message("Hello", recipients=["ann@example.com"], body="hi")
        msg.attach("logo.png", "image/png", LOGO_PNG, "inline", {"Content-ID": "<logo>"})
        mid = mw.send(msg)
    rec, raw = record(mid)
    assert rec.sender == "shop@example.com" and parse(raw)["From"] == "Shop <shop@example.com>"
    parts = [p for p in parse(raw).walk() if p.get_filename() == "logo.png"]
    assert parts[0].get_content() == LOGO_PNG and parts[0]["Content-ID"] == "<logo>"


def without_relay_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests need no relay defined outside app.config (a developer's shell may have one)."""
    for name in [k for k in os.environ if k.startswith("MAILWORKER_RELAY")]:
        monkeypatch.delenv(name)


def test_flask_mail_config_keys_make_the_default_relay(mw_env: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    without_relay_variables(monkeypatch)
    base = {k: v for k, v in app_config(mw_env).items() if k != "MAILWORKER_RELAYS"}

    def relays(**mail: Any) -> dict[str, Any]:
        app = flask.Flask("fmconf")
        app.config.update(base, **mail)
        mw = MailWorker(app)
        state = mw._states[app]
        assert state.settings is not None
        return dict(state.settings.relays)

    r = relays(MAIL_SERVER="smtp.example.com", MAIL_PORT=587, MAIL_USE_TLS=True,
               MAIL_USERNAME="me@example.com", MAIL_PASSWORD="s3cret-pw")["default"]
    assert (r.host, r.port, r.security, r.verify) == ("smtp.example.com", 587, "starttls", True)
    assert (r.username, r.password) == ("me@example.com", "s3cret-pw")
    assert not r.allow_plain_auth  # plain AUTH rules unchanged
    assert "s3cret" not in repr(r) and "s3cret" not in r.dsn
    ssl = relays(MAIL_SERVER="smtp.example.com", MAIL_USE_SSL=True)["default"]
    assert (ssl.port, ssl.security) == (465, "tls")
    plain = relays(MAIL_SERVER="127.0.0.1", MAIL_PORT=2525)["default"]
    assert (plain.port, plain.security, plain.username) == (2525, "starttls-optional", None)
    # MAILWORKER_* relays win, in app.config or the environment.
    explicit = relays(MAIL_SERVER="ignored.example.com", MAILWORKER_RELAY_DEFAULT="smtp://mx:25")
    assert explicit["default"].host == "mx"
    monkeypatch.setenv("MAILWORKER_RELAY_DEFAULT", "smtp://from-env:25")
    assert relays(MAIL_SERVER="ignored.example.com")["default"].host == "from-env"
    monkeypatch.delenv("MAILWORKER_RELAY_DEFAULT")
    with pytest.raises(ConfigError, match="MAIL_USE_SSL and MAIL_USE_TLS are both set"):
        relays(MAIL_SERVER="smtp.example.com", MAIL_USE_SSL=True, MAIL_USE_TLS=True)
    with pytest.raises(ConfigError, match="MAIL_PASSWORD is set but MAIL_USERNAME is not"):
        relays(MAIL_SERVER="smtp.example.com", MAIL_PASSWORD="s3cret-pw")
    with pytest.raises(ConfigError, match="MAIL_SERVER/MAIL_PORT") as err:
        relays(MAIL_SERVER="smtp.example.com", MAIL_PORT=99999, MAIL_USERNAME="u",
               MAIL_PASSWORD="s3cret-pw")
    assert "s3cret" not in str(err.value)


# --- flask mailworker ----------------------------------------------------------------------


def test_flask_cli_command_uses_the_app_config(mw_env: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    without_relay_variables(monkeypatch)
    app = flask.Flask("cli")
    app.config.update({k: v for k, v in app_config(mw_env).items() if k != "MAILWORKER_RELAYS"})
    MailWorker(app)
    runner = app.test_cli_runner()
    version = runner.invoke(args=["mailworker", "--version"])
    assert version.exit_code == 0 and version.output.startswith("mailworker ")
    # No relay anywhere: the worker refuses at once (exit 3) instead of deferring mail.
    refused = runner.invoke(args=["mailworker", "worker"])
    assert refused.exit_code == 3
    assert "no relay is configured" in refused.output and "Traceback" not in refused.output
    # The command's runtime is the app's: its key prefix, not the environment's.
    stats = runner.invoke(args=["mailworker", "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    assert get_runtime().settings.key_prefix == mw_env["MAILWORKER_KEY_PREFIX"]


APP_MODULE = '''
from flask import Flask
from mailworker.contrib.flask import MailWorker

mw = MailWorker()


def create_app():
    app = Flask("configonce")
    app.config.update({config!r})
    mw.init_app(app)
    return app
'''


@pytest.mark.integration
def test_flask_mailworker_worker_reads_app_config_only(
    mw_env: dict[str, str], smtp_server: SMTPTestServer, tmp_path: Path,
) -> None:
    """Config lives once: the worker gets Redis, queues and the relay (from Flask-Mail's
    MAIL_* keys) from the app; its environment holds no MAILWORKER_* variable at all."""
    host, port = smtp_server.dsn().removeprefix("smtp://").split("?")[0].rsplit(":", 1)
    config = {**{k: v for k, v in app_config(mw_env).items() if k != "MAILWORKER_RELAYS"},
              "MAILWORKER_TICK_INTERVAL": "0.2",
              "MAIL_SERVER": host, "MAIL_PORT": int(port),
              "MAIL_DEFAULT_SENDER": ("Config Once", "once@example.com")}
    (tmp_path / "configonce.py").write_text(APP_MODULE.format(config=config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    argv = [sys.executable, "-m", "flask", "--app", "configonce:create_app", "mailworker",
            "worker", "-Q", mw_env["MW_TEST_QUEUES"], "-c", "2"]
    with framework_worker(argv, env, tmp_path / "flask-worker.log", cwd=tmp_path):
        sys.path.insert(0, str(tmp_path))
        try:
            from configonce import create_app as make  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(tmp_path))
        with make().app_context():
            ext = flask.current_app.extensions["mailworker"]
            mid = ext.send(recipients=["ann@example.com"], subject="once", body="hi")
        [got] = smtp_server.wait_for_messages(1, timeout=20)
        assert got.sender == "once@example.com" and got.recipients == ("ann@example.com",)
        # (A delivered record keeps no body: read its state alone.)
        wait_until(lambda: getattr(get_runtime().store.get(mid), "state", None)
                   == MessageState.DELIVERED, 10,
                   message="the record to say delivered")
