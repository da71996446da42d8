"""End to end: mailworker against the naive one-task-per-message baseline, in one run.

What it does (everything private: its own ``redis-server`` on a free port, its own sinks,
its own worker processes, all on 127.0.0.1; everything it starts it stops):

1. **Enqueue rate** (no worker running): the same N messages through ``send_many`` in
   batches of ``--batch`` and through the baseline's enqueue path (build an
   ``EmailMessage``, ``apply_async`` its fields; ``benchmarks/baseline_app.py``), in
   alternating chunks so both see the same machine.
2. **send() latency** (no worker running): ``--send-calls`` single ``send()`` calls after a
   warm-up; p50/p95/p99/max of the wall time of each call.
3. **Delivery**: for each sink latency (0 ms: Postfix ``smtp-sink``; 10 ms:
   ``SMTPTestServer(latency=0.010, chunking=True)`` in a process of its own: it offers
   CHUNKING as Postfix does, so mailworker pipelines BDAT transactions; ``--no-chunking``
   for DATA; smtp-sink offers no CHUNKING) and each Celery pool
   (``threads``, ``prefork``), start the workers with the same ``-c``, wait until they are
   ready, then time from the first enqueue to the moment the sink has received every
   message. The producer enqueues while the workers run (end to end, as an app would).
   Worker CPU (user+sys of the worker process and its children, from ``/proc``) and
   peak RSS (``VmRSS`` sampled every 100 ms, per process) are measured over the same
   window. mailworker and the baseline alternate, so drift hits both.

The "to 95%" column is the rate until 95% of the messages had arrived: it leaves out the
tail of messages held back and retried (a relay's fleet window still opening at start-up
holds whole batches for a moment), which varies from run to run more than the rest.

Each delivery configuration runs in two modes: ``e2e`` (above) and ``backlog`` (the N
messages are queued first, then the workers start, and the clock runs from the first to
the last message at the sink: worker throughput alone, without the producer competing for
the CPU and without worker start-up).

Run: ``.venv/bin/python benchmarks/bench_queue.py`` (N=10,000; about 8 minutes on a
2-core machine), ``--quick`` (N=2,000, about 3 minutes), ``--json PATH`` to keep the
numbers; ``--pools``, ``--latencies``, ``--modes``, ``--systems``, ``-c`` select a subset.
The 10 ms runs use ``--n10`` messages (default 2,000): the baseline pays about 7.5 round
trips per message there, so 10,000 would take about three and a half minutes per baseline
run. Results are in docs/benchmarks-queue.md.

``MAILWORKER_LOG_LEVEL`` in the environment is passed to the mailworker workers (default
INFO, like a production worker); Celery's own worker log level is ``--loglevel``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mailworker.testing.polling import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

SENDER = "Example Shop <orders@shop.example.com>"
LINE = "Thank you for your order. Your parcel left our warehouse today and is on its way.\n"
TEXT = (LINE * 40)[:2048]  # 2 KB of plain text, as in bench_build.py

TARGETS = {"ratio_0ms": 3.0, "ratio_10ms": 5.0, "enqueue_ratio": 3.0, "send_p99_ms": 3.0,
           "rss_mb": 150.0}


# -- /proc ---------------------------------------------------------------------------------

def proc_cpu(pid: int) -> float | None:
    """user+sys seconds of *pid* and of its reaped children; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    return sum(int(x) for x in fields[11:15]) / CLK_TCK  # utime stime cutime cstime


def proc_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0


def proc_tree(pid: int) -> list[int]:
    """*pid* and all its descendants (prefork children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


class Monitor:
    """Samples CPU and RSS of process trees every *interval* seconds in a thread."""

    def __init__(self, roots: dict[str, int], interval: float = 0.1) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_kb: dict[str, dict[int, int]] = {k: {} for k in roots}
        self.last_cpu: dict[str, dict[int, float]] = {k: {} for k in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for name, root in self.roots.items():
            for pid in proc_tree(root):
                rss = proc_rss_kb(pid)
                cpu = proc_cpu(pid)
                if rss:
                    peaks = self.peak_kb[name]
                    peaks[pid] = max(peaks.get(pid, 0), rss)
                if cpu is not None:
                    self.last_cpu[name][pid] = cpu

    def cpu(self, name: str) -> float:
        self.sample()
        return sum(self.last_cpu[name].values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Monitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(5)


# -- processes we start ----------------------------------------------------------------------

class Child:
    """A subprocess in its own session; stopped by its process group, bounded in time."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 stdin: int | None = subprocess.DEVNULL) -> None:
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=stdin, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._fh.close()


class RedisServer(Child):
    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("redis-server is not installed")
        self.port = free_port()
        super().__init__([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp)], tmp / "redis.log")
        import redis

        self.client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, 0.05, "redis-server to start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wipe(self) -> None:
        """Delete everything but kombu's binding tables: producers in this process cache
        the queues they declared, and a FLUSHALL would leave them publishing into nothing."""
        keys = [k for k in self.client.scan_iter(count=5000) if not k.startswith(b"_kombu.binding")]
        for i in range(0, len(keys), 5000):
            self.client.unlink(*keys[i:i + 5000])


class SmtpSink(Child):
    """Postfix's smtp-sink: C, pipelining, discards mail; ``-c`` prints running counts."""

    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, tmp: Path) -> None:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.port = free_port()
        argv = [exe, "-c", f"127.0.0.1:{self.port}", "256"]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "nobody"]  # it refuses to run as root without -u
        self.counts = tmp / "smtp-sink.counts"
        super().__init__(argv, self.counts)
        wait_until(self._listening, 10, 0.05, "smtp-sink to listen")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
            return True
        except OSError:
            return False

    def count(self) -> int:
        """Messages received so far (the last ``mesg=`` counter it printed)."""
        with self.counts.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200))
            found = self._MESG.findall(f.read())
        return int(found[-1]) if found else 0


_LATENCY_SINK = """
import sys, threading
from mailworker.testing import SMTPTestServer
server = SMTPTestServer(latency=float(sys.argv[1]), chunking=sys.argv[2:] == ["chunking"])
server.start()
print("port", server.port, flush=True)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
last = -1
while not stop.wait(0.02):
    n = len(server._recorder._messages)
    if n != last:
        print("count", n, flush=True)
        last = n
server.stop()
"""


class LatencySink:
    """``SMTPTestServer(latency=...)`` in a process of its own (see the docs for why)."""

    def __init__(self, tmp: Path, latency: float, chunking: bool = True) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        args = [PY, "-c", _LATENCY_SINK, str(latency)] + (["chunking"] if chunking else [])
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(tmp / "latency-sink.log").open("ab"),
                                     start_new_session=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if not first or first[0] != b"port":
            raise RuntimeError(f"latency sink failed to start (log: {tmp}/latency-sink.log)")
        self.port = int(first[1])
        self._count = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            if parts and parts[0] == b"count":
                self._count = int(parts[1])

    def count(self) -> int:
        return self._count

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


# -- the bench ---------------------------------------------------------------------------------

@dataclass
class DeliveryRun:
    system: str
    pool: str
    latency_ms: int
    n: int
    concurrency: int
    mode: str = "e2e"
    delivered: int = 0
    wall_s: float = 0.0
    enqueue_s: float = 0.0
    rate: float = 0.0
    worker_cpu_ms_per_msg: float = 0.0
    redis_cpu_ms_per_msg: float = 0.0
    sink_cpu_ms_per_msg: float = 0.0
    producer_cpu_ms_per_msg: float = 0.0
    peak_rss_mb: float = 0.0         # the largest single worker process
    peak_rss_tree_mb: float = 0.0    # sum of each worker process's peak (prefork)
    processes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.sinks: dict[int, Any] = {}
        cfg = tmp / "mailworker.toml"
        self.queues = ["mwq_enq", "mwq_lat"] + [
            f"{s}_{p}_{lat}_{m}" for s in ("mwq", "mwm") for p in ("threads", "prefork", "solo")
            for lat in (0, 10)
            for m in ("e2e", "backlog")]
        cfg.write_text('default_queue = "mwq_enq"\n'
                       + "".join(f'[queues.{q}]\nlifetime = "1h"\n' for q in self.queues))
        self.cfg = cfg
        self.prefix = "mwb"
        # The producer (this process) uses the same settings as the workers.
        os.environ.update(self._mw_env(relay_port=1))
        os.environ["BASELINE_BROKER_URL"] = self.redis.url
        sys.path.insert(0, str(ROOT))

    def _mw_env(self, relay_port: int) -> dict[str, str]:
        env = {
            "MAILWORKER_REDIS_URL": self.redis.url,
            "MAILWORKER_KEY_PREFIX": self.prefix,
            "MAILWORKER_CONFIG": str(self.cfg),
            "MAILWORKER_RELAY_DEFAULT": f"smtp://127.0.0.1:{relay_port}",
            "MAILWORKER_DEFAULT_SENDER": SENDER,
            "MAILWORKER_LOG_FORMAT": "json",
        }
        if self.args.mw_batch_size:
            env["MAILWORKER_BATCH_SIZE"] = str(self.args.mw_batch_size)
        return env

    def sink(self, latency_ms: int) -> Any:
        if latency_ms not in self.sinks:
            self.sinks[latency_ms] = (SmtpSink(self.tmp) if latency_ms == 0
                                      else LatencySink(self.tmp, latency_ms / 1000.0,
                                                       chunking=self.args.chunking))
        return self.sinks[latency_ms]

    def close(self) -> None:
        for s in self.sinks.values():
            s.stop()
        self.redis.stop()

    # -- inputs ------------------------------------------------------------------------
    @staticmethod
    def inputs(n: int, tag: str) -> list[dict[str, Any]]:
        return [{"sender": SENDER, "to": [f"user{i}.{tag}@example.org"],
                 "subject": f"Your order #{i} has shipped", "text": TEXT} for i in range(n)]

    @staticmethod
    def baseline_fields(item: dict[str, Any]) -> dict[str, Any]:
        return {"from_email": item["sender"], "to": list(item["to"]),
                "subject": item["subject"], "body": item["text"]}

    def mw_enqueue(self, items: list[dict[str, Any]], queue: str) -> None:
        import mailworker

        batch = self.args.batch
        for i in range(0, len(items), batch):
            mailworker.send_many([dict(it, queue=queue) for it in items[i:i + batch]])

    def bl_enqueue(self, items: list[dict[str, Any]], queue: str) -> None:
        from benchmarks import baseline_app

        for it in items:
            baseline_app.enqueue(self.baseline_fields(it), queue)

    # -- 1. enqueue rate --------------------------------------------------------------------
    def enqueue_rate(self, n: int) -> dict[str, Any]:
        items = self.inputs(n, "enq")
        chunk = self.args.batch
        warm = self.inputs(200, "warm")
        self.mw_enqueue(warm, "mwq_enq")
        self.bl_enqueue(warm, "blq_enq")
        self.redis.wipe()
        mw_s = bl_s = 0.0
        mw_cpu = bl_cpu = 0.0
        for i in range(0, n, chunk):
            part = items[i:i + chunk]
            c0, t0 = time.process_time(), time.perf_counter()
            self.mw_enqueue(part, "mwq_enq")
            c1, t1 = time.process_time(), time.perf_counter()
            self.bl_enqueue(part, "blq_enq")
            c2, t2 = time.process_time(), time.perf_counter()
            mw_s += t1 - t0
            bl_s += t2 - t1
            mw_cpu += c1 - c0
            bl_cpu += c2 - c1
        # Check that every publish reached the broker (a failed publish is only logged).
        r = self.redis.client
        mw_tasks, bl_tasks = r.llen("mwq_enq"), r.llen("blq_enq")
        from mailworker.runtime import get_runtime

        mw_records = get_runtime().store.counts()["in_flight"]
        self.redis.wipe()
        return {"n": n, "batch": chunk,
                "mailworker_rate": n / mw_s, "baseline_rate": n / bl_s,
                "mailworker_us_per_msg": mw_s / n * 1e6, "baseline_us_per_msg": bl_s / n * 1e6,
                "mailworker_cpu_us_per_msg": mw_cpu / n * 1e6,
                "baseline_cpu_us_per_msg": bl_cpu / n * 1e6,
                "ratio": bl_s / mw_s, "mailworker_records": mw_records,
                "mailworker_tasks": mw_tasks, "baseline_tasks": bl_tasks}

    # -- 2. send() latency ---------------------------------------------------------------
    def send_latency(self, calls: int) -> dict[str, Any]:
        import mailworker

        items = self.inputs(calls + 200, "lat")
        for it in items[:200]:
            mailworker.send(**it, queue="mwq_lat")
        lat = []
        for it in items[200:]:
            t0 = time.perf_counter()
            mailworker.send(**it, queue="mwq_lat")
            lat.append(time.perf_counter() - t0)
        published = self.redis.client.llen("mwq_lat")
        self.redis.wipe()
        lat.sort()

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, round(p / 100 * len(lat)) - 1)] * 1000

        return {"calls": calls, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "max_ms": lat[-1] * 1000, "mean_ms": sum(lat) / len(lat) * 1000,
                "published": published}

    # -- 3. delivery -------------------------------------------------------------------------
    def start_workers(self, system: str, pool: str, queue: str, sink_port: int,
                      wait: bool = True) -> Child:
        c = str(self.args.concurrency)
        log = self.tmp / f"{system}-{queue}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
        # This tree first; the caller's PYTHONPATH after it (e.g. an optional package such
        # as hiredis installed with --target, to measure it without changing the venv).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        if system.startswith("mailworker"):
            env.update(self._mw_env(sink_port))
            if os.environ.get("MAILWORKER_LOG_LEVEL"):
                env["MAILWORKER_LOG_LEVEL"] = os.environ["MAILWORKER_LOG_LEVEL"]
            argv = [PY, "-m", "mailworker.cli.main", "worker", "-Q", queue, "-c", c, "-P", pool,
                    "-l", self.args.loglevel]
            if system == "mailworker+metrics":  # the metrics cost: same run, port on
                argv += ["--metrics-port", str(free_port())]
        else:
            env.update({"BASELINE_BROKER_URL": self.redis.url, "BASELINE_SMTP_HOST": "127.0.0.1",
                        "BASELINE_SMTP_PORT": str(sink_port)})
            argv = [PY, "-m", "celery", "-A", "benchmarks.baseline_app", "worker", "-Q", queue,
                    "-c", c, "-P", pool, "-l", self.args.loglevel, "--without-gossip",
                    "--without-mingle", "--without-heartbeat", "-n", f"baseline-{queue}@%h"]
        w = Child(argv, log, env)
        if not wait:
            return w
        try:
            wait_until(lambda: b"ready." in log.read_bytes() or not w.alive(), 60, 0.05,
                       f"{system} worker to be ready (log: {log})")
        except BaseException:
            w.stop()
            raise
        if not w.alive():
            raise RuntimeError(f"{system} worker exited: {log.read_text()[-3000:]}")
        time.sleep(0.3)  # let the threads/children settle into their first broker poll
        return w

    def deliver(self, system: str, pool: str, latency_ms: int, n: int, mode: str) -> DeliveryRun:
        """One delivery run; *mode* ``e2e`` (enqueue while the workers run) or ``backlog``
        (enqueue first, then start the workers and time the drain at the sink)."""
        sink = self.sink(latency_ms)
        short = {"mailworker": "mwq", "mailworker+metrics": "mwm"}.get(system, "blq")
        queue = f"{short}_{pool}_{latency_ms}_{mode}"
        run = DeliveryRun(system, pool, latency_ms, n, self.args.concurrency, mode=mode)
        items = self.inputs(n, f"{system}{pool}{latency_ms}{mode}")
        enqueue = self.mw_enqueue if system.startswith("mailworker") else self.bl_enqueue
        base = sink.count()
        worker: Child | None = None
        try:
            if mode == "backlog":
                p0, e0 = time.process_time(), time.perf_counter()
                enqueue(items, queue)
                e1, p1 = time.perf_counter(), time.process_time()
                worker = self.start_workers(system, pool, queue, sink.port, wait=False)
            else:
                worker = self.start_workers(system, pool, queue, sink.port)
            roots = {"worker": worker.pid, "redis": self.redis.pid, "sink": sink.pid}
            w = worker
            with Monitor(roots) as mon:
                if mode == "backlog":
                    # The clock starts at the first message the sink receives: worker start-up
                    # (imports, forking, connecting) is not delivery.
                    t_start = time.perf_counter()
                    wait_until(lambda: sink.count() > base or not w.alive(), 120, 0.002,
                               "the first message at the sink")
                    t0 = time.perf_counter()
                    first = sink.count() - base
                    run.extra["startup_s"] = round(t0 - t_start, 3)
                    run.extra["counted_from"] = first
                    cpu0 = {k: mon.cpu(k) for k in roots}
                else:
                    first = 0
                    cpu0 = {k: mon.cpu(k) for k in roots}
                    p0, t0 = time.process_time(), time.perf_counter()
                    e0 = t0
                    enqueue(items, queue)
                    e1, p1 = time.perf_counter(), time.process_time()
                # When 95% had arrived: the rate up to there leaves out a tail of messages
                # held back and retried (a relay's fleet window still opening at start-up
                # holds whole batches for a moment), which varies from run to run.
                mark95 = first + 0.95 * (n - first)
                at95: list[float] = []

                def done() -> bool:
                    got = sink.count() - base
                    if not at95 and got >= mark95:
                        at95.append(time.perf_counter())
                    return got >= n or not w.alive()

                try:
                    wait_until(done, self.args.timeout, 0.002, f"{n} messages at the sink")
                except TimeoutError as exc:
                    run.extra["error"] = str(exc)
                t1 = time.perf_counter()
                if at95 and at95[0] > t0:
                    run.extra["rate_95"] = round((mark95 - first) / (at95[0] - t0), 1)
                run.delivered = sink.count() - base
                if system.startswith("mailworker"):
                    from mailworker.runtime import get_runtime

                    store = get_runtime().store
                    # Saved as delivered, not just received by the sink.
                    try:
                        wait_until(lambda: store.counts()["in_flight"] == 0, 30, 0.01,
                                   "records to be committed")
                        run.extra["committed_after_s"] = round(time.perf_counter() - t1, 3)
                    except TimeoutError:
                        run.extra["in_flight_left"] = store.counts()["in_flight"]
                    run.extra["store_counts"] = store.counts()
                cpu1 = {k: mon.cpu(k) for k in roots}
                time.sleep(0.3)  # anything sent twice would show up now
                run.extra["sink_total_after"] = sink.count() - base
            counted = run.delivered - first
            run.wall_s = t1 - t0
            run.enqueue_s = e1 - e0
            run.rate = counted / run.wall_s if run.wall_s else 0.0
            per = 1000.0 / max(counted, 1)
            run.worker_cpu_ms_per_msg = (cpu1["worker"] - cpu0["worker"]) * per
            run.redis_cpu_ms_per_msg = (cpu1["redis"] - cpu0["redis"]) * per
            run.sink_cpu_ms_per_msg = (cpu1["sink"] - cpu0["sink"]) * per
            run.producer_cpu_ms_per_msg = (p1 - p0) * 1000.0 / n
            peaks = mon.peak_kb["worker"]
            run.peak_rss_mb = max(peaks.values()) / 1024
            run.peak_rss_tree_mb = sum(peaks.values()) / 1024
            run.processes = len(peaks)
        finally:
            if worker is not None:
                worker.stop()
            self.redis.wipe()
        return run


# -- report ------------------------------------------------------------------------------------

def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


MODE_TITLES = {
    "e2e": "end to end: first enqueue -> last message at the sink, producer running alongside",
    "backlog": "backlog drain: N queued first, workers started, first -> last message at the sink",
}


def report(res: dict[str, Any]) -> str:
    out = []
    m = res["machine"]
    out.append(f"machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, "
               f"{m['system']}; concurrency -c {res['concurrency']}, "
               f"N={res['n']} (0 ms), {res['n10']} (10 ms)")
    if m.get("commit"):
        out.append(f"code: commit {m['commit']}" + (
            f" + uncommitted changes to {', '.join(m['package_changes'])}"
            if m.get("package_changes") else ""))
    e = res.get("enqueue")
    if e:
        out.append(f"\nenqueue, no worker running, {e['n']} messages "
                   f"(send_many in batches of {e['batch']}):")
        out.append(fmt_table([
            ["mailworker send_many", f"{e['mailworker_rate']:,.0f}",
             f"{e['mailworker_us_per_msg']:.0f}", f"{e['mailworker_cpu_us_per_msg']:.0f}"],
            ["baseline EmailMessage + apply_async", f"{e['baseline_rate']:,.0f}",
             f"{e['baseline_us_per_msg']:.0f}", f"{e['baseline_cpu_us_per_msg']:.0f}"],
        ], ["path", "msgs/s", "µs/msg", "CPU µs/msg"]))
    s = res.get("send_latency")
    if s:
        out.append(f"\nsingle send(), no worker running, {s['calls']} calls: "
                   f"p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms, "
                   f"p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.2f} ms")
    for mode in res.get("modes", []):
        runs = [r for r in res.get("delivery", []) if r["mode"] == mode]
        if not runs:
            continue
        out.append(f"\ndelivery, {MODE_TITLES[mode]}:")
        rows = []
        for r in runs:
            rows.append([r["system"], r["pool"], f"{r['latency_ms']} ms", str(r["n"]),
                         str(r["delivered"]), f"{r['wall_s']:.2f}", f"{r['rate']:,.0f}",
                         f"{r['extra']['rate_95']:,.0f}" if r["extra"].get("rate_95") else "-",
                         f"{r['worker_cpu_ms_per_msg']:.2f}", f"{r['redis_cpu_ms_per_msg']:.3f}",
                         f"{r['enqueue_s']:.2f}", f"{r['producer_cpu_ms_per_msg']:.3f}",
                         f"{r['peak_rss_mb']:.0f}" + (f" ({r['processes']}p, "
                                                      f"{r['peak_rss_tree_mb']:.0f})"
                                                      if r["processes"] > 1 else "")])
        out.append(fmt_table(rows, ["system", "pool", "latency", "N", "delivered", "wall s",
                                    "msgs/s", "to 95%", "worker CPU ms/msg", "redis CPU ms/msg",
                                    "enqueue s", "producer CPU ms/msg", "peak RSS MB"]))
    out.append("\ntargets:")
    trows = []
    for t in res.get("targets", []):
        trows.append([t["name"], t["measured"], t["target"], "ok" if t["ok"] else "MISSED"])
    out.append(fmt_table(trows, ["target", "measured", "required", ""]))
    for line in res.get("pool_choice", []):
        out.append(line)
    return "\n".join(out)


def _by(res: dict[str, Any]) -> dict[tuple[str, str, int, str], dict[str, Any]]:
    return {(r["system"], r["pool"], r["latency_ms"], r["mode"]): r
            for r in res.get("delivery", [])}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    by = _by(res)
    for mode in res.get("modes", []):
        for pool in res["pools"]:
            for lat, key in ((0, "ratio_0ms"), (10, "ratio_10ms")):
                mw = by.get(("mailworker", pool, lat, mode))
                bl = by.get(("baseline", pool, lat, mode))
                if mw and bl and bl["rate"]:
                    ratio = mw["rate"] / bl["rate"]
                    out.append({"name": f"msgs/s vs baseline, {lat} ms, {pool}, {mode}",
                                "measured": f"{ratio:.2f}x", "target": f">= {TARGETS[key]:g}x",
                                "ok": ratio >= TARGETS[key], "value": ratio})
    e = res.get("enqueue")
    if e:
        out.append({"name": "send_many enqueue vs baseline enqueue",
                    "measured": f"{e['ratio']:.2f}x", "target": f">= {TARGETS['enqueue_ratio']:g}x",
                    "ok": e["ratio"] >= TARGETS["enqueue_ratio"], "value": e["ratio"]})
    s = res.get("send_latency")
    if s:
        out.append({"name": "single send() p99", "measured": f"{s['p99_ms']:.2f} ms",
                    "target": f"< {TARGETS['send_p99_ms']:g} ms",
                    "ok": s["p99_ms"] < TARGETS["send_p99_ms"], "value": s["p99_ms"]})
    for pool in res["pools"]:
        rs = [r for r in res.get("delivery", []) if r["system"] == "mailworker"
              and r["pool"] == pool]
        if rs:
            worst = max(r["peak_rss_mb"] for r in rs)
            out.append({"name": f"mailworker worker process peak RSS, {pool}",
                        "measured": f"{worst:.0f} MB", "target": f"< {TARGETS['rss_mb']:g} MB",
                        "ok": worst < TARGETS["rss_mb"], "value": worst})
    return out


def pool_choice(res: dict[str, Any]) -> list[str]:
    by = _by(res)
    lines = []
    for mode in res.get("modes", []):
        for lat in (0, 10):
            t = by.get(("mailworker", "threads", lat, mode))
            p = by.get(("mailworker", "prefork", lat, mode))
            if t and p:
                ratio = p["rate"] / t["rate"] if t["rate"] else float("inf")
                win = ("a tie (within 5%)" if abs(ratio - 1) <= 0.05
                       else "prefork is faster" if ratio > 1 else "threads is faster")
                lines.append(
                    f"mailworker -c {res['concurrency']}, {lat} ms, {mode}: "
                    f"threads {t['rate']:,.0f} msgs/s, "
                    f"{t['worker_cpu_ms_per_msg']:.2f} ms CPU/msg, "
                    f"{t['peak_rss_tree_mb']:.0f} MB | prefork {p['rate']:,.0f} msgs/s, "
                    f"{p['worker_cpu_ms_per_msg']:.2f} ms CPU/msg, {p['peak_rss_tree_mb']:.0f} MB "
                    f"in {p['processes']} processes -> {win}")
    if lines:
        lines.insert(0, "\nthreads vs prefork:")
    return lines


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
             .splitlines() if line[3:].startswith("mailworker/")]
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}",
            "commit": git("rev-parse", "--short", "HEAD"), "package_changes": dirty}


def metrics_cost(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker CPU per message of mailworker and mailworker+metrics, per configuration."""
    runs: dict[tuple[str, int, str], dict[str, float]] = {}
    for r in res.get("delivery", []):
        if r["system"] in ("mailworker", "mailworker+metrics"):
            key = (r["pool"], r["latency_ms"], r["mode"])
            runs.setdefault(key, {})[r["system"]] = r["worker_cpu_ms_per_msg"]
    out = []
    for (pool, lat, mode), got in runs.items():
        if len(got) == 2 and got["mailworker"] > 0:
            off, on = got["mailworker"], got["mailworker+metrics"]
            out.append({"pool": pool, "latency_ms": lat, "mode": mode, "off": off, "on": on,
                        "more_pct": round((on - off) / off * 100.0, 1)})
    return out


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--n", type=int, default=10_000, help="messages per 0 ms run")
    p.add_argument("--n10", type=int, default=2_000, help="messages per 10 ms run")
    p.add_argument("--quick", action="store_true", help="N=2,000 and 10 ms N=1,000")
    p.add_argument("-c", "--concurrency", type=int, default=4)
    p.add_argument("--pools", default="threads,prefork", help="comma-separated Celery pools")
    p.add_argument("--latencies", default="0,10", help="sink reply latencies in ms (0 and/or 10)")
    p.add_argument("--systems", default="mailworker,baseline",
                   help="mailworker, baseline and/or mailworker+metrics (--metrics-port on)")
    p.add_argument("--metrics", action="store_true",
                   help="also run mailworker+metrics and print worker CPU per message with "
                        "metrics on vs off side by side")
    p.add_argument("--modes", default="e2e,backlog",
                   help="e2e (enqueue while workers run) and/or backlog (drain a full queue)")
    p.add_argument("--batch", type=int, default=500, help="send_many batch size")
    p.add_argument("--no-chunking", dest="chunking", action="store_false",
                   help="the 10 ms sink does not offer CHUNKING (mailworker then uses DATA "
                        "pipelining, as before issue 12; the baseline's smtplib always does)")
    p.add_argument("--mw-batch-size", type=int, default=None,
                   help="MAILWORKER_BATCH_SIZE for the runs (default: mailworker's, 50)")
    p.add_argument("--send-calls", type=int, default=2_000)
    p.add_argument("--skip-enqueue", action="store_true")
    p.add_argument("--loglevel", default="INFO", help="Celery worker -l for both systems")
    p.add_argument("--timeout", type=float, default=600.0, help="per delivery run, seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the worker logs and say where")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.n, args.n10, args.send_calls = 2_000, 1_000, 1_000
    pools = [x for x in args.pools.split(",") if x]
    lats = [int(x) for x in args.latencies.split(",") if x]
    systems = [x for x in args.systems.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    if args.metrics and "mailworker+metrics" not in systems:
        systems.append("mailworker+metrics")

    tmp = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    bench = Bench(args, tmp)
    res: dict[str, Any] = {"machine": machine(), "n": args.n, "n10": args.n10,
                           "concurrency": args.concurrency, "pools": pools, "modes": modes,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "command": " ".join(sys.argv), "delivery": []}
    started = time.perf_counter()
    try:
        if not args.skip_enqueue:
            print(f"enqueue rate, {args.n} messages ...", flush=True)
            res["enqueue"] = bench.enqueue_rate(args.n)
            print(f"send() latency, {args.send_calls} calls ...", flush=True)
            res["send_latency"] = bench.send_latency(args.send_calls)
        for lat in lats:
            n = args.n if lat == 0 else args.n10
            for pool in pools:
                for mode in modes:
                    for system in systems:
                        print(f"delivery ({mode}): {system} {pool} {lat} ms, {n} messages ...",
                              end=" ", flush=True)
                        run = bench.deliver(system, pool, lat, n, mode)
                        r95 = run.extra.get("rate_95")
                        print(f"{run.rate:,.0f} msgs/s"
                              + (f" ({r95:,.0f} to 95%)" if r95 else "")
                              + f", {run.worker_cpu_ms_per_msg:.2f} ms CPU/msg", flush=True)
                        res["delivery"].append(asdict(run))
    finally:
        bench.close()
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed_s"] = round(time.perf_counter() - started, 1)
    res["targets"] = targets(res)
    res["pool_choice"] = pool_choice(res)
    print()
    print(report(res))
    cost = metrics_cost(res)
    if cost:
        res["metrics_cost"] = cost
        print("\nmetrics cost (worker CPU ms/msg, --metrics-port off vs on):")
        for row in cost:
            print(f"  {row['pool']:8} {row['latency_ms']:>3} ms {row['mode']:8} "
                  f"off {row['off']:.3f}  on {row['on']:.3f}  {row['more_pct']:+.1f}%")
    print(f"\n(total {res['elapsed_s']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
