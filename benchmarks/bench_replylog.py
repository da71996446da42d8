"""The reply log's cost per ``smtp.reply`` event, old path against new, in one run.

Every SMTP reply is one ``smtp.reply`` event (4 per message with one recipient: MAIL,
RCPT, DATA and the dot), so on a worker that sends thousands of messages a second the
log's cost per event is a large share of its CPU. This measures microseconds per event
with the production configuration: ``configure_logging(fmt="json", stream=<file>)``,
structlog context variables bound as a delivery pass binds them (``task_id``, ``relay``),
replies as a one-recipient message gets them.

Paths, each timed over the same replies in alternating rounds (the table shows the best
round of each, the ratio the median of the per-round ratios):

* ``before``   the emit path as it was before the lean one (kept here, below: an event dict
  handed to the bound structlog logger, through the whole processor chain);
* ``now``      :meth:`mailworker.smtp.replylog.ReplyLog.reply` as it is;
* ``log off``  the same with INFO off (level WARNING): the metrics hook check only;
* ``no I/O``   ``now`` into a stream whose write and flush do nothing: the share of an
  event that is Python, not the write system call (a diagnostic).

Each run checks that ``before`` and ``now`` write the same JSON (timestamps aside).

Run: ``.venv/bin/python benchmarks/bench_replylog.py`` (a few seconds; ``-n`` events per
round, ``--rounds``). From another benchmark: ``measure(n) -> dict``
(``benchmarks/bench_smtp.py`` prints its ``now_us`` beside its table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mailworker.logging import configure_logging, redact_command  # noqa: E402
from mailworker.smtp.errors import enhanced_code_of  # noqa: E402
from mailworker.smtp.replylog import LOGGER_NAME, ReplyLog  # noqa: E402

# The replies of one message with one recipient (smtp-sink's texts), as the pipelined
# session logs them.
REPLIES: list[tuple[str, int, str, str | None]] = [
    ("MAIL FROM:<orders@shop.example.com>", 250, "2.1.0 Ok", None),
    ("RCPT TO:<user42@example.org>", 250, "2.1.5 Ok", "user42@example.org"),
    ("DATA", 354, "End data with <CR><LF>.<CR><LF>", None),
    ("<dot>", 250, "2.0.0 Ok: queued as 4XyZ1234", None),
]


class BeforeReplyLog:
    """The emit path before the lean one (commit e707059), kept as the baseline."""

    def __init__(self, relay: str, conn_id: str) -> None:
        self._log = structlog.get_logger(LOGGER_NAME).bind(relay=relay, conn_id=conn_id)

    def reply(self, command: str, code: int, text: str, started: float, now: float, *,
              message_id: str | None = None, recipient: str | None = None) -> None:
        if command[:4].upper() == "AUTH":
            command = redact_command(command)
        event: dict[str, Any] = {
            "command": command,
            "code": code,
            "enhanced_code": enhanced_code_of(text),
            "text": text,
            "latency_ms": round((now - started) * 1000.0, 3),
        }
        if message_id is not None:
            event["message_id"] = message_id
        if recipient is not None:
            event["recipient"] = recipient
        self._log.info("smtp.reply", **event)


def _round(emit: Callable[..., None], n: int) -> float:
    """Seconds per event over *n* events."""
    replies = REPLIES
    k = len(replies)
    started = time.time()
    t0 = time.perf_counter()
    for i in range(n):
        command, code, text, rcpt = replies[i % k]
        emit(command, code, text, started, started + 0.0004, message_id="m-0001",
             recipient=rcpt)
    return (time.perf_counter() - t0) / n


class _Discard:
    """A text stream that drops everything: no system call per event."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _lines(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        out = [json.loads(line) for line in f]
    for d in out:
        d.pop("timestamp", None)
    return out


def measure(n: int = 20_000, rounds: int = 5) -> dict[str, Any]:
    """Microseconds per ``smtp.reply`` event: before, now, and with INFO off.

    Leaves structlog configured as it found it only if the caller configured it with
    :func:`configure_logging` again; benchmarks call this on their own.
    """
    results: dict[str, list[float]] = {"before": [], "now": [], "off": [], "noio": []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-replylog-") as tmp:
        same = True
        with structlog.contextvars.bound_contextvars(task_id="6f1c0d2e-task", relay="default"):
            for r in range(rounds):
                order = ("before", "now") if r % 2 == 0 else ("now", "before")
                got: dict[str, float] = {}
                for name in order:
                    path = os.path.join(tmp, f"{name}-{r}.log")
                    with open(path, "w") as stream:
                        configure_logging(fmt="json", level="INFO", stream=stream)
                        log: Any = (BeforeReplyLog("default", "c0001") if name == "before"
                                    else ReplyLog("default", "c0001"))
                        got[name] = _round(log.reply, n)
                    results[name].append(got[name])
                ratios.append(got["before"] / got["now"])
                if r == 0:
                    same = (_lines(os.path.join(tmp, "before-0.log"))
                            == _lines(os.path.join(tmp, "now-0.log")))
                with open(os.devnull, "w") as stream:
                    configure_logging(fmt="json", level="WARNING", stream=stream)
                    results["off"].append(_round(ReplyLog("default", "c0001").reply, n))
                configure_logging(fmt="json", level="INFO", stream=_Discard())  # type: ignore[arg-type]
                results["noio"].append(_round(ReplyLog("default", "c0001").reply, n))
    structlog.reset_defaults()
    best = {k: min(v) * 1e6 for k, v in results.items()}
    return {"n": n, "rounds": rounds, "before_us": best["before"], "now_us": best["now"],
            "off_us": best["off"], "noio_us": best["noio"], "ratio": statistics.median(ratios),
            "same_output": same}


def report(m: dict[str, Any]) -> str:
    rows = [("before (structlog chain)", m["before_us"]), ("now", m["now_us"]),
            ("log off (INFO disabled)", m["off_us"]),
            ("now, no I/O (diagnostic)", m["noio_us"])]
    out = [f"smtp.reply events, JSON to a file, {m['n']:,} events x {m['rounds']} rounds "
           "(best round):"]
    out += [f"  {name:26} {us:6.2f} µs/event" for name, us in rows]
    out.append(f"  before / now: {m['ratio']:.2f}x (median of rounds); same JSON: "
               f"{'yes' if m['same_output'] else 'NO'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20_000, help="events per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    m = measure(args.n, args.rounds)
    print(report(m))
    if args.json:
        args.json.write_text(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
