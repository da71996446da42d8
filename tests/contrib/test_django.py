"""The Django integration: the email backend, settings, signals, and the example project.

Django is configured once for this process from the example project's settings
(examples/django_app), on an SQLite file of its own. No test runs inside Django's
TestCase transaction: on-commit callbacks must really fire (or really not).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from email.mime.image import MIMEImage
from pathlib import Path
from typing import Any

import django
import pytest
import structlog
from django.conf import settings
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import transaction
from django.test import Client, override_settings

from mailworker import api
from mailworker.config import ConfigError
from mailworker.hooks import hooks
from mailworker.message import InvalidMessageError
from mailworker.runtime import get_runtime
from mailworker.store import MessageState, Record
from mailworker.testing import SMTPTestServer
from tests.conftest import ROOT, WorkerProcess, wait_until
from tests.contrib.conftest import EXAMPLES, framework_worker, parse, queue_names, store_keys

EXAMPLE = EXAMPLES / "django_app"
StartWorker = Callable[..., WorkerProcess]
Queued = list[tuple[Record, bytes]]


@pytest.fixture(scope="module")
def django_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Set Django up from the example's settings, with a fresh SQLite database."""
    db = tmp_path_factory.mktemp("django") / "mailshop.sqlite3"
    if not settings.configured:
        import mailshop.settings as example  # read only now: it reads the environment

        values = {k: getattr(example, k) for k in dir(example) if k.isupper()}
        values["DATABASES"] = {"default": {**values["DATABASES"]["default"], "NAME": str(db)}}
        values["MAILWORKER"] = {}
        settings.configure(**values)
        django.setup()
    call_command("migrate", verbosity=0)
    return Path(settings.DATABASES["default"]["NAME"])


def mailworker_setting(env: dict[str, str], **extra: Any) -> dict[str, Any]:
    """settings.MAILWORKER for a test, from its mw_env."""
    return {
        "REDIS_URL": env["MAILWORKER_REDIS_URL"],
        "KEY_PREFIX": env["MAILWORKER_KEY_PREFIX"],
        "CONFIG": env["MAILWORKER_CONFIG"],
        "RELAYS": {"default": env.get("MAILWORKER_RELAY_DEFAULT", "smtp://127.0.0.1:2525")},
        **extra,
    }


@pytest.fixture
def mw_settings(django_db: Path, mw_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    conf = mailworker_setting(mw_env)
    with override_settings(MAILWORKER=conf):
        yield conf


@pytest.fixture
def queued(mw_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Queued:
    """Everything the backend queues (records really go to Redis too)."""
    captured: Queued = []
    real = api.enqueue_prepared

    def capture(items: Any) -> list[str]:
        captured.extend(items)
        return real(items)

    monkeypatch.setattr(api, "enqueue_prepared", capture)
    return captured


# --- the backend: envelope and headers --------------------------------------------------


def test_send_mail_is_queued_with_envelope_and_headers(queued: Queued,
                                                       mw_env: dict[str, str]) -> None:
    assert mail.send_mail("Hello", "Body text", "Shop <shop@example.com>",
                          ["a@example.com", "B <b@example.com>"]) == 1
    [(rec, raw)] = queued
    assert rec.sender == "shop@example.com"
    assert [r.address for r in rec.recipients] == ["a@example.com", "b@example.com"]
    assert rec.queue == queue_names(mw_env)[0]  # the CONFIG file's default_queue
    msg = parse(raw)
    assert msg["Subject"] == "Hello" and msg["From"] == "Shop <shop@example.com>"
    assert msg.get_content().strip() == "Body text"
    # The record is in Redis, under the configured prefix, byte for byte.
    status = api.status(rec.id)
    assert status is not None and status["state"] == MessageState.QUEUED
    assert get_runtime().store.raw(rec.id) == raw
    assert get_runtime().settings.key_prefix == settings.MAILWORKER["KEY_PREFIX"]


def test_send_mass_mail_queues_each_message(queued: Queued) -> None:
    sent = mail.send_mass_mail([
        ("One", "1", "shop@example.com", ["one@example.com"]),
        ("Two", "2", "shop@example.com", ["two@example.com", "deux@example.com"]),
    ])
    assert sent == 2
    assert [[r.address for r in rec.recipients] for rec, _ in queued] == [
        ["one@example.com"], ["two@example.com", "deux@example.com"]]
    assert [parse(raw)["Subject"] for _, raw in queued] == ["One", "Two"]


def test_mail_admins(queued: Queued) -> None:
    mail.mail_admins("Disk full", "Free some space", html_message="<b>Free</b> some space")
    [(rec, raw)] = queued
    assert [r.address for r in rec.recipients] == ["ops@example.com"]
    assert rec.sender == "shop@example.com"  # SERVER_EMAIL
    msg = parse(raw)
    assert msg["Subject"] == "[Django] Disk full"
    html = msg.get_body(("html",))
    assert html is not None and html.get_content().strip() == "<b>Free</b> some space"


def test_cc_bcc_reply_to_headers_html_and_attachments(queued: Queued) -> None:
    msg = mail.EmailMultiAlternatives(
        "Report", "See attached.", "shop@example.com", ["to@example.com"],
        cc=["cc@example.com"], bcc=["hidden@example.com"], reply_to=["help@example.com"],
        headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    msg.attach_alternative('<p>See <img src="cid:chart"></p>', "text/html")
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256))
    msg.attach("report.pdf", pdf, "application/pdf")
    image = MIMEImage(b"\x89PNG\r\n\x1a\n" + bytes(64), "png")
    image.add_header("Content-ID", "<chart>")
    image.add_header("Content-Disposition", "inline", filename="chart.png")
    msg.attach(image)
    assert msg.send() == 1

    [(rec, raw)] = queued
    assert msg.mailworker_id == rec.id
    assert [r.address for r in rec.recipients] == [
        "to@example.com", "cc@example.com", "hidden@example.com"]
    parsed = parse(raw)
    assert "Bcc" not in parsed and b"hidden@example.com" not in raw
    assert parsed["Cc"] == "cc@example.com" and parsed["Reply-To"] == "help@example.com"
    assert parsed["X-Campaign"] == "spring"
    assert parsed["List-Unsubscribe"] == "<mailto:u@example.com>"
    html = parsed.get_body(("html",))
    assert html is not None and 'cid:chart' in html.get_content()
    parts = {p.get_filename(): p for p in parsed.iter_attachments()}
    assert parts["report.pdf"].get_content() == pdf
    assert parts["chart.png"]["Content-ID"] == "<chart>"
    assert parts["chart.png"].get_content_disposition() == "inline"


def test_message_without_recipients_is_skipped(queued: Queued) -> None:
    assert mail.EmailMessage("x", "y", "shop@example.com", []).send() == 0
    assert queued == []


def test_routing_attributes(queued: Queued, mw_env: dict[str, str]) -> None:
    _, bulk = queue_names(mw_env)
    first = mail.EmailMessage("News", "n", "shop@example.com", ["a@example.com"])
    first.mailworker_queue = bulk
    first.mailworker_idempotency_key = "newsletter-42-a"
    first.mailworker_metadata = {"campaign": 42}
    again = mail.EmailMessage("News", "n", "shop@example.com", ["a@example.com"])
    again.mailworker_idempotency_key = "newsletter-42-a"
    assert mail.get_connection().send_messages([first, again]) == 2
    assert queued[0][0].queue == bulk and queued[0][0].metadata == {"campaign": 42}
    # The second is the same message by its key: it maps to the first id, sent once.
    assert again.mailworker_id == first.mailworker_id
    assert len(store_keys(mw_env["MAILWORKER_KEY_PREFIX"])) == 1

    lost = mail.EmailMessage("x", "y", "shop@example.com", ["a@example.com"])
    lost.mailworker_relay = "nowhere"
    with pytest.raises(ConfigError, match="unknown relay 'nowhere'"):
        lost.send()


# --- validation and fail_silently --------------------------------------------------------


def test_bad_address_raises_and_queues_nothing(queued: Queued) -> None:
    good = mail.EmailMessage("ok", "x", "shop@example.com", ["a@example.com"])
    bad = mail.EmailMessage("bad", "x", "shop@example.com", ["not an address"])
    with pytest.raises(InvalidMessageError) as err:
        mail.get_connection().send_messages([good, bad])
    assert "contains a space" in str(err.value)
    assert any("message 1 of 2" in note for note in err.value.__notes__)
    assert queued == []
    # Header injection: Django refuses it first (BadHeaderError is a ValueError).
    with pytest.raises(ValueError, match="newlines"):
        mail.send_mail("Hi", "x", "shop@example.com", ["a@example.com\r\nBcc: x@evil.test"])
    assert mail.send_mail("Hi", "x", "shop@example.com", ["a@example.com\nBcc: x@evil.test"],
                          fail_silently=True) == 0


def test_fail_silently_logs_and_counts_accepted(queued: Queued) -> None:
    with structlog.testing.capture_logs() as logs:
        assert mail.send_mail("Hi", "x", "shop@example.com", ["nobody"], fail_silently=True) == 0
        assert mail.send_mass_mail([
            ("bad", "x", "shop@example.com", ["a@@example.com"]),
            ("good", "x", "shop@example.com", ["b@example.com"]),
        ], fail_silently=True) == 1
    assert [parse(raw)["Subject"] for _, raw in queued] == ["good"]
    rejected = [e for e in logs if e["event"] == "django.message_rejected"]
    assert len(rejected) == 2 and "'@'" in rejected[0]["error"]


def test_fail_silently_when_redis_is_down(django_db: Path, mw_env: dict[str, str]) -> None:
    """Redis down is mailworker.QueueUnavailable, an OSError like smtplib's errors: code
    written for Django's SMTP backend catches it, and fail_silently honours it."""
    conf = mailworker_setting(mw_env, REDIS_URL="redis://127.0.0.1:1/0")
    with override_settings(MAILWORKER=conf), structlog.testing.capture_logs() as logs:
        quiet = mail.EmailMessage("Hi", "x", "shop@example.com", ["a@example.com"])
        assert mail.get_connection(fail_silently=True).send_messages([quiet]) == 0
        assert quiet.mailworker_id is None  # not queued: no id
        loud = mail.EmailMessage("Hi", "x", "shop@example.com", ["a@example.com"])
        with pytest.raises(OSError, match=r"(?i)redis") as err:
            loud.send()
        assert type(err.value).__name__ == "QueueUnavailable" and loud.mailworker_id is None
        # Inside a transaction: raised at commit (the data is saved), or logged when silent.
        with transaction.atomic():
            later = mail.EmailMessage("Hi", "x", "shop@example.com", ["a@example.com"])
            assert later.send(fail_silently=True) == 1 and later.mailworker_id is not None
        assert later.mailworker_id is None
    failed = [e["event"] for e in logs if e["log_level"] == "error"]
    assert failed == ["django.enqueue_failed", "django.enqueue_failed"]


def test_review_f5_uncertain_enqueue_keeps_the_ids_for_status(
        mw_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost Redis answer (QueueUncertain; the real path is in tests/unit/test_api_redis)
    may have queued the mail: the messages keep their ids, and the log says so."""
    import mailworker

    def lost(items: Any) -> list[str]:
        raise mailworker.QueueUncertain("Redis's answer was lost; it may have been queued")

    monkeypatch.setattr(api, "enqueue_prepared", lost)
    with structlog.testing.capture_logs() as logs:
        quiet = mail.EmailMessage("Hi", "x", "shop@example.com", ["a@example.com"])
        assert mail.get_connection(fail_silently=True).send_messages([quiet]) == 0
        assert quiet.mailworker_id is not None
        loud = mail.EmailMessage("Hi", "x", "shop@example.com", ["a@example.com"])
        with pytest.raises(mailworker.QueueUncertain):
            loud.send()
        assert loud.mailworker_id is not None and loud.mailworker_id != quiet.mailworker_id
    failed = [e for e in logs if e["event"] == "django.enqueue_failed"]
    assert [e["maybe_queued"] for e in failed] == [True]


def test_mailworker_id_only_on_messages_queued(queued: Queued) -> None:
    good = mail.EmailMessage("ok", "x", "shop@example.com", ["a@example.com"])
    bad = mail.EmailMessage("bad", "x", "shop@example.com", ["not an address"])
    empty = mail.EmailMessage("nobody", "x", "shop@example.com", [])
    with pytest.raises(InvalidMessageError):
        mail.get_connection().send_messages([good, bad])
    assert good.mailworker_id is None and bad.mailworker_id is None  # none of it queued
    assert mail.get_connection(fail_silently=True).send_messages([good, bad, empty]) == 1
    assert good.mailworker_id == queued[0][0].id
    assert bad.mailworker_id is None and empty.mailworker_id is None

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        dropped = mail.EmailMessage("dropped", "x", "shop@example.com", ["a@example.com"])
        dropped.send()
        reserved = dropped.mailworker_id  # known inside, to store with the app's own rows
        raise Rollback
    assert reserved is not None and api.status(reserved) is None
    assert [rec.id for rec, _ in queued] == [good.mailworker_id]


# --- transactions ---------------------------------------------------------------------------


def test_queued_on_commit_only(queued: Queued) -> None:
    with transaction.atomic():
        mail.send_mail("Kept", "x", "shop@example.com", ["a@example.com"])
        assert queued == []  # validated, not yet queued
    assert [parse(raw)["Subject"] for _, raw in queued] == ["Kept"]

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        mail.send_mail("Dropped", "x", "shop@example.com", ["a@example.com"])
        raise Rollback
    with transaction.atomic():
        try:
            with transaction.atomic():  # a savepoint rolled back inside a committed block
                mail.send_mail("Savepoint", "x", "shop@example.com", ["a@example.com"])
                raise Rollback
        except Rollback:
            pass
    assert [parse(raw)["Subject"] for _, raw in queued] == ["Kept"]


def test_enqueue_on_commit_false_queues_at_once(queued: Queued,
                                               mw_settings: dict[str, Any]) -> None:
    class Rollback(Exception):
        pass

    with override_settings(MAILWORKER={**mw_settings, "ENQUEUE_ON_COMMIT": False}):
        with pytest.raises(Rollback), transaction.atomic():
            mail.send_mail("Now", "x", "shop@example.com", ["a@example.com"])
            assert len(queued) == 1
            raise Rollback
        # The backend keyword wins over the setting.
        with pytest.raises(Rollback), transaction.atomic():
            conn = mail.get_connection(enqueue_on_commit=True)
            mail.send_mail("Later", "x", "shop@example.com", ["a@example.com"], connection=conn)
            raise Rollback
    assert [parse(raw)["Subject"] for _, raw in queued] == ["Now"]


# --- settings ---------------------------------------------------------------------------------


def test_settings_mapping(django_db: Path, mw_env: dict[str, str]) -> None:
    from mailworker.contrib.django.backend import configured_settings

    conf = mailworker_setting(mw_env, QUEUES={"reports": {"lifetime": "2h"}},
                              DEFAULT_QUEUE="reports", RETENTION="1d",
                              RELAYS={"default": "smtp://127.0.0.1:2525",
                                      "Bulk": {"dsn": "smtp://127.0.0.1:2526", "timeout": 5}})
    with override_settings(MAILWORKER=conf):
        s = configured_settings()
        assert s is not None
        assert s.default_queue == "reports" and s.queue().lifetime == 7200
        assert s.retention == 86400 and s.relay("Bulk").timeout == 5
        assert s.key_prefix == mw_env["MAILWORKER_KEY_PREFIX"]
        assert configured_settings() is s  # built once
    unknown = r"settings.MAILWORKER: unknown setting\(s\) REDIS"
    with override_settings(MAILWORKER={**conf, "REDIS": "x"}), \
            pytest.raises(ImproperlyConfigured, match=unknown):
        configured_settings()
    with override_settings(MAILWORKER={**conf, "RETENTION": "soon"}), \
            pytest.raises(ImproperlyConfigured, match="retention='soon'"):
        configured_settings()
    with override_settings(MAILWORKER={"ENQUEUE_ON_COMMIT": False}):
        assert configured_settings() is None  # the runtime is left to the environment


def test_system_check_reports_a_bad_mailworker_setting(django_db: Path,
                                                       mw_env: dict[str, str]) -> None:
    from django.core.management.base import SystemCheckError

    from mailworker.contrib.django.checks import check_mailworker_setting

    good = mailworker_setting(mw_env)

    def errors(value: Any) -> list[tuple[str, str, str]]:
        with override_settings(MAILWORKER=value):
            return [(e.id, e.msg, e.hint) for e in check_mailworker_setting()]

    assert errors(good) == []
    assert errors({"ENQUEUE_ON_COMMIT": False}) == []
    [(eid, msg, hint)] = errors({**good, "REDIS_URI": "redis://x"})
    assert eid == "mailworker.E002" and "REDIS_URI" in msg and "REDIS_URL" in hint
    [(eid, msg, hint)] = errors({**good, "RELAYS": {"default": "smtpx://mail.example.com"}})
    assert eid == "mailworker.E003" and "scheme 'smtpx'" in msg and "smtp+starttls://" in hint
    [(eid, msg, hint)] = errors({**good, "DEFAULT_QUEUE": "urgent"})
    assert eid == "mailworker.E004" and "'urgent'" in msg and "QUEUES" in hint
    [(eid, msg, hint)] = errors({**good, "DEFAULT_RELAY": "backup"})
    assert eid == "mailworker.E005" and "known relays: default" in hint
    assert [e[0] for e in errors({**good, "RETENTION": "soon"})] == ["mailworker.E006"]
    assert [e[0] for e in errors(["not", "a", "dict"])] == ["mailworker.E001"]
    assert [e[0] for e in errors({"DATABASE": "replica", "ENQUEUE_ON_COMMIT": "yes"})] == [
        "mailworker.E008", "mailworker.E007"]
    # Defining what the defaults name is fine.
    assert errors({**good, "QUEUES": {"urgent": {"lifetime": "1h"}}, "DEFAULT_QUEUE": "urgent",
                   "RELAYS": {"default": "smtp://h:25", "backup": "smtp://h2:25"},
                   "DEFAULT_RELAY": "backup"}) == []
    # Registered by the app: `manage.py check` fails on it, naming the id.
    with override_settings(MAILWORKER={**good, "REDIS_URI": "x"}), \
            pytest.raises(SystemCheckError, match=r"mailworker\.E002"):
        call_command("check")


def test_review_f15_system_check_names_odd_shapes_never_a_traceback(
        django_db: Path, mw_env: dict[str, str]) -> None:
    from mailworker.contrib.django.checks import check_mailworker_setting

    good = mailworker_setting(mw_env)

    def errors(**changes: Any) -> list[tuple[str, str]]:
        with override_settings(MAILWORKER={**good, **changes}):
            return [(e.id, e.msg) for e in check_mailworker_setting()]

    [(eid, msg)] = errors(QUEUES="transactional")
    assert eid == "mailworker.E006" and "QUEUES must be a dict" in msg
    [(eid, msg)] = errors(QUEUES={"q": "24h"})
    assert eid == "mailworker.E006" and "QUEUES['q'] must be a dict" in msg
    for relay in (["smtp://h:25"], 25, None):
        [(eid, msg)] = errors(RELAYS={"default": relay})
        assert eid == "mailworker.E003" and "must be a DSN" in msg, msg
    [(eid, msg)] = errors(REDIS_URL="http://cache.example.com")
    assert eid == "mailworker.E006" and "redis_url=" in msg and "redis://" in msg
    [(eid, msg)] = errors(REDIS_URL=5)
    assert eid == "mailworker.E006" and "not a Redis URL" in msg
    [(eid, msg)] = errors(BROKER_URL="localhost")
    assert eid == "mailworker.E006" and "broker_url=" in msg


def test_signals_connect_in_ready_not_on_import() -> None:
    """Importing the backend connects nothing; the installed app's ready() does."""
    code = """if True:
        import django
        from django.conf import settings
        settings.configure(INSTALLED_APPS=THE_APPS,
                           EMAIL_BACKEND="mailworker.contrib.django.EmailBackend")
        django.setup()
        import mailworker.contrib.django.backend
        from mailworker.hooks import hooks
        print(sorted(f.__qualname__ for fns in hooks._hooks.values() for f in fns))
    """
    out = []
    for apps in ([], ["mailworker.contrib.django"]):
        p = subprocess.run([sys.executable, "-c", code.replace("THE_APPS", repr(apps))], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0, p.stderr
        out.append(p.stdout.strip())
    assert out == ["[]", "['django_signal_dead_lettered', 'django_signal_delivered', "
                         "'django_signal_failed']"]


# --- signals ------------------------------------------------------------------------------------


def test_hooks_send_django_signals(django_db: Path) -> None:
    from mailworker.contrib.django.signals import (
        message_dead_lettered,
        message_delivered,
        message_failed,
    )

    seen: list[tuple[str, Any, Record]] = []

    def receiver(name: str) -> Callable[..., None]:
        def fn(sender: Any, record: Record, **kwargs: Any) -> None:
            seen.append((name, sender, record))
        return fn

    def broken(sender: Any, record: Record, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    receivers = [receiver("delivered"), receiver("failed"), receiver("dead")]
    message_delivered.connect(broken)
    message_delivered.connect(receivers[0])
    message_failed.connect(receivers[1])
    message_dead_lettered.connect(receivers[2])
    try:
        rec = Record(id="abc", queue="q", relay="default", sender="s@example.com",
                     recipients=[], created_at=0, expires_at=1, size=1,
                     state=MessageState.DELIVERED)
        with structlog.testing.capture_logs() as logs:
            hooks.fire("delivered", rec)
        hooks.fire("failed", rec)
        hooks.fire("dead_lettered", rec)
    finally:
        message_delivered.disconnect(broken)
        message_delivered.disconnect(receivers[0])
        message_failed.disconnect(receivers[1])
        message_dead_lettered.disconnect(receivers[2])
    assert seen == [("delivered", None, rec), ("failed", None, rec), ("dead", None, rec)]
    assert [e["event"] for e in logs] == ["django.signal_receiver_failed"]


# --- the example project, with a real worker ---------------------------------------------------


@pytest.mark.integration
def test_rolled_back_order_sends_nothing_committed_order_is_delivered(
    django_db: Path, worker_env: dict[str, str], smtp_server: SMTPTestServer,
    start_worker: StartWorker,
) -> None:
    start_worker(env=worker_env)
    client = Client()
    with override_settings(MAILWORKER=mailworker_setting(worker_env)):
        declined = client.post("/orders/declined/", {"email": "ann@example.com", "item": "mug"})
        assert declined.status_code == 402
        placed = client.post("/orders/", {"email": "bob@example.com", "item": "teapot"})
        assert placed.status_code == 201, placed.content
        order, mid = placed.json()["order"], placed.json()["mailworker_id"]

        [got] = smtp_server.wait_for_messages(1, timeout=20)
        wait_until(lambda: client.get(f"/orders/{order}/").json()["mailworker"]["state"]
                   == "delivered", 10, message="status to say delivered")
        bad = client.post("/orders/", {"email": "bob@@example.com"})
        assert bad.status_code == 400 and bad.json()["field"] == "recipients[0]"

    # Only the committed order's mail exists anywhere: never queued, not merely late.
    assert len(smtp_server.messages) == 1
    assert store_keys(worker_env["MAILWORKER_KEY_PREFIX"]) == [
        f"{worker_env['MAILWORKER_KEY_PREFIX']}:m:{mid}".encode()]
    assert got.recipients == ("bob@example.com",) and got.sender == "shop@example.com"

    from mailshop.orders.mail import LOGO_PNG, invoice_pdf
    from mailshop.orders.models import Order

    msg = parse(got.data)
    assert msg["Subject"] == f"Order #{order} confirmed" and msg["X-Order-Id"] == str(order)
    assert msg["Reply-To"] == "Mail Shop support <support@example.com>"
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    assert html is not None and text is not None
    assert f"<b>#{order}</b> (teapot)" in html.get_content()
    assert "(teapot) is on its way" in text.get_content()
    parts = {p.get_filename(): p for p in msg.iter_attachments()}
    assert parts[f"invoice-{order}.pdf"].get_content() == invoice_pdf(Order.objects.get(pk=order))
    assert parts[f"invoice-{order}.pdf"].get_content_type() == "application/pdf"
    assert parts["logo.png"].get_content() == LOGO_PNG
    assert parts["logo.png"]["Content-ID"] == "<logo>"


@pytest.mark.integration
def test_manage_py_worker_sends_signals_to_receivers(
    django_db: Path, worker_env: dict[str, str], smtp_server: SMTPTestServer, tmp_path: Path,
) -> None:
    """`manage.py mailworker worker` loads Django: the example's receiver updates the order."""
    env = dict(worker_env, DJANGO_SETTINGS_MODULE="mailshop.settings", MAILSHOP_DB=str(django_db),
               PYTHONPATH=os.pathsep.join([str(EXAMPLE), str(ROOT)]))
    argv = [sys.executable, str(EXAMPLE / "manage.py"), "mailworker", "worker",
            "-Q", env["MW_TEST_QUEUES"], "-c", "2"]
    log = tmp_path / "manage-worker.log"
    with framework_worker(argv, env, log):
        with override_settings(MAILWORKER=mailworker_setting(worker_env)):
            placed = Client().post("/orders/", {"email": "cy@example.com", "item": "cup"})
        assert placed.status_code == 201, placed.content
        order = placed.json()["order"]

        from mailshop.orders.models import Order

        wait_until(lambda: Order.objects.get(pk=order).mail_state == "delivered", 20,
                   message=f"the receiver to mark the order delivered (log: {log})")
        assert smtp_server.messages[0].recipients == ("cy@example.com",)
