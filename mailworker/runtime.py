"""The process-wide runtime: settings, the Redis client, the store and the SMTP pools.

Built lazily on first use from :func:`mailworker.config.load_settings`, so importing
mailworker costs nothing and an app configures it with :func:`configure` (the Django
and Flask integrations call it from their settings) before the first ``send()``.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mailworker.config import Settings, load_settings
from mailworker.smtp import PoolManager, pools
from mailworker.store import Store

__all__ = ["Runtime", "configure", "current", "get_runtime", "reset_runtime"]


@dataclass
class Runtime:
    settings: Settings
    redis: redis.Redis
    store: Store
    pools: PoolManager


_lock = threading.Lock()
_runtime: Runtime | None = None


def _build(settings: Settings, client: redis.Redis | None = None) -> Runtime:
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
    return Runtime(settings, client, store, pools)


def get_runtime() -> Runtime:
    """The configured runtime, built from the environment on first use."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = _build(load_settings())
    return _runtime


def configure(
    settings: Settings | None = None, *, redis_client: Any = None, **overrides: Any
) -> Runtime:
    """Replace the runtime (tests, the demo, framework integrations).

    *overrides* are :class:`Settings` fields applied on top of *settings* (or of the
    settings loaded from the environment).
    """
    global _runtime
    base = settings or load_settings()
    if overrides:
        base = base.with_(**overrides)
    with _lock:
        _runtime = _build(base, redis_client)
        # mailworker's own Celery app, if already created, follows the new broker; if
        # not, it reads this runtime when first imported (an app that installed
        # delivery into its own Celery app never creates it).
        celery_app = sys.modules.get("mailworker.celery_app")
        if celery_app is not None:
            celery_app.reconfigure(_runtime.settings)
    return _runtime


def current() -> Runtime | None:
    """The runtime if one was built or configured, without building one."""
    return _runtime


def reset_runtime() -> None:
    global _runtime
    with _lock:
        _runtime = None
