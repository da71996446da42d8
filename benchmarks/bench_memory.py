"""Redis memory per queued message and per delivered record kept for ``retention``,
before and after, side by side in one run.

What it measures (each side in a process of its own, with its own ``redis-server`` on a
free port of 127.0.0.1, persistence off; everything it starts it stops):

* **queued**: ``INFO memory`` ``used_memory`` growth per message over N messages queued
  through the real API (``mailworker.api.prepare_many`` + ``enqueue_prepared``, which is
  what ``send_many`` is; wake-ups go to a list, not to a broker that would share the
  Redis), in batches of 500, for a 2 KB message (text of common words, varied per
  message) and a 100 KB one (the same text plus a 72 KB attachment of random bytes,
  base64: no compressor is flattered). 100,000 of the 2 KB messages; 10,000 of the
  100 KB ones by default, because 100,000 would be 10 GB of Redis on a machine that has
  less (the growth per message is flat well before 10,000).
* **delivered**: per record kept after delivery, for ``retention``: the messages are
  queued, then delivered by the real ``Deliverer`` (claim, mark, SMTP to Postfix's
  ``smtp-sink``, commit: the worker's code, in this process), then the memory is read.

For each it prints bytes per message, the MIME size, and the **overhead**: Redis bytes
per message beyond the MIME size (below zero when the body is stored compressed).
Client connections are closed before each reading (a query buffer is not a message).

Before and after: the "before" side runs this same file against the code of a commit
(``--before``, default the last commit before issue 12's work), checked out with
``git worktree`` in a temporary directory; "after" runs the working tree. Both rows come
from one run, so the machine's state hits both alike (memory is not timing: the figures
repeat to within a few bytes).

Run: ``.venv/bin/python benchmarks/bench_memory.py`` (about 3 minutes), ``--quick``
(20,000 / 2,000 / 5,000: under a minute), ``--json PATH``; ``--side`` runs one side
(the working tree's code, or the one on PYTHONPATH) and prints its JSON.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The last commit before issue 12's work (compare against it with --before).
BEFORE = "e707059"

_WORDS = (
    "the of and to a in is you that it for on are as with your at be this have from or "
    "one had by but not what all were we when can said there use an each which do how "
    "their if will up other about out many then them these so some would make like into "
    "time has look two more go see number no way could people than first been call who "
    "its now find long down day did get come made may part order parcel shipped tracking "
    "delivery account receipt payment thank invoice customer service question return "
    "address update please contact team week today tomorrow package store item items "
    "price total shipping free size colour color available stock new offer help reply"
)
WORDS = _WORDS.split()


def _text(rng: random.Random, n: int) -> str:
    """About *n* characters of plain text in sentences and paragraphs."""
    out: list[str] = []
    length = 0
    while length < n:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        sentence = sentence[0].upper() + sentence[1:] + ". "
        if rng.random() < 0.15:
            sentence += "\n\n"
        out.append(sentence)
        length += len(sentence)
    return "".join(out)[:n]


def message(rng: random.Random, i: int, kind: str) -> dict[str, Any]:
    """One realistic message: 2 KB of text, or that plus a 72 KB random attachment."""
    msg: dict[str, Any] = dict(
        to=f"customer{i}@example.org", sender="Example Shop <orders@shop.example.com>",
        subject=f"Your order {100000 + i} has shipped", text=_text(rng, 1720))
    if kind == "100k":
        msg["attachments"] = [(f"invoice-{i}.pdf", rng.randbytes(72 * 1024),
                               "application/pdf")]
    return msg


# -- one side ----------------------------------------------------------------------------

def _used(port: int) -> int:
    """used_memory, read on a fresh connection after closing every other one."""
    import redis

    time.sleep(0.3)  # let Redis's cron settle freed client buffers
    client = redis.Redis(port=port)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


@contextmanager
def private_stack() -> Iterator[tuple[Any, int, Any, Any, list[str]]]:
    """Its own redis-server (persistence off) and smtp-sink on free ports, and the
    mailworker runtime configured on them with wake-ups kept in a list (no broker shares
    the Redis): yields (client, port, settings, runtime, woken ids). Stops both."""
    import redis

    from mailworker import runtime
    from mailworker.config import Settings
    from mailworker.relay import parse_relay
    from mailworker.testing.polling import free_port

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _sinks import SmtpSink

    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tempfile.gettempdir()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sink = SmtpSink()
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        settings = Settings(default_sender="orders@shop.example.com",
                            relays={"default": parse_relay(
                                "default", f"smtp://127.0.0.1:{sink.port}")})
        woken: list[str] = []
        rt = runtime.configure(settings, redis_client=client,
                               publisher=lambda ids, _queue: woken.extend(ids))
        yield client, port, settings, rt, woken
    finally:
        sink.stop()
        server.terminate()
        server.wait(10)


def run_side(n2k: int, n100k: int, delivered: int, delivered_100k: int) -> dict[str, Any]:
    import mailworker
    from mailworker import api
    from mailworker.delivery import Deliverer
    from mailworker.smtp import PoolManager

    out: dict[str, Any] = {"code": str(Path(mailworker.__file__).parent)}
    with private_stack() as (client, port, settings, rt, woken):
        rng = random.Random(12)

        def queue(kind: str, n: int) -> tuple[list[str], int]:
            ids: list[str] = []
            mime = 0
            batch = 500 if kind == "2k" else 50
            for start in range(0, n, batch):
                items = api.prepare_many([message(rng, i, kind)
                                          for i in range(start, min(n, start + batch))])
                mime += sum(len(raw) for _rec, raw in items)
                ids += api.enqueue_prepared(items)
            client.connection_pool.disconnect()
            return ids, mime

        def stored_body(ids: list[str]) -> float:
            """Mean bytes of the body field as stored (raw, or zraw where compressed)."""
            pipe = client.pipeline(transaction=False)
            for mid in ids:
                pipe.hstrlen(rt.store.keys.record(mid), "raw")
                pipe.hstrlen(rt.store.keys.record(mid), "zraw")
            return float(sum(pipe.execute())) / len(ids)

        for kind, n in (("2k", n2k), ("100k", n100k)):
            client.flushall()
            client.connection_pool.disconnect()
            before = _used(port)
            ids, mime = queue(kind, n)
            used = _used(port) - before
            out[f"queued_{kind}"] = {"n": n, "bytes": used / n, "mime": mime / n,
                                     "overhead": (used - mime) / n,
                                     "stored_body": stored_body(ids[:500])}
            print(f"  queued {kind}: {used / n:,.0f} B/msg", file=sys.stderr, flush=True)

        pools = PoolManager()
        deliverer = Deliverer(settings, rt.store, pools)
        for kind, n in (("2k", delivered), ("100k", delivered_100k)):
            client.flushall()
            client.connection_pool.disconnect()
            before = _used(port)
            ids, mime = queue(kind, n)
            for start in range(0, n, 100):
                deliverer.run(ids[start:start + 100])
            states = [r.state.value if r else None for r in rt.store.get_many(ids[:50])]
            pools.close_all()
            client.connection_pool.disconnect()
            used = _used(port) - before
            out[f"delivered_{kind}"] = {"n": n, "bytes": used / n, "mime": mime / n,
                                        "overhead": (used - mime) / n,
                                        "all_delivered": states == ["delivered"] * len(states)}
            print(f"  delivered {kind}: {used / n:,.0f} B/msg", file=sys.stderr, flush=True)
        woken.clear()
    return out


# -- both sides --------------------------------------------------------------------------

def _side(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side",
           "--n2k", str(args.n2k), "--n100k", str(args.n100k),
           "--delivered", str(args.delivered), "--delivered-100k", str(args.delivered_100k)]
    env = {**os.environ, "PYTHONPATH": str(tree), "MAILWORKER_LOG_LEVEL": "WARNING"}
    done = subprocess.run(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE, help="commit to compare with (%(default)s)")
    p.add_argument("--n2k", type=int, default=100_000)
    p.add_argument("--n100k", type=int, default=10_000)
    p.add_argument("--delivered", type=int, default=20_000)
    p.add_argument("--delivered-100k", type=int, default=2_000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.quick:
        args.n2k, args.n100k, args.delivered, args.delivered_100k = 20_000, 2_000, 5_000, 1_000
    if args.side:
        from mailworker.logging import configure_logging

        with open(os.devnull, "w") as sink:
            configure_logging(fmt="json", level="WARNING", stream=sink)
            print(json.dumps(run_side(args.n2k, args.n100k, args.delivered,
                                      args.delivered_100k)))
        return 0

    old = Path(tempfile.mkdtemp(prefix="bench-memory-")) / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                    args.before], check=True, capture_output=True)
    try:
        print(f"before: {args.before} ({old}); after: the working tree ({ROOT})",
              file=sys.stderr)
        sides = {"before": _side(old, args), "after": _side(ROOT, args)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                       check=False, capture_output=True)
        shutil.rmtree(old.parent, ignore_errors=True)

    rows = [("queued_2k", "queued, 2 KB"), ("queued_100k", "queued, 100 KB"),
            ("delivered_2k", "delivered (kept), 2 KB"),
            ("delivered_100k", "delivered (kept), 100 KB")]
    print(f"Redis memory per message (used_memory growth; before = {args.before}, "
          "after = working tree)")
    print(f"{'':26} {'n':>7} {'MIME B':>8} | {'before B':>9} {'overhead':>9} | "
          f"{'after B':>9} {'overhead':>9} | {'after/before':>12}")
    for key, label in rows:
        b, a = sides["before"][key], sides["after"][key]
        print(f"{label:26} {a['n']:>7,} {a['mime']:>8,.0f} | {b['bytes']:>9,.0f} "
              f"{b['overhead']:>9,.0f} | {a['bytes']:>9,.0f} {a['overhead']:>9,.0f} | "
              f"{a['bytes'] / b['bytes']:>12.2f}")
    print("overhead = bytes per message beyond the MIME size. The body as stored (queued; "
          "compressed where that pays) and the bytes beyond it:")
    for key, label in rows[:2]:
        b, a = sides["before"][key], sides["after"][key]
        print(f"{label:26} before: body {b['stored_body']:>9,.0f}, beyond it "
              f"{b['bytes'] - b['stored_body']:>6,.0f} | after: body {a['stored_body']:>9,.0f}, "
              f"beyond it {a['bytes'] - a['stored_body']:>6,.0f}")
    if args.json:
        args.json.write_text(json.dumps({"before": args.before, **sides}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
