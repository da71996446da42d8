"""The Celery app: ``celery -A mailworker.celery_app worker -Q transactional,bulk``.

Thin glue (docs/architecture.md): a task carries message ids, never bodies; it loads, leases and
delivers through :class:`mailworker.delivery.Deliverer`. At-least-once settings: JSON
only, late acks, requeue when a worker process dies, prefetch 1, and a hard time limit
below both the lease and the broker's visibility timeout, so a message can never be
redelivered by the broker while its first delivery is still running.

It lives next to whatever Celery app a project has: it never becomes Celery's current or
default app (so a project's ``@shared_task`` keeps its own broker), its task is not
shared with other apps, and its worker signal receivers act only for workers that run
it. To run delivery inside your own Celery app instead, see
:mod:`mailworker.celery_integration`.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import signals

from mailworker import broker
from mailworker.broker import DELIVER_TASK, celery_config
from mailworker.celery_integration import run_delivery, task_options, worker_app_of
from mailworker.config import Settings

__all__ = ["DELIVER_TASK", "app", "celery_config", "reconfigure"]

log = structlog.get_logger("mailworker.worker")

# Not current, not default (see mailworker.broker.own_app): a project's own app must stay
# the one its @shared_task and `celery.current_app` resolve to. `celery -A
# mailworker.celery_app worker` needs the broker at import: the app is configured from
# the runtime's settings if the app configured one, else from the environment.
app = broker.own_app()


def reconfigure(settings: Settings) -> None:
    """Point the app at (new) settings; :func:`mailworker.runtime.configure` does this
    itself (through :func:`mailworker.broker.follow`)."""
    broker.follow(settings)


# shared=False: a shared task is added to every Celery app in the process.
@app.task(name=DELIVER_TASK, bind=True, shared=False,
          **{k: v for k, v in task_options(Settings()).items() if "time_limit" not in k})
def deliver(self: Any, ids: list[str]) -> dict[str, Any]:
    """Deliver the messages *ids* (a batch, usually for one relay)."""
    return run_delivery(self.request.id, ids)


broker.use_task(deliver, own=True)

# Celery's worker signals fire for any app's worker in this process (a project that
# imports mailworker runs its own workers too): each receiver checks it is ours.

@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # `celery -A mailworker.celery_app worker` logs as documented (JSON unless on a
    # terminal; MAILWORKER_LOG_FORMAT); configured before Celery redirects stdout/stderr.
    # A process that set structlog up itself (`mailworker worker`, the demo) keeps its own.
    if worker_app_of(sender) is app and not structlog.is_configured():
        from mailworker.logging import configure_logging

        configure_logging()


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Sent with the host name as sender; Celery has just made the worker's app current.
    from celery._state import get_current_app

    if get_current_app() is not app:
        return
    # Sockets inherited from the parent belong to it: drop them without QUIT.
    from mailworker.runtime import get_runtime

    rt = get_runtime()
    rt.pools.reset_after_fork()
    rt.redis.connection_pool.reset()


@signals.worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    from celery._state import get_current_app

    if get_current_app() is app:
        _close_pools()


@signals.worker_shutdown.connect
def _on_shutdown(sender: Any = None, **_: Any) -> None:
    if worker_app_of(sender) is app:
        _close_pools()


def _close_pools() -> None:
    from mailworker.runtime import get_runtime

    get_runtime().pools.close_all()


@signals.worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    if worker_app_of(sender) is not app:
        return
    from mailworker.runtime import get_runtime

    warning = get_runtime().store.persistence_warning()
    if warning:
        log.warning("redis.not_persistent", message=warning)
