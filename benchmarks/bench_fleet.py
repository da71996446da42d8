"""Provider limits, side by side in one run: real `mailworker worker` processes against the
test server's provider personas.

Scenarios (each: a fresh key prefix and test server, 2 worker processes x 4 threads,
``--n`` messages sent at once, timed from the first send to the last message final):

* ``cap 2, nothing configured``   the relay greets a 3rd concurrent connection with
  ``421 4.7.0 too many connections``; the DSN says nothing of it (the adaptive window).
* ``cap 2, fleet_max_connections=2``  the same relay, the limit configured.
* ``rate 100/s, nothing configured``  beyond 100 msg/s MAIL gets ``451 4.7.1``; the fleet
  learns the rate. "pace once adapted" is the rate from the first quarter of the
  messages to the last.
* ``no limits, fleet limits off`` / ``on``  a relay with no persona, without and with
  ``fleet_max_connections=4&fleet_rate=100000`` configured: connections opened per
  1,000 messages (target: no more with fleet limits on).

For each: seconds, msg/s, connections the server accepted, 421s from the cap (and those
after the first second), throttle replies, attempts spent, pauses seen, dead letters.

Each scenario runs ``--rounds`` times (default 3), the scenarios taking turns in
alternating order; the table shows medians (a shared machine's noise is +-30% per run).

Run: ``.venv/bin/python benchmarks/bench_fleet.py`` (about 3 minutes on 2 cores; needs
Redis on ``--redis``, default redis://127.0.0.1:6379/0; keys under a fresh prefix,
deleted afterwards). ``--n`` messages per scenario (default 1,000), ``--json PATH``.
Results: docs/benchmarks.md, "Provider limits". A measurement, not a test: exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mailworker  # noqa: E402
from mailworker.config import load_settings  # noqa: E402
from mailworker.runtime import configure, reset_runtime  # noqa: E402
from mailworker.testing import Persona, SMTPTestServer  # noqa: E402
from mailworker.testing.polling import stop_group, wait_until  # noqa: E402


def _env(redis_url: str, dsn: str, tmp: Path) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    cfg = tmp / f"bench-{tag}.toml"
    cfg.write_text(f'default_queue = "bench{tag}"\n[queues.bench{tag}]\nlifetime = "1h"\n')
    env.update({"MAILWORKER_REDIS_URL": redis_url, "MAILWORKER_KEY_PREFIX": f"bf{tag}",
                "MAILWORKER_TICK_INTERVAL": "0.2", "MAILWORKER_LOG_FORMAT": "json",
                "MAILWORKER_LOG_LEVEL": "WARNING",
                "MAILWORKER_DEFAULT_SENDER": "app@example.com", "MAILWORKER_CONFIG": str(cfg),
                "MAILWORKER_RELAY_DEFAULT": dsn, "PYTHONPATH": str(ROOT),
                "MW_QUEUE": f"bench{tag}"})
    return env


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailworker.cli.main", "worker", "-Q", env["MW_QUEUE"],
         "-c", "4"], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
        start_new_session=True)
    wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 60,
               message="a worker to start")
    if proc.poll() is not None:
        raise SystemExit(f"worker did not start: {log.read_text()[-2000:]}")
    return proc


def run(name: str, persona: Persona | None, options: str, n: int, redis_url: str,
        tmp: Path) -> dict[str, Any]:
    server = SMTPTestServer(persona=persona)
    server.start()
    env = _env(redis_url, server.dsn() + (("?" + options) if options else ""), tmp)
    rt = configure(load_settings(environ=env))
    workers = [_start_worker(env, tmp / f"{env['MW_QUEUE']}-{i}.log") for i in range(2)]
    try:
        store = rt.store
        t0 = time.monotonic()
        ids: list[str] = []
        for i in range(0, n, 50):
            ids += mailworker.send_many([{"to": f"u{j}@example.com", "text": "x"}
                                         for j in range(i, min(n, i + 50))])
        pauses: set[str] = set()
        arrivals: list[tuple[float, int]] = []
        deadline = t0 + 600
        while True:
            paused = store.relay_pause("default")
            if paused:
                pauses.add(paused[0])
            arrivals.append((time.monotonic(), len(server.messages)))
            counts = store.counts()
            if counts["in_flight"] + counts["deferred"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        took = time.monotonic() - t0
        recs = [r for r in store.get_many(ids) if r is not None]
        start = next((t for t, k in arrivals if k >= n // 4), t0)
        end = next((t for t, k in arrivals if k >= n), time.monotonic())
        late_421 = sum(1 for t, kind in server.refusal_events
                       if kind == "connection_cap" and t > t0 + 1)
        return {
            "scenario": name, "messages": n, "seconds": round(took, 2),
            "msg_per_s": round(n / took, 1),
            "pace_once_adapted": round((n - n // 4) / max(1e-9, end - start), 1),
            "connections": server.connections_opened,
            "connections_per_1000": round(server.connections_opened * 1000 / n, 1),
            "refused_421": server.refusals["connection_cap"], "refused_421_after_1s": late_421,
            "throttle_replies": server.refusals["rate_cap"],
            "delivered": sum(r.state.value == "delivered" for r in recs),
            "dead": sum(r.state.value == "dead" for r in recs),
            "attempts": sum(r.attempts for r in recs),
            "max_copies": max(server.deliveries().values(), default=0),
            "paused": sorted(pauses),
        }
    finally:
        for w in workers:
            stop_group(w)
        keys = list(rt.redis.scan_iter(match=env["MAILWORKER_KEY_PREFIX"] + ":*"))
        if keys:
            rt.redis.delete(*keys)
        rt.redis.delete(env["MW_QUEUE"])
        server.stop()
        rt.pools.close_all()
        reset_runtime()


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians of a scenario's rounds (pauses: every one seen)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, int | float):
            out[key] = statistics.median(r[key] for r in runs)
    out["paused"] = sorted({p for r in runs for p in r["paused"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    scenarios: list[tuple[str, Persona | None, str]] = [
        ("cap 2, nothing configured", Persona(max_connections=2), ""),
        ("cap 2, fleet_max_connections=2", Persona(max_connections=2),
         "fleet_max_connections=2"),
        ("rate 100/s, nothing configured", Persona(rate=100), ""),
        ("no limits, fleet limits off", None, ""),
        ("no limits, fleet limits on", None, "fleet_max_connections=4&fleet_rate=100000"),
    ]
    rounds: list[list[dict[str, Any]]] = [[] for _ in scenarios]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):  # scenarios take turns, in alternating order
            order = list(enumerate(scenarios))
            for k, (name, persona, options) in (order if i % 2 == 0 else order[::-1]):
                rounds[k].append(run(name, persona, options, args.n, args.redis, Path(tmp)))
    results = [_median(runs) for runs in rounds]
    cols = [("scenario", 31), ("seconds", 8), ("msg_per_s", 10), ("pace_once_adapted", 8),
            ("connections", 6), ("connections_per_1000", 8), ("refused_421", 5),
            ("refused_421_after_1s", 6), ("throttle_replies", 8), ("attempts", 8),
            ("dead", 5), ("max_copies", 6), ("paused", 7)]
    heads = ["scenario", "seconds", "msg/s", "pace", "conns", "conn/1k", "421s", "421>1s",
             "throttle", "attempts", "dead", "copies", "paused"]
    print(f"{args.n} messages per scenario, medians of {args.rounds} rounds, "
          "2 workers x 4 threads, Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print("  ".join(h.ljust(w) for h, (_, w) in zip(heads, cols, strict=True)))
    for r in results:
        print("  ".join(str(len(r[k]) if k == "paused" else r[k]).ljust(w) for k, w in cols))
    cap, capped = results[0], results[1]
    print(f"\ncap 2 with nothing configured: {cap['msg_per_s'] / capped['msg_per_s']:.0%} of "
          f"the throughput with fleet_max_connections=2 (target >= 80%)")
    print(f"rate cap 100/s: {results[2]['pace_once_adapted'] / 100:.0%} of 100/s once adapted "
          "(target >= 80%)")
    print(f"connections per 1,000 messages: fleet limits on "
          f"{results[4]['connections_per_1000']}, off {results[3]['connections_per_1000']}")
    if args.json:
        args.json.write_text(json.dumps({"medians": results, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
