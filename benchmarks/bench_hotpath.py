"""The delivery hot path in one process: worker CPU per message without Celery.

``Deliverer.run`` over batches of ``--batch`` queued 2 KB messages (the batches a
``mailworker.deliver`` task gets), in this process, one thread, against its own
``redis-server`` and Postfix's ``smtp-sink`` (0 ms) on 127.0.0.1: claim, lease marks,
SMTP with pipelining, outcomes, commits, with the reply log ON (JSON to a file, as in
production). It prints CPU microseconds per message (``time.process_time``, user and
system) per round. Without Celery's per-task cost and without the scheduling noise of a
multi-process worker, it is the figure to watch while cutting CPU from the hot path; the
end-to-end figure is ``bench_queue.py``'s.

``--ab`` alternates rounds between the reply log's structlog chain (before the lean path,
``mailworker.logging.fast_info`` switched off) and the lean path (as shipped), and prints
the median of the per-pair ratios: both saw the same machine within seconds.
``--profile PATH`` writes a cProfile of the last round (wall clock; ``pstats`` reads it).
``--threads N`` runs the passes from N threads at once, as a threads worker does: the
difference to one thread is what the GIL and the thread switches cost per message.

Run: ``.venv/bin/python benchmarks/bench_hotpath.py`` (``-n`` messages per round,
``--rounds``; about 30 s).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_queue  # noqa: E402

QUEUE = "mwq_threads_0_backlog"  # one of the queues bench_queue's config declares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="messages per round")
    p.add_argument("--rounds", type=int, default=10,
                   help="more, shorter rounds: the medians shrug off a busy neighbour")
    p.add_argument("--batch", type=int, default=50, help="ids per Deliverer.run (a task)")
    p.add_argument("--threads", type=int, default=1,
                   help="passes run by this many threads at once, as a threads worker's "
                        "pool does (what the GIL and thread switches add per message)")
    p.add_argument("--ab", action="store_true",
                   help="alternate rounds: reply log through structlog's chain vs lean")
    p.add_argument("--profile", type=Path, default=None, help="cProfile the last round here")
    args = p.parse_args(argv)
    opts = argparse.Namespace(concurrency=1, mw_batch_size=None, batch=500, loglevel="INFO",
                              timeout=300.0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-hotpath-"))
    bench = bench_queue.Bench(opts, tmp)
    try:
        sink = bench.sink(0)
        os.environ.update(bench._mw_env(sink.port))
        return run(args, bench, sink, tmp)
    finally:
        bench.close()


def run(args: argparse.Namespace, bench: Any, sink: Any, tmp: Path) -> int:
    import mailworker
    from mailworker import logging as mwlog
    from mailworker.delivery import Deliverer
    from mailworker.hooks import hooks
    from mailworker.runtime import get_runtime

    log_file = (tmp / "worker.log").open("w")
    mwlog.configure_logging(fmt="json", level="INFO", stream=log_file)
    lean = mwlog._lean[0]
    rt = get_runtime()

    def queued(n: int, tag: str) -> list[str]:
        items = bench.inputs(n, tag)
        ids: list[str] = []
        for i in range(0, n, 500):
            ids += mailworker.send_many([dict(it, queue=QUEUE) for it in items[i:i + 500]])
        bench.redis.client.delete(QUEUE)  # the wake-ups: this process runs the passes itself
        return ids

    def drain(ids: list[str]) -> dict[str, int]:
        batches = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
        states: dict[str, int] = {}
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    if not batches:
                        return
                    batch = batches.pop(0)
                report = Deliverer(rt.settings, rt.store, rt.pools, hooks).run(
                    batch, task_id="bench")
                with lock:
                    for k, v in report.states.items():
                        states[k] = states.get(k, 0) + v

        if args.threads <= 1:
            work()  # in this thread, so that --profile sees it
        else:
            threads = [threading.Thread(target=work) for _ in range(args.threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return states

    drain(queued(500, "warm"))  # connections, scripts, caches
    rows: list[tuple[str, float]] = []
    for r in range(args.rounds):
        tag = ("before" if r % 2 == 0 else "lean") if args.ab else "now"
        mwlog._lean[0] = None if tag == "before" else lean
        ids = queued(args.n, f"r{r}")
        prof = cProfile.Profile() if args.profile and r == args.rounds - 1 else None
        base = sink.count()
        t0, c0 = time.perf_counter(), os.times()
        if prof is not None:
            prof.enable()
        states = drain(ids)
        if prof is not None:
            prof.disable()
        t1, c1 = time.perf_counter(), os.times()
        cpu = ((c1.user - c0.user) + (c1.system - c0.system)) / args.n * 1e6
        rows.append((tag, cpu))
        print(f"round {r + 1} {tag:6}: {cpu:5.0f} µs CPU/msg (user "
              f"{(c1.user - c0.user) / args.n * 1e6:.0f}, sys "
              f"{(c1.system - c0.system) / args.n * 1e6:.0f}), "
              f"{args.n / (t1 - t0):,.0f} msgs/s, sink +{sink.count() - base}, {states}"
              + (" (profiled)" if prof else ""), flush=True)
        if prof is not None:
            prof.dump_stats(str(args.profile))
    mwlog._lean[0] = lean
    measured = [c for _, c in rows[:-1]] if args.profile else [c for _, c in rows]
    if args.ab:
        pairs = [rows[i][1] / rows[i + 1][1] for i in range(0, len(rows) - 1, 2)
                 if not (args.profile and i + 1 == len(rows) - 1)]
        before = statistics.median(c for t, c in rows if t == "before")
        after = statistics.median(c for t, c in rows if t == "lean")
        print(f"\nreply log through structlog's chain: {before:.0f} µs CPU/msg (median), "
              f"lean: {after:.0f}; before/lean per pair: median {statistics.median(pairs):.2f}x "
              f"({', '.join(f'{x:.2f}' for x in pairs)})")
    else:
        print(f"\nmedian {statistics.median(measured):.0f} µs CPU/msg over {len(measured)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
