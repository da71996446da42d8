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
from typing import Any

from celery import signals

from mailworker.logging import configure_logging

__all__ = ["run_worker"]


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

    argv = [
        "worker", "-Q", ",".join(queues), "-P", pool, "-l", loglevel,
        "-c", str(concurrency or (8 if pool == "threads" else os.cpu_count() or 2)),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"mailworker-{os.getpid()}@%h",
    ]
    # app.start returns Celery's exit code (worker_main would drop it).
    return int(app.start(argv=argv) or 0)
