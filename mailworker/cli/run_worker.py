"""``mailworker worker``: a Celery worker with the scheduler and sweeper in the same process.

Small deployments run just this. Larger ones run ``mailworker worker --no-scheduler`` on
every node and any number of ``mailworker scheduler`` processes (a Redis lock lets one
tick at a time), or keep the embedded scheduler on several workers: the lock makes that
safe too.

The default execution pool is ``threads``: delivery waits on SMTP replies, so threads
overlap the waits as well as processes do, without forking (no inherited sockets, one
SMTP pool per process shared by all threads, so fewer connections). At 10 ms reply
latency threads match prefork at a quarter of the memory; against a relay that answers
at once prefork is faster (it uses every core): docs/benchmarks-queue.md has the numbers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Any

from celery import signals

from mailworker import metrics
from mailworker.logging import configure_logging

__all__ = ["run_worker", "supervise"]

_MAX_RESTART_DELAY = 30.0


def supervise(child_argv: list[str]) -> int:
    """Run the worker as a child process and start it again if it dies.

    Celery's consumer can die of an "Unrecoverable error" when Redis restarts under it
    (a known kombu race between a thread acking and the reconnect). Nothing is lost (the
    sweeper wakes whatever was in flight), but a worker that stays dead delivers nothing.
    SIGTERM/SIGINT are passed on for a warm shutdown and end supervision; any other exit
    of the child is a crash, restarted with a growing delay (1 s doubling to 30 s, reset
    after a minute of health). Under systemd or Kubernetes this is a first line; their own
    restart policy stays the second.
    """
    import structlog

    log = structlog.get_logger("mailworker.worker")
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    delay = 1.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(child_argv)  # noqa: S603 - our own command line, re-run
        code = child.wait()
        if stopping.is_set() or code == 0:
            return code if code >= 0 else 0
        if time.monotonic() - started > 60:
            delay = 1.0
        log.error("worker.crashed", exit_code=code, restart_in=delay)
        if stopping.wait(delay):
            return 0
        delay = min(delay * 2, _MAX_RESTART_DELAY)


def run_worker(queues: list[str], concurrency: int | None = None, pool: str = "threads",
               scheduler: bool = True, loglevel: str = "INFO") -> int:
    from mailworker.celery_app import app
    from mailworker.runtime import get_runtime

    configure_logging()
    rt = get_runtime()
    if scheduler:
        from mailworker.scheduler import Scheduler

        sched = Scheduler(rt.settings, rt.store)

        def _start(**_: Any) -> None:
            sched.start_thread()

        def _stop(**_: Any) -> None:
            sched.stop()

        # Started once the pool is up (after any forking), stopped on warm shutdown.
        signals.worker_ready.connect(_start, weak=False)
        signals.worker_shutdown.connect(_stop, weak=False)

    if metrics.enabled():
        from mailworker.metrics_http import mark_ready

        # /readyz of the process serving the port: this consumer is up (or going).
        signals.worker_ready.connect(lambda **_: mark_ready(True), weak=False)
        signals.worker_shutdown.connect(lambda **_: mark_ready(False), weak=False)

    argv = [
        "worker", "-Q", ",".join(queues), "-P", pool, "-l", loglevel,
        "-c", str(concurrency or (8 if pool == "threads" else os.cpu_count() or 2)),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"mailworker-{os.getpid()}@%h",
    ]
    # app.start returns Celery's exit code (worker_main would drop it).
    return int(app.start(argv=argv) or 0)
