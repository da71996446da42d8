"""The SMTP layer against the standard library, in one run against the same sinks.

Clients (all in this process, one after another, single-threaded; the sinks are child
processes, so their CPU is not counted):

* ``smtplib new``     ``smtplib.SMTP()`` + ``sendmail()`` + ``quit()`` for every message.
* ``smtplib reused``  one ``smtplib.SMTP`` connection, ``sendmail()`` per message.
* ``mw send()``       mailworker's ``Pool``, ``pool.send(envelope)``: one message per call
                      on the pool's reused connection (2 round trips per message: commands,
                      then content + dot).
* ``mw batch``        mailworker's ``Pool``, ``pool.send_many(batch)`` with ``--batch``
                      envelopes per call over one connection: the next message's commands
                      ride in the same write as the previous message's dot (RFC 2920), so
                      ``batch`` messages cost ``batch + 1`` round trips.
* ``mw bdat``       (10 ms only) the same batches with BDAT (RFC 3030 CHUNKING): whole
                      transactions pipelined, ``pipeline_window`` (8) of them in flight.
                      The other mailworker clients run with ``chunking=false``, i.e. today's
                      DATA pipelining, so their rows stay comparable with earlier runs and
                      ``mw bdat`` / ``mw batch`` is BDAT against DATA on the same client.
* ``mw batch, log off`` (0 ms only; a diagnostic, no target): the same with the reply log
  switched off (level WARNING), to show what the log costs.

mailworker runs with its reply log ON: ``configure_logging(fmt="json", stream=<file>)``,
one JSON ``smtp.reply`` event per SMTP reply (4 per message with 1 recipient, 8 with 5).
smtplib logs nothing. Both get the same pre-built message bytes (CRLF line ends);
mailworker's ``Envelope`` objects are built inside the timed loop (its address checks
stand where ``sendmail()`` quotes the addresses). Every reply is checked: a refused
message stops the run.

Sinks: at 0 ms Postfix's ``smtp-sink`` (C, so the server is not what gets measured; it
does not offer CHUNKING, so every client sends DATA there); at 10 ms
``mailworker.testing.SMTPTestServer(latency=0.010, chunking=True)`` in a process of its own.

Cases: latency {0, 10 ms} x recipients {1, 5} x size {2 KB, 100 KB}. For each, msgs/s
(wall clock) and client CPU ms per 1,000 messages (``time.process_time()``). Connection
set-up is outside the timed window for the reused clients (a warm-up opens the
connection and sends a few messages first) and inside it for ``smtplib new``, where it is
the point. At 0 ms, where CPU decides and other load on the machine shows, each client
runs ``--rounds`` rounds of ``--n0`` messages (default 5 x 400 = 2,000), the clients
taking turns round by round in alternating order; the table shows medians, and each
ratio is the median of the per-round ratios (both clients of a round saw the same
machine). At 10 ms each client runs once (``--n10-*`` messages): round trips dominate.

Run: ``.venv/bin/python benchmarks/bench_smtp.py`` (about 3.5 minutes on 2 cores),
``--quick`` (about 1 minute), ``--json PATH`` to keep the numbers, ``--profile`` to
cProfile mailworker's batch client at 0 ms (1 recipient, 2 KB and 100 KB) after the
table. After the tables, the reply log's microseconds per ``smtp.reply`` event (before,
now, INFO off: ``benchmarks/bench_replylog.py``; ``--no-replylog`` skips it). Results and
their analysis: ``docs/benchmarks-smtp.md``. The exit status is 0
whether or not the targets are met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _sinks import LatencySink, SmtpSink

from mailworker.logging import configure_logging
from mailworker.relay import parse_relay
from mailworker.smtp import Envelope, Pool, SendResult

SENDER = "orders@shop.example.com"
LOCAL_HOSTNAME = socket.getfqdn()  # given to smtplib too: no DNS lookup per connection
WARMUP = 5

CLIENTS = ("smtplib new", "smtplib reused", "mw send()", "mw batch", "mw bdat")
DIAG = "mw batch, log off"

# (latency ms, recipients, what, mailworker client, baseline client, minimum ratio)
TARGETS: list[tuple[int, int | None, str, str, float]] = [
    (10, 1, "mw batch", "smtplib reused", 3.5),
    (10, 5, "mw batch", "smtplib reused", 6.0),
    (10, None, "mw batch", "smtplib new", 6.0),
    (0, None, "mw batch", "smtplib reused", 1.5),
    (10, None, "mw bdat", "mw batch", 2.5),
]
BDAT_TARGET = 250.0  # msg/s on one connection at 10 ms, 1 recipient, 2 KB (issue 12)


# -- messages ------------------------------------------------------------------------------

def make_message(size: int) -> bytes:
    """``size`` bytes of RFC 5322 message, CRLF line ends, no leading dots."""
    head = (
        f"From: Example Shop <{SENDER}>\r\nTo: customer@example.org\r\n"
        "Subject: Your order #10293 has shipped\r\n"
        "Message-ID: <bench-10293@shop.example.com>\r\n"
        "Date: Thu, 27 Nov 2025 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"Thank you for your order. Your parcel left our warehouse today and is on its \r\n"
    body = line * (size // len(line) + 1)
    data = head + body
    data = data[: size - 2] + b"\r\n"
    if data[-3:-2] == b"\r":  # cut between CR and LF: keep every line end a CRLF
        data = data[: size - 3] + b"x\r\n"
    assert len(data) == size and data.count(b"\r\n") == data.count(b"\n")
    return data


def recipients(n: int) -> tuple[str, ...]:
    return tuple(f"customer{i}@example.org" for i in range(n))


# -- the clients ---------------------------------------------------------------------------
# Each takes (port, recipients, data, n) and returns (wall seconds, CPU seconds) of the
# timed part only.

Timing = tuple[float, float, float]  # wall seconds, CPU seconds, of which in the kernel


class Stopwatch:
    """Wall clock, process CPU (``time.process_time()``) and its system part (getrusage)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.sys = resource.getrusage(resource.RUSAGE_SELF).ru_stime

    def stop(self) -> Timing:
        return (time.perf_counter() - self.wall, time.process_time() - self.cpu,
                resource.getrusage(resource.RUSAGE_SELF).ru_stime - self.sys)


def _check_smtplib(refused: dict[str, Any]) -> None:
    if refused:
        raise RuntimeError(f"smtplib: recipients refused: {refused}")


def smtplib_new(port: int, rcpts: tuple[str, ...], data: bytes, n: int) -> Timing:
    watch = Stopwatch()
    for _ in range(n):
        s = smtplib.SMTP("127.0.0.1", port, local_hostname=LOCAL_HOSTNAME, timeout=30)
        _check_smtplib(s.sendmail(SENDER, rcpts, data))
        s.quit()
    return watch.stop()


def smtplib_reused(port: int, rcpts: tuple[str, ...], data: bytes, n: int) -> Timing:
    s = smtplib.SMTP("127.0.0.1", port, local_hostname=LOCAL_HOSTNAME, timeout=30)
    try:
        s.ehlo()
        for _ in range(WARMUP):
            _check_smtplib(s.sendmail(SENDER, rcpts, data))
        watch = Stopwatch()
        for _ in range(n):
            _check_smtplib(s.sendmail(SENDER, rcpts, data))
        return watch.stop()
    finally:
        s.quit()


def _pool(port: int, chunking: bool = False) -> Pool:
    # Every message of a run on one connection: no retirement by count or age.
    relay = parse_relay("bench", f"smtp://127.0.0.1:{port}?max_messages=1000000&max_age=3600"
                                 "&idle_timeout=3600&noop_after=3600&timeout=30"
                                 f"&chunking={'true' if chunking else 'false'}")
    return Pool(relay)


def _check_mw(entries: list[Any], rcpts: int) -> None:
    for e in entries:
        if not isinstance(e, SendResult) or len(e.accepted) != rcpts:
            raise RuntimeError(f"mailworker: not delivered: {e!r}")


def mw_send(port: int, rcpts: tuple[str, ...], data: bytes, n: int) -> Timing:
    pool = _pool(port)
    try:
        _check_mw([pool.send(Envelope(SENDER, rcpts, data, message_id=f"w{i}"))
                   for i in range(WARMUP)], len(rcpts))
        watch = Stopwatch()
        for i in range(n):
            result = pool.send(Envelope(SENDER, rcpts, data, message_id=f"m{i}"))
            if len(result.accepted) != len(rcpts):
                raise RuntimeError(f"mailworker: not delivered: {result!r}")
        timing = watch.stop()
        _check_one_connection(pool)
        return timing
    finally:
        pool.close()


def make_mw_batch(batch: int, chunking: bool = False
                  ) -> Callable[[int, tuple[str, ...], bytes, int], Timing]:
    def mw_batch(port: int, rcpts: tuple[str, ...], data: bytes, n: int) -> Timing:
        pool = _pool(port, chunking)
        try:
            _check_mw(pool.send_many([Envelope(SENDER, rcpts, data, message_id=f"w{i}")
                                      for i in range(WARMUP)]), len(rcpts))
            watch = Stopwatch()
            for start in range(0, n, batch):
                envelopes = [Envelope(SENDER, rcpts, data, message_id=f"m{i}")
                             for i in range(start, min(n, start + batch))]
                _check_mw(pool.send_many(envelopes), len(rcpts))
            timing = watch.stop()
            _check_one_connection(pool)
            return timing
        finally:
            pool.close()
    return mw_batch


def _check_one_connection(pool: Pool) -> None:
    stats = pool.stats()
    if stats.opened != 1:
        raise RuntimeError(f"expected one connection for the whole run, got {stats}")


# -- running -------------------------------------------------------------------------------

@dataclass
class Run:
    client: str
    latency_ms: int
    rcpts: int
    size: int
    n: int
    rounds: list[Timing] = field(default_factory=list)
    sink_cpu_s: float = 0.0
    log_lines: int = 0
    loadavg: float = 0.0  # 1-minute load average when the case started

    @property
    def rate(self) -> float:
        return statistics.median(self.n / wall for wall, _, _ in self.rounds)

    @property
    def cpu_ms_per_1000(self) -> float:
        return statistics.median(cpu / self.n * 1e6 for _, cpu, _ in self.rounds)

    @property
    def sys_ms_per_1000(self) -> float:
        return statistics.median(sys_ / self.n * 1e6 for _, _, sys_ in self.rounds)

    @property
    def round_trips_per_msg(self) -> float:
        return (1.0 / self.rate) / (self.latency_ms / 1000.0) if self.latency_ms else 0.0


class LogFile:
    """The reply log: JSON lines to a file; switchable off (level WARNING) for the diagnostic."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream = path.open("w", encoding="utf-8")
        self.on()

    def on(self) -> None:
        configure_logging(fmt="json", level="INFO", stream=self.stream)

    def off(self) -> None:
        configure_logging(fmt="json", level="WARNING", stream=self.stream)

    def take_lines(self) -> int:
        """Lines written since the last call; the file is emptied (100s of MB otherwise)."""
        self.stream.flush()
        with self.path.open("rb") as f:
            n = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        self.stream.seek(0)
        self.stream.truncate()
        return n


def counts_for(args: argparse.Namespace, latency_ms: int) -> dict[str, int]:
    if latency_ms == 0:
        return dict.fromkeys((*CLIENTS, DIAG), args.n0)
    return {"smtplib new": args.n10_new, "smtplib reused": args.n10_reused,
            "mw send()": args.n10_send, "mw batch": args.n10_batch, "mw bdat": args.n10_bdat}


def run_case(args: argparse.Namespace, sink: SmtpSink | LatencySink, log: LogFile,
             latency_ms: int, n_rcpts: int, size: int) -> list[Run]:
    data, rcpts = make_message(size), recipients(n_rcpts)
    clients: dict[str, Callable[..., Timing]] = {
        "smtplib new": smtplib_new, "smtplib reused": smtplib_reused,
        "mw send()": mw_send, "mw batch": make_mw_batch(args.batch)}
    if latency_ms:
        clients["mw bdat"] = make_mw_batch(args.batch, chunking=True)
    if latency_ms == 0 and args.diagnostic:
        clients[DIAG] = make_mw_batch(args.batch)
    counts = counts_for(args, latency_ms)
    runs = {name: Run(name, latency_ms, n_rcpts, size, counts[name], loadavg=os.getloadavg()[0])
            for name in clients}
    rounds = args.rounds if latency_ms == 0 else 1
    order = list(clients)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            run = runs[name]
            if name == DIAG:
                log.off()
            log.take_lines()
            sink_cpu0 = sink.cpu_seconds()
            try:
                run.rounds.append(clients[name](sink.port, rcpts, data, run.n))
            finally:
                log.on()
            run.sink_cpu_s += sink.cpu_seconds() - sink_cpu0
            run.log_lines += log.take_lines()
            if isinstance(sink, LatencySink):
                sink.reset()  # forget the received mail (memory), between every run
            print(f"  {latency_ms:>2} ms {n_rcpts} rcpt {size // 1024:>3} KB  {name:<18} "
                  f"{run.n / run.rounds[-1][0]:9.1f} msg/s "
                  f"{run.rounds[-1][1] / run.n * 1e6:8.1f} CPU ms/1000", flush=True)
    return list(runs.values())


# -- report --------------------------------------------------------------------------------

def case_label(r: Run) -> str:
    return f"{r.latency_ms:>2} ms, {r.rcpts} rcpt, {r.size // 1024:>3} KB"


def table(runs: list[Run]) -> str:
    cases: dict[tuple[int, int, int], dict[str, Run]] = {}
    for r in runs:
        cases.setdefault((r.latency_ms, r.rcpts, r.size), {})[r.client] = r
    names = [c for c in (*CLIENTS, DIAG) if any(c in by for by in cases.values())]
    head = "| case | " + " | ".join(f"{c}: msg/s | {c}: CPU ms/1k" for c in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for by in cases.values():
        first = next(iter(by.values()))
        cells = []
        for c in names:
            run = by.get(c)
            cells += ([f"{run.rate:,.0f}" if run.rate >= 100 else f"{run.rate:.1f}",
                       f"{run.cpu_ms_per_1000:,.0f}"] if run else ["", ""])
        lines.append(f"| {case_label(first)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rtt_table(runs: list[Run]) -> str:
    ten = [r for r in runs if r.latency_ms]
    if not ten:
        return ""
    cases: dict[tuple[int, int], dict[str, Run]] = {}
    for r in ten:
        cases.setdefault((r.rcpts, r.size), {})[r.client] = r
    lines = ["| case (10 ms) | " + " | ".join(CLIENTS) + " |", "|---|" + "---|" * len(CLIENTS)]
    for by in cases.values():
        first = next(iter(by.values()))
        lines.append(f"| {case_label(first)} | " + " | ".join(
            f"{by[c].round_trips_per_msg:.2f}" if c in by else "" for c in CLIENTS) + " |")
    return "\n".join(lines)


def paired_ratio(a: Run, b: Run) -> tuple[float, float, float]:
    """msg/s of *a* over *b*: (median, min, max) of the per-round ratios.

    Both clients ran in the same rounds, back to back, so a round slowed down by other
    load on the machine slows both; the per-round ratio cancels most of that. With one
    round it is simply the ratio of the rates.
    """
    per_round = [(a.n / ra[0]) / (b.n / rb[0]) for ra, rb in zip(a.rounds, b.rounds, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def ratios(runs: list[Run]) -> tuple[str, list[dict[str, Any]]]:
    by = {(r.latency_ms, r.rcpts, r.size, r.client): r for r in runs}
    rows: list[dict[str, Any]] = []
    for latency, n_rcpts, mw, base, want in TARGETS:
        for key, mw_run in sorted(by.items()):
            lat, rc, size, client = key
            if lat != latency or client not in (mw, "mw send()" if mw == "mw batch" else mw):
                continue
            if n_rcpts is not None and rc != n_rcpts:
                continue
            other = by.get((lat, rc, size, base))
            if other is None:
                continue
            ratio, low, high = paired_ratio(mw_run, other)
            rows.append({
                "case": case_label(mw_run), "client": client, "vs": base, "ratio": ratio,
                "ratio_min": low, "ratio_max": high,
                "cpu_ratio": other.cpu_ms_per_1000 / mw_run.cpu_ms_per_1000,
                "target": want, "headline": client in ("mw batch", "mw bdat"),
                "verdict": "PASS" if ratio >= want else "MISS"})
    lines = ["| case | mailworker | vs | msg/s ratio | (rounds: min-max) | target | | "
             "CPU/msg: baseline / mw |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (not x["headline"], x["case"], x["vs"])):
        verdict = row["verdict"] if row["headline"] else row["verdict"].lower() + " (info)"
        spread = (f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"
                  if row["ratio_max"] > row["ratio_min"] else "")
        lines.append(f"| {row['case']} | {row['client']} | {row['vs']} | "
                     f"{row['ratio']:.2f}x | {spread} | >= {row['target']:g}x | {verdict} | "
                     f"{row['cpu_ratio']:.2f}x |")
    return "\n".join(lines), rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        root = Path(__file__).resolve().parent.parent
        def git(*argv: str) -> str:
            return subprocess.run(["git", *argv], cwd=root, check=False, capture_output=True,
                                  text=True).stdout.strip()

        info["commit"] = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "mailworker/smtp", "mailworker/logging.py")
        info["smtp_layer_uncommitted_changes"] = bool(dirty)
    except OSError:
        pass
    return info


def profile_batch(sink: SmtpSink, batch: int, n: int, size: int, top: int) -> str:
    """cProfile of the batch client at 0 ms, 1 recipient, reply log on."""
    data, rcpts = make_message(size), recipients(1)
    client = make_mw_batch(batch)
    client(sink.port, rcpts, data, n)  # warm
    prof = cProfile.Profile()
    prof.enable()
    client(sink.port, rcpts, data, n)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    # Time spent under the reply log: everything below ReplyLog.reply / structlog calls.
    logging_s = 0.0
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in \
            stats.stats.items():  # type: ignore[attr-defined]
        if filename.endswith("replylog.py") and func == "reply":
            logging_s += ct
    out.write(f"\n=== cProfile: mw batch, 0 ms, 1 rcpt, {size // 1024} KB, reply log on ===\n"
              f"total {total:.3f} s for {n} messages; under ReplyLog.reply: {logging_s:.3f} s "
              f"({logging_s / total:.0%})\n\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (about 1 minute)")
    p.add_argument("--latencies", default="0,10", help="reply latencies in ms: 0 and/or 10")
    p.add_argument("--rcpts", default="1,5", help="recipient counts")
    p.add_argument("--sizes", default="2,100", help="message sizes in KB")
    p.add_argument("--batch", type=int, default=100, help="envelopes per send_many() call")
    p.add_argument("--rounds", type=int, default=5, help="rounds per client at 0 ms (median)")
    p.add_argument("--n0", type=int, default=400, help="messages per client and round at 0 ms")
    p.add_argument("--n10-new", type=int, default=120, help="messages, smtplib new, 10 ms")
    p.add_argument("--n10-reused", type=int, default=160, help="messages, smtplib reused, 10 ms")
    p.add_argument("--n10-send", type=int, default=250, help="messages, mw send(), 10 ms")
    p.add_argument("--n10-batch", type=int, default=500, help="messages, mw batch, 10 ms")
    p.add_argument("--n10-bdat", type=int, default=2000, help="messages, mw bdat, 10 ms")
    p.add_argument("--no-diagnostic", dest="diagnostic", action="store_false",
                   help=f"skip the {DIAG!r} client at 0 ms")
    p.add_argument("--profile", action="store_true",
                   help="cProfile mailworker's batch client at 0 ms, 1 rcpt, 2 KB and 100 KB")
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--no-replylog", dest="replylog", action="store_false",
                   help="skip the reply log's microseconds per event (bench_replylog.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.n0 = 2, 200
        args.n10_new, args.n10_reused, args.n10_send, args.n10_batch = 30, 40, 60, 200
        args.n10_bdat = 500
    latencies = [int(x) for x in args.latencies.split(",")]
    rcpt_counts = [int(x) for x in args.rcpts.split(",")]
    sizes = [int(x) * 1024 for x in args.sizes.split(",")]

    info = machine()
    info["loadavg_start"] = os.getloadavg()
    print(f"bench_smtp: {info}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    log = LogFile(tmp / "replies.jsonl")
    sinks: dict[int, SmtpSink | LatencySink] = {}
    runs: list[Run] = []
    started = time.perf_counter()
    profile = ""
    try:
        for latency in latencies:
            sink = sinks[latency] = (SmtpSink(tmp / "smtp-sink.log") if latency == 0 else
                                     LatencySink(latency / 1000.0, tmp / "latency-sink.log",
                                                 chunking=True))
            print(f"sink for {latency} ms: pid {sink.pid}, port {sink.port}", flush=True)
            for n_rcpts in rcpt_counts:
                for size in sizes:
                    runs += run_case(args, sink, log, latency, n_rcpts, size)
        if args.profile:
            sink0 = sinks.get(0)
            if sink0 is None:
                sink0 = sinks[0] = SmtpSink(tmp / "smtp-sink.log")
            assert isinstance(sink0, SmtpSink)
            profile = "".join(profile_batch(sink0, args.batch, n, size, 25)
                              for size, n in ((2048, 2000), (102400, 500)))
    except BaseException:
        print(f"bench_smtp: failed; sink logs kept in {tmp}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for sink in sinks.values():
            sink.stop()
        log.stream.close()
    elapsed = time.perf_counter() - started
    info["loadavg_end"] = os.getloadavg()

    ratio_text, ratio_rows = ratios(runs)
    print(f"\nmeasured in {elapsed:.0f} s; batch = {args.batch} envelopes per send_many(); "
          "mailworker with the reply log ON (JSON to a file), smtplib logs nothing; "
          f"load average {info['loadavg_start'][0]:.2f} at start, "
          f"{info['loadavg_end'][0]:.2f} at end (nproc {info['nproc']})\n")
    print(table(runs))
    rtts = rtt_table(runs)
    if rtts:
        print("\nround trips per message at 10 ms (1 / (msg/s x 10 ms)):\n")
        print(rtts)
    print("\nratios (msg/s, mailworker / baseline); PASS/MISS for the batch client, "
          "send() rows for information:\n")
    print(ratio_text)
    for r in runs:
        if r.client == "mw bdat" and r.rcpts == 1 and r.size == 2048:
            verdict = "PASS" if r.rate >= BDAT_TARGET else "MISS"
            print(f"\nmw bdat, {case_label(r)}: {r.rate:,.0f} msg/s on one connection "
                  f"(target >= {BDAT_TARGET:g}): {verdict}")
    lines_per_msg = {f"{r.client} | {case_label(r)}": round(r.log_lines / (r.n * len(r.rounds)), 2)
                     for r in runs if r.client.startswith("mw")}
    print("\nreply-log lines per timed message (mailworker; the count includes the warm-up "
          "messages, connection set-up and QUIT, hence a little over 4 or 8):")
    for key, value in lines_per_msg.items():
        print(f"  {key}: {value}")
    replylog: dict[str, Any] = {}
    if args.replylog:  # after the runs: it reconfigures structlog
        import bench_replylog

        replylog = bench_replylog.measure(5_000 if args.quick else 20_000, 5)
        print("\nreply log (benchmarks/bench_replylog.py):\n" + bench_replylog.report(replylog))
    if profile:
        print("\n" + profile)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: str(v) for k, v in vars(args).items()},
            "elapsed_s": elapsed,
            "runs": [{**asdict(r), "rate": r.rate, "cpu_ms_per_1000": r.cpu_ms_per_1000,
                      "sys_ms_per_1000": r.sys_ms_per_1000,
                      "sink_cpu_ms_per_1000": r.sink_cpu_s / (r.n * len(r.rounds)) * 1e6}
                     for r in runs],
            "ratios": ratio_rows, "log_lines_per_msg": lines_per_msg,
            "replylog_us_per_event": replylog}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
