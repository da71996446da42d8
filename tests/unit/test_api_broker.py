"""The wake-up publish is bounded: a broker that accepts and never answers costs send()
a few seconds, and the mail is queued all the same (review finding F9); install(app)
bounds a project's Redis broker the same way and is idempotent per app (F16).

The black-hole broker is a real TCP listener; the store is a real redis-server.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import structlog
from celery import Celery, signals

import mailworker
from mailworker import broker, celery_integration, runtime
from mailworker.config import Settings
from mailworker.relay import parse_relay
from tests.unit.test_api_redis import silent_server  # noqa: F401 (a fixture, used by name)

RELAYS = {"default": parse_relay("default", "smtp://127.0.0.1:2525")}


@pytest.fixture
def fresh_runtime() -> Iterator[None]:
    yield
    runtime.reset_runtime()


@pytest.mark.usefixtures("fresh_runtime")
def test_review_f9_send_returns_when_the_broker_never_answers(
        redis_url: str, request: pytest.FixtureRequest) -> None:
    black_hole: int = request.getfixturevalue("silent_server")  # accepts, never answers
    prefix = f"f9{uuid.uuid4().hex[:8]}"
    runtime.configure(Settings(redis_url=redis_url, key_prefix=prefix, relays=RELAYS,
                               default_sender="app@example.com",
                               broker_url=f"redis://127.0.0.1:{black_hole}/0",
                               redis_connect_timeout=0.5, redis_socket_timeout=0.5))
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["id"] = mailworker.send(to="b@example.com", subject="s", text="t")
        except Exception as exc:  # reported below, not swallowed
            outcome["error"] = exc

    with structlog.testing.capture_logs() as logs:
        thread = threading.Thread(target=call, daemon=True)
        started = time.monotonic()
        thread.start()
        # The bound is about 2 x (connect timeout + 2 s socket timeout); without one the
        # call never returns. Generous for a loaded machine.
        thread.join(30)
        elapsed = time.monotonic() - started
    assert not thread.is_alive(), "send() is still blocked on a broker that never answers"
    assert "error" not in outcome, outcome
    # Accepted is accepted: the record is in the in-flight set for the sweeper.
    direct = redis.Redis.from_url(redis_url)
    assert direct.zrange(f"{prefix}:inflight", 0, -1) == [outcome["id"].encode()]
    failed = [e for e in logs if e["event"] == "wake.publish_failed"]
    assert len(failed) == 1, (elapsed, logs)


def test_review_f9_celery_config_bounds_every_broker_wait() -> None:
    s = Settings(relays=RELAYS, redis_connect_timeout=0.7, redis_socket_timeout=3.0,
                 visibility_timeout=900)
    conf = broker.celery_config(s)
    assert conf["broker_transport_options"] == {
        "visibility_timeout": 900, "socket_timeout": 3.0, "socket_connect_timeout": 0.7}
    assert conf["broker_connection_timeout"] == 0.7
    assert conf["task_publish_retry_policy"]["max_retries"] == 1
    # kombu's consumer blocks 1 s in BRPOP: the socket timeout never cuts it.
    fast = broker.celery_config(s.with_(redis_socket_timeout=0.5))
    assert fast["broker_transport_options"]["socket_timeout"] == 2.0
    # Transports whose options differ get the connection timeout only.
    amqp = broker.celery_config(s.with_(broker_url="amqp://guest@127.0.0.1//"))
    assert amqp["broker_transport_options"] == {"visibility_timeout": 900}
    assert amqp["broker_connection_timeout"] == 0.7


def test_review_f9_install_bounds_a_project_redis_broker_where_unset() -> None:
    runtime.configure(Settings(relays=RELAYS, redis_connect_timeout=0.5,
                               redis_socket_timeout=2.5), publisher=lambda ids, queue: None)
    try:
        app = Celery("proj", broker="redis://127.0.0.1:1/0", set_as_current=False)
        app.conf.broker_transport_options = {"socket_timeout": 9, "visibility_timeout": 7200}
        celery_integration.install(app, scheduler=False)
        app.loader.import_default_modules()  # configures the app, as a worker would
        assert dict(app.conf.broker_transport_options) == {
            "socket_timeout": 9, "visibility_timeout": 7200, "socket_connect_timeout": 0.5}
        other = Celery("proj2", broker="amqp://guest@127.0.0.1//", set_as_current=False)
        celery_integration.install(other, scheduler=False)
        assert not other.conf.broker_transport_options
    finally:
        broker.use_task(None)
        runtime.reset_runtime()


def test_review_f16_install_twice_connects_the_worker_signals_once() -> None:
    runtime.configure(Settings(relays=RELAYS), publisher=lambda ids, queue: None)
    try:
        app = Celery("proj", broker="memory://", set_as_current=False)
        before = len(signals.worker_ready.receivers)
        celery_integration.install(app)
        connected = len(signals.worker_ready.receivers) - before
        again = celery_integration.install(app)
        assert again.name == broker.DELIVER_TASK and again is app.tasks[broker.DELIVER_TASK]
        assert len(signals.worker_ready.receivers) - before == connected == 1
    finally:
        broker.use_task(None)
        runtime.reset_runtime()
