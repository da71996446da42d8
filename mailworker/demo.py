"""``mailworker demo``: watch mail flow in one process, with nothing else installed.

It runs the real code paths: ``send_many`` writes records to a store, a Celery worker
(in a thread, on kombu's in-memory broker) claims and delivers them through the SMTP
pool to ``mailworker.testing``'s server, the scheduler retries a greylisted recipient,
and a refused recipient ends in the dead-letter store. The store is fakeredis (with Lua,
so the same atomic scripts run); with ``MAILWORKER_REDIS_URL`` set, the demo uses that
Redis for both the store and the broker instead.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections import Counter
from typing import Any

__all__ = ["run_demo"]

GREYLISTED = "greylisted@example.org"
REFUSED = "nobody@example.org"


def demo_batch(messages: int) -> list[dict[str, Any]]:
    """The *messages* messages the demo queues: plain ones, then the showcase (see above)."""
    showcase: list[dict[str, Any]] = []
    if messages >= 2:
        showcase.append({"to": GREYLISTED, "subject": "Greylisted once", "text": "4xx then ok"})
    if messages >= 3:
        showcase.append({"to": REFUSED, "subject": "Refused", "text": "5xx: dead letter"})
    return [{"to": f"user{i}@example.com", "subject": f"Welcome #{i}",
             "text": f"Hello user {i}!\n", "metadata": {"n": i}}
            for i in range(messages - len(showcase))] + showcase


def _quick_memory_transport() -> type:
    """kombu's in-memory transport, answering the worker's idle poll within 0.1 s.

    Celery's blocking consumer loop (used for transports without an event loop, like
    this one) waits up to 2 s for a message before it looks at the shutdown flag, and
    then once more: stopping the demo's worker took about 4 s of nothing. With short
    polls it stops at once; messages still arrive as soon as they are published.
    """
    from kombu.transport.memory import Transport

    class QuickMemoryTransport(Transport):  # type: ignore[misc]  # kombu is untyped here
        def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
            return super().drain_events(connection, timeout=min(timeout or 0.1, 0.1))

    return QuickMemoryTransport


def _embedded_redis() -> Any:
    try:
        import fakeredis
    except ImportError:
        from mailworker.cli.output import CLIError

        raise CLIError("the embedded demo needs fakeredis",
                       "pip install 'mailworker[demo]', or set MAILWORKER_REDIS_URL to use a "
                       "real Redis", 1) from None
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def run_demo(messages: int = 200, out: Any = None, timeout: float = 60.0) -> int:
    """Run the demo; print progress, a summary table and reply-log lines. 0 on success."""
    import structlog
    from celery.contrib.testing.worker import start_worker

    from mailworker import api
    from mailworker.celery_app import app
    from mailworker.cli.output import CLIError
    from mailworker.config import Settings
    from mailworker.runtime import configure
    from mailworker.scheduler import Scheduler
    from mailworker.testing import Fault, SMTPTestServer

    if messages < 1:
        raise CLIError(f"-n {messages}: the demo needs at least 1 message", "try -n 20", 2)
    out = out or sys.stdout
    real_redis = os.environ.get("MAILWORKER_REDIS_URL")
    log_buffer = io.StringIO()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(log_buffer),
        cache_logger_on_first_use=False,
    )

    server = SMTPTestServer(hostname="demo.mx")
    server.start()
    server.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted, please try again",
                                 match=GREYLISTED, times=1))
    server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user here", match=REFUSED))
    from mailworker.relay import parse_relay

    relay = parse_relay("default", server.dsn())
    prefix = f"demo{int(time.time())}"
    settings = Settings(
        redis_url=real_redis or "redis://embedded",
        broker_url=real_redis or "memory://",
        key_prefix=prefix,
        relays={"default": relay},
        default_sender="demo@example.com",
        tick_interval=0.2,
        stuck_after=10.0,
        retry={"backoff": {"initial": "1s", "factor": 1, "maximum": "1s", "jitter": 0}},
    )
    rt = configure(settings, redis_client=None if real_redis else _embedded_redis())
    if not real_redis:
        # kombu's in-memory transport polls; its 1 s default would dominate a short demo.
        app.conf.update(broker_transport_options={"polling_interval": 0.02},
                        broker_transport=_quick_memory_transport())
    sched = Scheduler(rt.settings, rt.store)
    print(f"mailworker demo: {messages} messages -> embedded SMTP server "
          f"{server.host}:{server.port}", file=out)
    print(f"store: {'Redis at ' + real_redis if real_redis else 'embedded (fakeredis)'}; "
          f"broker: {'Redis' if real_redis else 'in-memory'}", file=out)
    started = time.perf_counter()
    rc = 0
    try:
        with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False,
                          queues=list(settings.queues), loglevel="ERROR", hostname="demo@localhost",
                          shutdown_timeout=30.0):
            sched.start_thread()
            batch = demo_batch(messages)
            t0 = time.perf_counter()
            ids = api.send_many(batch)
            enqueue_ms = (time.perf_counter() - t0) * 1000
            print(f"enqueued {len(ids)} messages in {enqueue_ms:.1f} ms", file=out)
            recs = _wait(rt.store, ids, out, timeout)
            sched.stop()
            rc = _summary(out, ids, recs, server, time.perf_counter() - started,
                          log_buffer.getvalue())
            print("stopping the worker...", file=out)
    finally:
        sched.stop()
        rt.pools.close_all()
        server.stop()
        if real_redis:  # leave the user's Redis as we found it
            for key in rt.redis.scan_iter(match=rt.store.keys.everything(), count=1000):
                rt.redis.delete(key)
    return rc


def _summary(out: Any, ids: list[str], recs: list[Any], server: Any, elapsed: float,
             log_text: str) -> int:
    from mailworker.cli.output import table

    states = Counter(r.state.value for r in recs if r is not None)
    grey = next((r for r in recs if r and r.recipients[0].address == GREYLISTED), None)
    dead = next((r for r in recs if r and r.recipients[0].address == REFUSED), None)
    rows: list[tuple[str, Any]] = [
        ("messages", len(ids)),
        ("delivered", states.get("delivered", 0)),
        ("dead-lettered", states.get("dead", 0)),
        ("not final", len(ids) - states.get("delivered", 0) - states.get("dead", 0)),
    ]
    if grey is not None:
        rows.append(("greylisted message", f"{grey.state.value} after {len(grey.history)} "
                                           "attempts"))
    if dead is not None:
        rows.append(("refused message", f"{dead.state.value}: {dead.dead_reason}"))
    rows += [("SMTP connections opened", server.connections_opened),
             ("time", f"{elapsed:.2f} s")]
    print("\nsummary", file=out)
    print(table(["", "value"], rows), file=out)
    print("\nreply log (a few of the smtp.reply events):", file=out)
    for line in _sample_replies(log_text):
        print("  " + line, file=out)
    print("\nnext: 'make test' runs the suite; README.md shows how to run real workers.",
          file=out)
    expected_dead = 1 if dead is not None else 0
    ok = (states.get("delivered", 0) == len(ids) - expected_dead
          and states.get("dead", 0) == expected_dead
          and (grey is None or (grey.state.value == "delivered" and len(grey.history) == 2)))
    return 0 if ok else 1


def _wait(store: Any, ids: list[str], out: Any, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    last = ""
    tty = bool(getattr(out, "isatty", lambda: False)())
    next_print = 0.0
    while True:
        recs = store.get_many(ids)
        counts = Counter(r.state.value for r in recs if r is not None)
        final = counts.get("delivered", 0) + counts.get("dead", 0)
        line = (f"  delivered {counts.get('delivered', 0):>5}  deferred "
                f"{counts.get('deferred', 0):>3}  dead {counts.get('dead', 0):>3}  "
                f"of {len(ids)}")
        done = final == len(ids) or time.monotonic() > deadline
        if tty and line != last:
            out.write("\r" + line)
            out.flush()
        elif not tty and (done or time.monotonic() >= next_print):
            out.write(line + "\n")
            next_print = time.monotonic() + 1.0
        last = line
        if done:
            if tty:
                out.write("\n")
            return list(recs)
        time.sleep(0.1)


def _sample_replies(text: str, n: int = 6) -> list[str]:
    events = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "smtp.reply":
            keep = {k: ev[k] for k in ("command", "code", "enhanced_code", "text", "latency_ms",
                                       "message_id", "recipient") if ev.get(k) is not None}
            events.append(json.dumps(keep))
    picked = events[:3] + [e for e in events if '"code": 451' in e or '"code": 550' in e][:2]
    return (picked + events[-1:])[:n]
