"""``--metrics-port`` of ``mailworker worker`` and ``mailworker scheduler``.

The process started by the operator serves the port; the processes that deliver (the
supervised Celery child, prefork's pool processes) only record, into the
``PROMETHEUS_MULTIPROC_DIR`` this process prepared (see :mod:`mailworker.metrics`). The
child learns it is not to serve from :data:`SERVED_ENV`, set before it is started.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from mailworker import metrics
from mailworker.cli.output import CLIError
from mailworker.config import Settings

__all__ = ["SERVED_ENV", "start"]

SERVED_ENV = "MAILWORKER_METRICS_SERVED"


def start(settings: Settings, port: int | None, ready: Callable[[], bool] | None = None
          ) -> Callable[[], None]:
    """Serve the port if one is set (*port*, else ``metrics_port``); returns the clean-up.

    *ready* answers ``/readyz`` (default: a live process of this worker said its
    Celery consumer is ready). In a supervised child this only turns recording on.
    """
    if os.environ.get(SERVED_ENV):
        metrics.enable()
        return lambda: None
    chosen = settings.metrics_port if port is None else port
    if not chosen:
        return lambda: None
    if not 0 < chosen <= 65535:
        raise CLIError(f"--metrics-port {chosen} is not a TCP port",
                       "use a number from 1 to 65535, e.g. 9808", 2)
    folder = metrics.prepare_dir()  # before anything imports prometheus_client
    metrics.enable()
    from mailworker.metrics_http import MetricsServer, any_ready

    try:
        server = MetricsServer(settings, ready or any_ready, port=chosen).start()
    except OSError as exc:
        metrics.remove_dir(folder)
        hint = ("another process listens there: pick another port"
                if exc.errno == errno.EADDRINUSE else "check metrics_address and the port")
        raise CLIError(f"cannot serve metrics on {settings.metrics_address}:{chosen}: "
                       f"{exc.strerror or exc}", hint, 3) from None
    os.environ[SERVED_ENV] = "1"

    def stop() -> None:
        server.stop()
        metrics.remove_dir(folder)

    return stop
