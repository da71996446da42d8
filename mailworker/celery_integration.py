"""Run mailworker's delivery task inside your own Celery app: :func:`install`.

By default mailworker brings its own Celery app (:mod:`mailworker.celery_app`), which
never becomes Celery's current or default app, so it cannot capture your project's
``@shared_task`` calls. Teams that would rather run one worker fleet on one broker call
``install(app)`` on their app instead, in every process that sends mail or runs workers
(where the app is defined, e.g. ``proj/celery.py``)::

    from celery import Celery
    from mailworker.celery_integration import install

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    install(app)
    # Django: install(app, configure=mailworker.contrib.django.configure_runtime)

Then ``celery -A proj worker -Q celery,transactional,bulk`` delivers mail too, and runs
mailworker's scheduler/sweeper in its main process. What install does and does not do:

* registers ``mailworker.deliver`` on *app* only (not as a shared task), with its own
  delivery guarantees set per task: JSON, late acks, requeue when a worker process is
  lost, a hard time limit below the broker's visibility timeout;
* makes :func:`mailworker.send` and the scheduler publish through *app* (its broker);
* adds ``"json"`` to *app*'s ``accept_content`` if it was narrowed to exclude it
  (mailworker's task messages are JSON only);
* bounds the waits on a Redis broker where *app* leaves them unset: kombu's Redis
  transport waits forever by default, so a broker that accepts and never answers would
  hang every ``send()``. ``socket_timeout`` and ``socket_connect_timeout`` are added to
  ``broker_transport_options`` from ``redis_socket_timeout``/``redis_connect_timeout``
  (values *app* sets win). Celery's default ``task_publish_retry_policy`` (3 retries)
  multiplies each wait; ``mailworker.broker.PUBLISH_RETRY_POLICY`` (1 retry) is what
  mailworker's own app uses, and a failed publish loses nothing (the sweeper wakes the
  mail). Other brokers: set their read timeouts in ``broker_transport_options``;
* is idempotent per app: a second ``install(app)`` (a module imported twice, a reload)
  returns the same task and connects no second set of worker signals.

Otherwise it leaves *app*'s configuration alone. So: if *app* lists ``task_queues``,
add mailworker's queues there; and set ``worker_prefetch_multiplier = 1`` for the
workers of mailworker's queues (a worker-wide setting, so it is yours to choose;
config/README.md says why).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import structlog
from celery import Celery, signals

from mailworker import broker
from mailworker.broker import DELIVER_TASK, deliver_task, task_options, time_limit
from mailworker.config import Settings

__all__ = ["DELIVER_TASK", "deliver_task", "install", "task_options", "time_limit"]

log = structlog.get_logger("mailworker.worker")


class _Installed:
    """The configure hook given to :func:`install`, if any, and the apps installed into
    (a holder, so no ``global``)."""

    lock = threading.Lock()
    configure: Callable[[], object] | None = None
    configured = False
    apps: ClassVar[weakref.WeakSet[Celery]] = weakref.WeakSet()


def run_delivery(task_id: str | None, ids: list[str]) -> dict[str, Any]:
    """The task body shared by mailworker's own app and installed apps."""
    from mailworker.delivery import Deliverer
    from mailworker.hooks import hooks
    from mailworker.runtime import get_runtime

    _configure_once()
    rt = get_runtime()
    with structlog.contextvars.bound_contextvars(task_id=task_id):
        report = Deliverer(rt.settings, rt.store, rt.pools, hooks).run(ids, task_id=task_id)
    return {"claimed": report.claimed, "states": report.states, "skipped": report.skipped}


def _configure_once() -> None:
    with _Installed.lock:
        if _Installed.configure is not None and not _Installed.configured:
            _Installed.configure()
            _Installed.configured = True


def install(app: Celery, *, configure: Callable[[], object] | None = None,
            scheduler: bool = True) -> Any:
    """Register mailworker's delivery task on *app* and publish mail through it.

    *configure*, if given, is called once per process before mailworker first needs its
    settings in a worker (e.g. ``mailworker.contrib.django.configure_runtime``, which
    reads ``settings.MAILWORKER``); otherwise the runtime comes from the environment or
    :func:`mailworker.configure`, as everywhere else. With *scheduler* (the default),
    every worker of *app* also runs the scheduler/sweeper thread (a Redis lock lets one
    tick at a time); pass False and run ``mailworker scheduler`` yourself instead.
    Returns the registered task.
    """
    from mailworker.runtime import current

    with _Installed.lock:
        again = app in _Installed.apps
        if configure is not None or not again:
            _Installed.configure = configure
            _Installed.configured = False
        if again:
            return app.tasks[DELIVER_TASK]
        _Installed.apps.add(app)
    rt = current()
    settings = rt.settings if rt is not None else Settings()

    @app.task(name=DELIVER_TASK, bind=True, shared=False, **task_options(settings))
    def deliver(self: Any, ids: list[str]) -> dict[str, Any]:
        return run_delivery(self.request.id, ids)

    broker.use_task(deliver)
    if app.configured:
        _adapt(app, settings)
    else:
        app.on_after_configure.connect(lambda sender, **_: _adapt(sender, settings),
                                       weak=False)
    _connect_worker_signals(app, scheduler)
    return deliver


def _adapt(app: Celery, settings: Settings) -> None:
    _accept_json(app)
    _bound_broker(app, settings)


def _bound_broker(app: Celery, settings: Settings) -> None:
    """Add socket timeouts to *app*'s Redis broker options where it sets none."""
    url = app.conf.broker_url or app.conf.broker_write_url or ""
    bounds = broker.broker_bounds(settings.with_(broker_url=str(url) or "amqp://"))
    wanted = {k: v for k, v in bounds["broker_transport_options"].items()
              if k != "visibility_timeout"}
    options = dict(app.conf.broker_transport_options or {})
    added = {k: v for k, v in wanted.items() if k not in options}
    if added:
        app.conf.broker_transport_options = {**options, **added}
        log.info("celery.broker_timeouts_added", app=app.main, **added)


def _accept_json(app: Celery) -> None:
    """Let *app*'s workers take JSON, the only format of mailworker's task messages.

    Celery accepts JSON by default; an app that narrowed ``accept_content`` (to pickle,
    say) gets JSON added rather than workers that silently reject mail wake-ups.
    """
    accepted = list(app.conf.accept_content or ())
    if not {str(c).lower() for c in accepted} & {"json", "application/json"}:
        app.conf.accept_content = [*accepted, "json"]
        log.info("celery.accept_json_added", app=app.main, accept_content=[*accepted, "json"])


def worker_app_of(sender: Any) -> Any:
    """The app of a worker signal's sender (a WorkController or a Consumer)."""
    return getattr(sender, "app", None)


def _connect_worker_signals(app: Celery, scheduler: bool) -> None:
    """Start-up and shutdown work for *app*'s workers; the signals fire for every Celery
    worker in the process, so each receiver first checks that the worker runs *app*."""
    state: dict[str, Any] = {}

    def on_init(sender: Any = None, **_: Any) -> None:
        if worker_app_of(sender) is not app:
            return
        _accept_json(app)  # again: the app's config may have changed since install()
        _configure_once()
        # The runtime's settings are known now: fit the time limit to them and the broker.
        from mailworker.runtime import get_runtime

        vt = float((app.conf.broker_transport_options or {}).get("visibility_timeout", 3600))
        options = task_options(get_runtime().settings, vt)
        task = app.tasks[DELIVER_TASK]
        task.time_limit, task.soft_time_limit = options["time_limit"], options["soft_time_limit"]

    def on_ready(sender: Any = None, **_: Any) -> None:
        if worker_app_of(sender) is not app:
            return
        from mailworker.runtime import get_runtime

        rt = get_runtime()
        warning = rt.store.persistence_warning()
        if warning:
            log.warning("redis.not_persistent", message=warning)
        if scheduler:
            from mailworker.scheduler import Scheduler

            state["scheduler"] = Scheduler(rt.settings, rt.store, publish=rt.publisher)
            state["scheduler"].start_thread()

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if worker_app_of(sender) is not app:
            return
        if "scheduler" in state:
            state.pop("scheduler").stop()
        from mailworker.runtime import get_runtime

        get_runtime().pools.close_all()

    def on_process_init(**_: Any) -> None:
        # A prefork child: sent with the host name as sender, once Celery made the
        # worker's app current here. Sockets inherited from the parent belong to it.
        from celery._state import get_current_app

        from mailworker.runtime import current

        rt = current()
        if get_current_app() is app and rt is not None:
            rt.pools.reset_after_fork()
            rt.redis.connection_pool.reset()

    signals.worker_init.connect(on_init, weak=False)
    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)

