"""The process-wide runtime: settings, the Redis client, the store and the SMTP pools.

Built lazily on first use from :func:`mailworker.config.load_settings`, so importing
mailworker costs nothing and an app configures it with :func:`configure` (the Django
and Flask integrations call it from their settings) before the first ``send()``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import redis

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
    client = client or redis.Redis.from_url(
        settings.redis_url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
    )
    store = Store(client, prefix=settings.key_prefix, retention=settings.retention)
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
        from mailworker import celery_app  # local: the app reads the runtime's broker

        celery_app.reconfigure(_runtime.settings)
    return _runtime


def current() -> Runtime | None:
    """The runtime if one was built or configured, without building one."""
    return _runtime


def reset_runtime() -> None:
    global _runtime
    with _lock:
        _runtime = None
