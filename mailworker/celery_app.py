"""The Celery app: ``celery -A mailworker.celery_app worker -Q transactional,bulk``.

Thin glue (DESIGN.md): a task carries message ids, never bodies; it loads, leases and
delivers through :class:`mailworker.delivery.Deliverer`. At-least-once settings: JSON
only, late acks, requeue when a worker process dies, prefetch 1, and a hard time limit
below both the lease and the broker's visibility timeout, so a message can never be
redelivered by the broker while its first delivery is still running.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, signals
from kombu import Queue

from mailworker.config import DEFAULT_QUEUES, Settings, load_settings

__all__ = ["DELIVER_TASK", "app", "reconfigure"]

DELIVER_TASK = "mailworker.deliver"
log = structlog.get_logger("mailworker.worker")

app = Celery("mailworker")


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours; documented in config/README.md."""
    # Not bounded by the lease: the heartbeat renews leases while a batch runs, and a
    # batch starts no transaction once 80% of task_time_limit is spent.
    time_limit = min(settings.task_time_limit, settings.visibility_timeout * 0.9)
    queues = list(dict.fromkeys([*DEFAULT_QUEUES, *settings.queues]))
    return {
        "broker_url": settings.broker,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": int(settings.visibility_timeout)},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": int(time_limit),
        "task_soft_time_limit": max(1, int(time_limit * 0.9)),
        "task_queues": [Queue(q, routing_key=q) for q in queues],
        "task_default_queue": settings.default_queue,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def reconfigure(settings: Settings) -> None:
    """Point the app at (new) settings; called by :func:`mailworker.runtime.configure`."""
    app.conf.update(celery_config(settings))
    # Forget the cached pools (as Celery does after fork) so the next publish looks up the
    # pool for the new broker URL. Not closed: kombu shares them process-wide by URL.
    app._pool = None
    app.amqp._producer_pool = None


def _settings_at_import() -> Settings:
    from mailworker import runtime

    current = runtime.current()
    return current.settings if current is not None else load_settings()


# `celery -A mailworker.celery_app worker` needs the broker at import; the settings come
# from the runtime if the app configured one, else from the environment.
reconfigure(_settings_at_import())


@app.task(name=DELIVER_TASK, bind=True, acks_late=True, ignore_result=True)
def deliver(self: Any, ids: list[str]) -> dict[str, Any]:
    """Deliver the messages *ids* (a batch, usually for one relay)."""
    from mailworker.delivery import Deliverer
    from mailworker.hooks import hooks
    from mailworker.runtime import get_runtime

    rt = get_runtime()
    task_id = self.request.id
    with structlog.contextvars.bound_contextvars(task_id=task_id):
        report = Deliverer(rt.settings, rt.store, rt.pools, hooks).run(ids, task_id=task_id)
    return {"claimed": report.claimed, "states": report.states, "skipped": report.skipped}


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Sockets inherited from the parent belong to it: drop them without QUIT.
    from mailworker.runtime import get_runtime

    rt = get_runtime()
    rt.pools.reset_after_fork()
    rt.redis.connection_pool.reset()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    from mailworker.runtime import get_runtime

    get_runtime().pools.close_all()


@signals.worker_ready.connect
def _on_ready(**_: Any) -> None:
    from mailworker.runtime import get_runtime

    warning = get_runtime().store.persistence_warning()
    if warning:
        log.warning("redis.not_persistent", message=warning)
