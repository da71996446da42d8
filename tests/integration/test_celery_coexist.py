"""mailworker next to a project's own Celery app, and inside it (``install(app)``).

A small project (``shop``) is written to a temporary directory: its own Celery app on its
own Redis database, a ``@shared_task``, and Django's settings variable set (so Celery's
Django fix-up runs, as in a Django project). Real worker processes of both apps run; the
producer is a separate process, so import order and Celery's current/default app are
exactly a fresh project's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from mailworker.testing import Fault, SMTPTestServer
from tests.conftest import ROOT, RedisServer, WorkerProcess, stop_group, wait_until

pytestmark = pytest.mark.integration

SHOP_CELERY = """
import os
from celery import Celery

app = Celery("shop", broker=os.environ["SHOP_BROKER"], include=["shop.tasks"])
app.conf.update(task_default_queue=os.environ["SHOP_QUEUE"],
                broker_connection_retry_on_startup=True)
if os.environ.get("SHOP_INSTALL"):
    # This project serializes its own tasks as YAML and accepts nothing else: install()
    # must still get mailworker's JSON wake-ups accepted.
    app.conf.update(task_serializer="yaml", accept_content=["yaml"])
    from mailworker.celery_integration import install

    install(app)
"""

SHOP_TASKS = """
import os

import redis
from celery import shared_task

import mailworker
# Any module of a project may import mailworker's Celery app (to inspect its queues, say):
# its worker signal receivers are then connected in the project's own worker processes.
import mailworker.celery_app  # noqa: F401


@shared_task(name="shop.tasks.add")
def add(x, y, mail_to=None):
    redis.Redis.from_url(os.environ["SHOP_BROKER"]).rpush(os.environ["SHOP_RESULTS"], x + y)
    if mail_to:
        mailworker.send(to=mail_to, subject=f"sum {x + y}", text="sent from a project task")
    return x + y
"""

PRODUCER = """
import json, os, sys, threading

if sys.argv[1] == "mailworker-first":
    import mailworker.celery_app  # noqa: F401
import shop.celery  # noqa: F401  (as proj/__init__.py does in a Django project)
from shop.tasks import add

import celery
import mailworker
from mailworker.celery_integration import deliver_task

ids = [mailworker.send(to=to, subject="direct", text="x") for to in sys.argv[2:]]
add.delay(3, 4, mail_to=f"from-task-{sys.argv[1]}@example.com")
seen = {}
t = threading.Thread(target=lambda: seen.update(thread=celery.current_app.main))
t.start()
t.join()
print(json.dumps({"ids": ids, "current": celery.current_app.main, "thread": seen["thread"],
                  "add_app": add.app.main, "publisher_app": deliver_task().app.main}))
"""


class Shop:
    """The project on disk, its environment, and its Celery worker processes."""

    def __init__(self, root: Path, mw_env: dict[str, str], redis_server: RedisServer,
                 relay: str) -> None:
        self.root = root
        pkg = root / "shop"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "settings.py").write_text('SECRET_KEY = "test"\nINSTALLED_APPS = []\n')
        (pkg / "celery.py").write_text(SHOP_CELERY)
        (pkg / "tasks.py").write_text(SHOP_TASKS)
        (root / "producer.py").write_text(PRODUCER)
        tag = mw_env["MAILWORKER_KEY_PREFIX"]
        self.broker = f"redis://127.0.0.1:{redis_server.port}/3"
        self.queue = f"shop{tag}"
        self.results_key = f"{tag}:shop-results"
        self.env = dict(mw_env, SHOP_BROKER=self.broker, SHOP_QUEUE=self.queue,
                        SHOP_RESULTS=self.results_key, MAILWORKER_RELAY_DEFAULT=relay,
                        DJANGO_SETTINGS_MODULE="shop.settings",
                        PYTHONPATH=f"{root}{os.pathsep}{ROOT}")
        self.workers: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def produce(self, order: str, *recipients: str) -> dict[str, object]:
        p = subprocess.run([sys.executable, "producer.py", order, *recipients], cwd=self.root,
                           env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0, p.stderr
        return dict(json.loads(p.stdout.strip().splitlines()[-1]))

    def start_worker(self, queues: str) -> Path:
        log = self.root / f"shop-worker{len(self.workers)}.log"
        with log.open("wb") as fh:
            self.workers.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "shop.celery", "worker", "-P", "prefork",
                 "-c", "2", "-Q", queues, "-l", "INFO", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "-n", f"{self.queue}-{len(self.workers)}@%h"],
                cwd=self.root, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True))
        self.logs.append(log)
        wait_until(lambda: b"ready." in log.read_bytes() or self.workers[-1].poll() is not None,
                   30, message=f"shop worker ready (log: {log})")
        assert self.workers[-1].poll() is None, log.read_text()
        return log

    def results(self) -> list[int]:
        return [int(v) for v in redis.Redis.from_url(self.broker).lrange(self.results_key, 0, -1)]

    def stop(self) -> None:
        for w in self.workers:
            stop_group(w)


@pytest.fixture
def smtp() -> Iterator[SMTPTestServer]:
    with SMTPTestServer() as server:
        yield server


@pytest.fixture
def shop(tmp_path: Path, mw_env: dict[str, str], redis_server: RedisServer,
         smtp: SMTPTestServer) -> Iterator[Shop]:
    s = Shop(tmp_path / "proj", mw_env, redis_server, smtp.dsn())
    yield s
    s.stop()


def delivered_to(server: SMTPTestServer) -> set[str]:
    return {r for m in server.messages for r in m.recipients}


def test_project_shared_task_keeps_its_broker_next_to_mailworker(
        shop: Shop, smtp: SMTPTestServer, start_worker: Callable[..., WorkerProcess]) -> None:
    mw_worker = start_worker(env=shop.env)
    shop_log = shop.start_worker(shop.queue)

    # A Django project imports its Celery app first; other code may import mailworker's
    # first. Either way Celery's current app (this thread) and default app (other
    # threads) stay the project's.
    for order in ("project-first", "mailworker-first"):
        out = shop.produce(order, f"direct-{order}@example.com")
        assert (out["current"], out["thread"], out["add_app"]) == ("shop", "shop", "shop")
        assert out["publisher_app"] == "mailworker"
    wait_until(lambda: shop.results() == [7, 7], 30, message="the project's tasks to run")
    # Mail sent by the producers and by the project's tasks (in the project's worker) all
    # reach mailworker's worker through mailworker's own broker.
    wait_until(lambda: delivered_to(smtp) == {
        "direct-project-first@example.com", "direct-mailworker-first@example.com",
        "from-task-project-first@example.com", "from-task-mailworker-first@example.com"},
        30, message="all four messages delivered")
    mw_text, shop_text = mw_worker.log.read_text(), shop_log.read_text()
    assert "unregistered" not in mw_text and "shop.tasks.add" not in mw_text
    assert "unregistered" not in shop_text
    # mailworker's worker-ready receiver ran for its own worker only (the private Redis
    # has no AOF, so it warns), not for the project's.
    assert "redis.not_persistent" in mw_text
    assert "redis.not_persistent" not in shop_text


def test_install_runs_delivery_and_scheduler_in_the_project_worker(
        shop: Shop, smtp: SMTPTestServer, mw_env: dict[str, str]) -> None:
    shop.env["SHOP_INSTALL"] = "1"
    smtp.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted", match="grey@", times=1))
    # One fleet: the project's worker consumes its own queue and mailworker's; no
    # mailworker worker runs at all.
    log = shop.start_worker(f"{shop.queue},{mw_env['MW_TEST_QUEUES']}")

    out = shop.produce("project-first", "ok@example.com", "grey@example.com")

    assert out["publisher_app"] == "shop" and out["current"] == "shop"
    wait_until(lambda: shop.results() == [7], 30, message="the project's task to run")
    # The greylisted recipient is retried by the scheduler running inside the project's
    # worker (the policy backs off 1 s in this test's config).
    wait_until(lambda: delivered_to(smtp) == {"ok@example.com", "grey@example.com",
                                              "from-task-project-first@example.com"},
               30, message="all three delivered by the project's worker")
    text = log.read_text()
    assert "mailworker.deliver" in text and "scheduler.started" in text
    assert "unregistered" not in text
    # Nothing went to mailworker's own broker (its queues live in Redis database 0).
    main_db = redis.Redis.from_url(mw_env["MAILWORKER_REDIS_URL"])
    assert not [k for k in main_db.keys(f"{mw_env['MW_TEST_QUEUES'].split(',')[0]}*")]


def test_celery_command_on_mailworker_app_logs_json(
        mw_env: dict[str, str], smtp: SMTPTestServer, tmp_path: Path) -> None:
    env = dict(mw_env, MAILWORKER_RELAY_DEFAULT=smtp.dsn())
    env.pop("MAILWORKER_LOG_FORMAT")  # the documented default off a terminal is JSON
    log = tmp_path / "celery.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "mailworker.celery_app", "worker", "-P",
             "threads", "-c", "2", "-Q", env["MW_TEST_QUEUES"], "-l", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"json-{env['MAILWORKER_KEY_PREFIX']}@%h"],
            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                   message="celery worker ready")
        sent = subprocess.run([sys.executable, "-m", "mailworker.cli.main", "send", "--to",
                               "json@example.com", "--text", "x"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert sent.returncode == 0, sent.stderr
        smtp.wait_for_messages(1, 30)

        def events() -> list[dict[str, object]]:
            found = []
            for line in log.read_text().splitlines():
                if line.startswith("{"):
                    found.append(json.loads(line))
            return found

        delivered = wait_until(
            lambda: [e for e in events() if e.get("event") == "delivery.delivered"], 30,
            message="a JSON delivery.delivered line in the worker's output")
        assert delivered[0]["level"] == "info" and "timestamp" in delivered[0]
        assert any(e.get("event") == "smtp.reply" for e in events())
    finally:
        stop_group(proc)


def test_install_registers_on_that_app_only_with_delivery_guarantees() -> None:
    from celery import Celery

    from mailworker import broker
    from mailworker import celery_integration as ci

    saved = (broker._State.installed, ci._Installed.configure, ci._Installed.configured)
    calls: list[int] = []
    proj = Celery("proj", set_as_current=False, fixups=[])
    try:
        task = ci.install(proj, configure=lambda: calls.append(1), scheduler=False)
        assert proj.tasks[ci.DELIVER_TASK] == task and ci.deliver_task() is task
        assert (task.serializer, task.acks_late, task.reject_on_worker_lost,
                task.ignore_result) == ("json", True, True, True)
        assert 0 < task.soft_time_limit < task.time_limit
        # Not a shared task: another app in the process does not get it.
        assert ci.DELIVER_TASK not in Celery("other", set_as_current=False, fixups=[]).tasks
        ci._configure_once()
        ci._configure_once()
        assert calls == [1]  # the app's configure hook runs once per process
    finally:
        broker._State.installed, ci._Installed.configure, ci._Installed.configured = saved
