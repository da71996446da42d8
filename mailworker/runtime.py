"""The process-wide runtime: settings, the Redis client, the store, the SMTP pools and the
wake-up publisher.

Built lazily on first use from :func:`mailworker.config.load_settings`, so importing
mailworker costs nothing and an app configures it with :func:`configure` (the Django
and Flask integrations call it from their settings) before the first ``send()``.

This is the composition root below the Celery glue: it imports the store, the SMTP layer
and :mod:`mailworker.broker` (whose own Celery app it keeps pointed at the current
settings), never :mod:`mailworker.celery_app`, which imports it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mailworker import broker
from mailworker.config import Settings, load_settings
from mailworker.publish import Publisher
from mailworker.smtp import PoolManager, pools
from mailworker.store import Store

__all__ = ["Runtime", "configure", "current", "get_runtime", "reset_runtime"]


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: Store
    pools: PoolManager
    #: Sends one wake-up (a batch of ids, a queue): Celery's by default; tests and
    #: :class:`mailworker.testing.LocalDelivery` swap in their own (``configure(publisher=)``).
    publisher: Publisher = field(default=broker.publish)


_lock = threading.Lock()
_runtime: Runtime | None = None


def _build(settings: Settings, client: redis.Redis | None = None,
           publisher: Publisher | None = None, *, reconfigure: bool = False) -> Runtime:
    # Bounded waits (a web request must not hang on a Redis that accepts and never
    # answers); a refused or reset connection (a restart, a failover) is retried with
    # backoff, a timeout is not: retrying it would double the wait.
    client = client or redis.Redis.from_url(
        settings.redis_url, socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), settings.redis_retries,
                    supported_errors=(redis.ConnectionError,)),
    )
    store = Store(client, prefix=settings.key_prefix, retention=settings.retention,
                  dead_retention=settings.dead_retention)
    # mailworker's own Celery app, if created, follows a configure()d broker; if not, it
    # reads these settings when first used (an app that installed delivery into its own
    # Celery app never creates it).
    broker.follow(settings, reconfigure=reconfigure)
    return Runtime(settings, client, store, pools, publisher or broker.publish)


def get_runtime() -> Runtime:
    """The configured runtime, built from the environment on first use."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = _build(load_settings())
    return _runtime


def configure(
    settings: Settings | None = None, *, redis_client: redis.Redis | None = None,
    publisher: Publisher | None = None, **overrides: Any
) -> Runtime:
    """Replace the runtime (tests, the demo, framework integrations).

    *overrides* are :class:`Settings` fields applied on top of *settings* (or of the
    settings loaded from the environment). *publisher* replaces Celery's for wake-ups.
    """
    global _runtime
    base = settings or load_settings()
    if overrides:
        base = base.with_(**overrides)
    with _lock:
        _runtime = _build(base, redis_client, publisher, reconfigure=True)
    return _runtime


def current() -> Runtime | None:
    """The runtime if one was built or configured, without building one."""
    return _runtime


def reset_runtime() -> None:
    global _runtime
    with _lock:
        _runtime = None
