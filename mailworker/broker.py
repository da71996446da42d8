"""The broker side of a wake-up: which Celery task carries it, and mailworker's own
Celery app as far as publishing needs it.

A wake-up is a ``mailworker.deliver`` task message carrying a batch of ids. It goes out
through the task :func:`mailworker.celery_integration.install` registered on a project's
app, else through mailworker's own app, created here on first use (Celery is imported
only then) and configured from the settings the runtime last pushed with :func:`follow`.
:mod:`mailworker.celery_app` adds the task itself and the worker signals to that app.

This module knows settings and Celery, and nothing of the runtime, the store or delivery:
the runtime calls down into it, never the other way round.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from mailworker.config import DEFAULT_QUEUES, Settings, load_settings

__all__ = ["DELIVER_TASK", "PUBLISH_RETRY_POLICY", "broker_bounds", "celery_config",
           "deliver_task", "follow", "own_app", "publish", "task_options", "time_limit",
           "use_task"]

DELIVER_TASK = "mailworker.deliver"


def time_limit(settings: Settings, visibility_timeout: float) -> float:
    """A task's hard time limit: below the broker's visibility timeout, so the broker can
    never hand the message to a second worker while the first still sends. Not bounded
    by the lease: a heartbeat renews leases while a batch runs, and a batch starts no
    transaction once 80% of ``task_time_limit`` is spent."""
    return min(settings.task_time_limit, visibility_timeout * 0.9)


def task_options(settings: Settings, visibility_timeout: float = 3600.0) -> dict[str, Any]:
    """Per-task Celery options: the at-least-once guarantees delivery relies on."""
    limit = time_limit(settings, visibility_timeout)
    return {
        "serializer": "json",
        "acks_late": True,
        "reject_on_worker_lost": True,
        "acks_on_failure_or_timeout": True,
        "ignore_result": True,
        "time_limit": int(limit),
        "soft_time_limit": max(1, int(limit * 0.9)),
    }


#: Reconnect-and-retry once when a publish fails (a pooled connection the broker closed
#: is the usual case), then give up: the record is safe and the sweeper wakes it.
PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                        "interval_max": 0.2}
#: kombu's Redis consumer blocks in BRPOP for 1 s per poll; a socket timeout must exceed it.
_MIN_BROKER_SOCKET_TIMEOUT = 2.0


def broker_bounds(settings: Settings) -> dict[str, Any]:
    """Celery settings that bound every wait on the broker, so a broker that accepts the
    connection and never answers costs a ``send()`` a few seconds, not a hung request.

    kombu's Redis transport waits forever by default (``socket_timeout=None``); the
    publish retry policy multiplies each wait. With these, one publish waits at most
    about ``(1 + max_retries) x (redis_connect_timeout + socket timeout)``; after that
    :func:`mailworker.publish.wake` logs the failure and the sweeper wakes the record.
    The socket timeouts apply to a Redis broker (``redis://``, ``rediss://``,
    ``sentinel://``); other transports get ``broker_connection_timeout`` only (set their
    own read timeouts in ``broker_transport_options``).
    """
    options: dict[str, Any] = {"visibility_timeout": int(settings.visibility_timeout)}
    if settings.broker.split("://", 1)[0].lower() in ("redis", "rediss", "sentinel",
                                                       "redis+socket", "rediss+socket"):
        options["socket_timeout"] = max(settings.redis_socket_timeout,
                                        _MIN_BROKER_SOCKET_TIMEOUT)
        options["socket_connect_timeout"] = settings.redis_connect_timeout
    return {
        "broker_transport_options": options,
        "broker_connection_timeout": settings.redis_connect_timeout,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """mailworker's own app's Celery settings, derived from ours (config/README.md)."""
    from kombu import Queue

    limit = time_limit(settings, settings.visibility_timeout)
    queues = list(dict.fromkeys([*DEFAULT_QUEUES, *settings.queues]))
    return {
        "broker_url": settings.broker,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": int(limit),
        "task_soft_time_limit": max(1, int(limit * 0.9)),
        "task_queues": [Queue(q, routing_key=q) for q in queues],
        "task_default_queue": settings.default_queue,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        # Remote control (celery inspect/control: shutdown, pool resize, rate limits) is
        # reachable by anyone who can write to the broker; mailworker needs none of it.
        "worker_enable_remote_control": False,
    } | broker_bounds(settings)


class _State:
    """The own app, the settings it follows, the installed task (a holder, no globals)."""

    lock = threading.RLock()
    settings: Settings | None = None
    app: Any = None
    own_task: Any = None
    installed: Any = None


def _apply(app: Any, settings: Settings) -> None:
    app.conf.update(celery_config(settings))
    # Forget the cached pools (as Celery does after fork) so the next publish looks up the
    # pool for the new broker URL. Not closed: kombu shares them process-wide by URL.
    app._pool = None
    app.amqp._producer_pool = None


def follow(settings: Settings, *, reconfigure: bool = True) -> None:
    """Remember *settings* for mailworker's own app, which picks them up when created.

    With *reconfigure* (:func:`mailworker.runtime.configure` does it) an app already
    created is pointed at them too. A runtime built lazily from the environment does not
    reconfigure: in a worker the app is running on the same settings, and resetting a
    running app's connection pools would cut its consumer's connection.
    """
    with _State.lock:
        _State.settings = settings
        if reconfigure and _State.app is not None:
            _apply(_State.app, settings)


def own_app() -> Any:
    """mailworker's own Celery app, created on first use from the settings last given to
    :func:`follow` (else the environment's). Never Celery's current or default app, so a
    project's ``@shared_task`` keeps its own broker; no fix-ups (Celery's Django fix-up
    would make it the default app)."""
    with _State.lock:
        if _State.app is None:
            from celery import Celery

            app = Celery("mailworker", set_as_current=False, fixups=[])
            _apply(app, _State.settings or load_settings())
            _State.app = app
        return _State.app


def use_task(task: Any, *, own: bool = False) -> None:
    """Publish wake-ups with *task*: one ``install`` registered on a project's app (which
    wins), or with *own*, the one :mod:`mailworker.celery_app` registered on its app."""
    with _State.lock:
        if own:
            _State.own_task = task
        else:
            _State.installed = task


def deliver_task() -> Any:
    """What wake-ups are published with: the installed task, else mailworker's own app's
    (a signature by name while :mod:`mailworker.celery_app` is not loaded)."""
    with _State.lock:
        task = _State.installed or _State.own_task
    return task if task is not None else own_app().signature(DELIVER_TASK)


def publish(ids: Sequence[str], queue: str) -> None:
    """The default publisher: one ``mailworker.deliver`` task message for a batch of ids
    on *queue* (see :func:`mailworker.publish.wake` for batching and failures)."""
    with _State.lock:
        task = _State.installed or _State.own_task
    if task is not None:
        task.apply_async(args=[list(ids)], queue=queue, routing_key=queue)
    else:  # by name: needs no task object, and leaves the own app unfinalized
        own_app().send_task(DELIVER_TASK, args=[list(ids)], queue=queue, routing_key=queue)
