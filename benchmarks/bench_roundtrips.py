"""Redis round trips, commands and Redis CPU per message on the worker's hot path, before
and after, side by side in one run.

Each side runs in a process of its own with its own ``redis-server`` (persistence off)
and Postfix's ``smtp-sink`` on free ports of 127.0.0.1: N messages of 2 KB are queued
through the real API, then delivered by the real ``Deliverer`` in this process, in
batches of ``batch_size`` (50, as the wake-ups group them), exactly as a worker's task
runs them (claim, relay pause and fleet rate, "sending" marks, SMTP, commits, fleet
feedback). Counted over the delivery only:

* **round trips**: requests written to Redis (a pipeline is one), counted in redis-py's
  ``Connection.send_packed_command``, per message;
* **commands** per message, from ``INFO commandstats`` (``EVALSHA`` is one command however
  much its script does), and the script calls among them;
* **Redis CPU** per message (``used_cpu_sys + used_cpu_user`` of ``INFO cpu``: the
  Redis process's own CPU; no broker shares it here, unlike in bench_queue.py);
* the in-process worker's wall time and CPU per message (``time.process_time``: the whole
  pass, SMTP included, so it also moves with changes outside the store).

The heartbeat's renewals (every ``lease_seconds / 3``) run too, as in a worker; at this
speed a batch is done long before one is due.

Before: this file run against the code of a commit (``--before``, default the last
commit before issue 12's work) from a ``git worktree``; after: the working tree.

Run: ``.venv/bin/python benchmarks/bench_roundtrips.py`` (N=2,000, 3 alternating rounds,
the median round by Redis CPU; about a minute), ``-n``, ``--rounds``, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "e707059"


def run_side(n: int) -> dict[str, Any]:
    import redis
    import redis.connection

    import mailworker
    from mailworker import api
    from mailworker.delivery import Deliverer
    from mailworker.smtp import PoolManager

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_memory import message, private_stack

    sent = [0]
    original = redis.connection.Connection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)  # type: ignore[no-untyped-call]

    with private_stack() as (_client, port, settings, rt, _woken):
        rng = random.Random(5)
        ids: list[str] = []
        for start in range(0, n, 500):
            ids += api.send_many([message(rng, i, "2k")
                                  for i in range(start, min(n, start + 500))])
        deliverer = Deliverer(settings, rt.store, PoolManager())
        deliverer.run(ids[:settings.batch_size])  # warm: connection, scripts loaded
        ids = ids[settings.batch_size:]
        stats = redis.Redis(port=port)
        stats.config_resetstat()
        cpu0 = stats.info("cpu")
        redis.connection.Connection.send_packed_command = counting  # type: ignore[method-assign]
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            for start in range(0, len(ids), settings.batch_size):
                deliverer.run(ids[start:start + settings.batch_size])
            wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            redis.connection.Connection.send_packed_command = original  # type: ignore[method-assign]
        cpu1 = stats.info("cpu")
        cmds = {k.removeprefix("cmdstat_"): v["calls"]
                for k, v in stats.info("commandstats").items()}
        for k in ("config|resetstat", "info"):  # our own reads
            cmds.pop(k, None)
        states = {r.state.value if r else None for r in rt.store.get_many(ids[-50:])}
    m = len(ids)
    cpu = sum(cpu1[k] - cpu0[k] for k in ("used_cpu_sys", "used_cpu_user"))
    return {"code": str(Path(mailworker.__file__).parent), "n": m,
            "round_trips": sent[0] / m, "commands": sum(cmds.values()) / m,
            "script_calls": (cmds.get("evalsha", 0) + cmds.get("eval", 0)) / m,
            "by_command": {k: v / m for k, v in sorted(cmds.items())},
            "redis_cpu_ms": cpu * 1000 / m, "wall_ms": wall * 1000 / m,
            "client_cpu_ms": client_cpu * 1000 / m,
            "delivered": states == {"delivered"}}


def _side(tree: Path, n: int) -> dict[str, Any]:
    here = Path(__file__).resolve()
    env = {**os.environ, "PYTHONPATH": str(tree), "MAILWORKER_LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, str(here), "--side", "-n", str(n)], env=env,
                          cwd=tree, stdout=subprocess.PIPE, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose Redis CPU per message is the median (counts are the same in each)."""
    return sorted(runs, key=lambda r: float(r["redis_cpu_ms"]))[len(runs) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--before", default=BEFORE)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.side:
        from mailworker.logging import configure_logging

        with open(os.devnull, "w") as devnull:
            configure_logging(fmt="json", level="WARNING", stream=devnull)
            print(json.dumps(run_side(args.n)))
        return 0
    old = Path(tempfile.mkdtemp(prefix="bench-rt-")) / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                    args.before], check=True, capture_output=True)
    try:
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for _ in range(args.rounds):  # alternating, so drift hits both
            runs["before"].append(_side(old, args.n))
            runs["after"].append(_side(ROOT, args.n))
        sides = {name: _median(rs) for name, rs in runs.items()}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       check=False, capture_output=True)
        shutil.rmtree(old.parent, ignore_errors=True)
    b, a = sides["before"], sides["after"]
    print(f"Worker hot path, per message ({a['n']:,} messages of 2 KB, batches of 50; "
          f"before = {args.before}, after = working tree)")
    print(f"{'':24} {'before':>9} {'after':>9} {'after/before':>13}")
    for key, label in (("round_trips", "Redis round trips"), ("commands", "Redis commands"),
                       ("script_calls", "  of which script calls"),
                       ("redis_cpu_ms", "Redis CPU ms"), ("wall_ms", "wall ms (in-process)"),
                       ("client_cpu_ms", "worker CPU ms (all)")):
        print(f"{label:24} {b[key]:>9.3f} {a[key]:>9.3f} {a[key] / b[key]:>13.2f}")
    names = sorted(set(b["by_command"]) | set(a["by_command"]))
    print("commands per message: " + ", ".join(
        f"{k} {b['by_command'].get(k, 0):.2f} -> {a['by_command'].get(k, 0):.2f}"
        for k in names))
    if not (a["delivered"] and b["delivered"]):
        print("WARNING: not every message was delivered", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"before": args.before, **sides}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
