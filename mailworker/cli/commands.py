"""Implementations of the ``mailworker`` subcommands (parsing lives in ``main``)."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import threading
import time
from typing import Any

import redis

from mailworker.cli import metrics_port
from mailworker.cli.output import CLIError, clean, print_json, say, table
from mailworker.config import ConfigError

__all__ = ["check", "classify", "demo", "dlq_list", "dlq_purge", "dlq_retry", "dlq_show",
           "scheduler", "send", "stats", "status", "worker"]


def classify(exc: BaseException) -> CLIError:
    """Turn any exception into a one-line CLIError with a hint and an exit code."""
    from mailworker.message import InvalidMessageError

    if isinstance(exc, CLIError):
        return exc
    if isinstance(exc, ConfigError):
        return CLIError(str(exc), "see config/README.md for every setting", 3)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        from mailworker.runtime import get_runtime

        try:
            url = get_runtime().settings.redis_url
        except Exception:
            url = "MAILWORKER_REDIS_URL"
        return CLIError(f"cannot reach Redis at {_safe_url(url)}: {exc}",
                        "start Redis or set MAILWORKER_REDIS_URL; nothing was changed", 4)
    if isinstance(exc, InvalidMessageError):
        return CLIError(str(exc), "fix the message; nothing was queued", 2)
    if isinstance(exc, (ValueError, TypeError)):
        return CLIError(str(exc), None, 2)
    return CLIError(f"{type(exc).__name__}: {exc}",
                    "run with MAILWORKER_DEBUG=1 for a traceback", 1)


def _safe_url(url: str) -> str:
    from mailworker.logging import redact_secrets

    return str(redact_secrets(None, "", {"u": url})["u"])


def _runtime() -> Any:
    from mailworker.runtime import get_runtime

    rt = get_runtime()
    rt.redis.ping()  # fail fast with exit code 4 instead of hanging in a command
    return rt


def worker(args: argparse.Namespace) -> int:
    from mailworker.cli.run_worker import run_worker, supervise

    rt = _runtime()
    queues = args.queues.split(",") if args.queues else list(rt.settings.queues)
    unknown = [q for q in queues if q not in rt.settings.queues]
    if unknown:
        raise CLIError(f"unknown queue(s): {', '.join(unknown)}",
                       f"known queues: {', '.join(rt.settings.queues)}", 3)
    if not rt.settings.relays and not args.allow_no_relay:
        # A worker without relays takes mail and can only defer it ("unknown relay"), for
        # minutes at a time, while looking healthy: refuse loudly instead.
        raise CLIError("no relay is configured, so this worker could deliver nothing",
                       "set MAILWORKER_RELAY_DEFAULT=smtp://host:25 (or [relays] in the config "
                       "file, or run it as 'flask mailworker worker' / 'manage.py mailworker "
                       "worker' to use the app's settings); --allow-no-relay starts it anyway", 3)
    stop_metrics = metrics_port.start(rt.settings, args.metrics_port)
    try:
        if not args.no_restart:
            from mailworker.logging import configure_logging

            configure_logging()
            # Re-run this very command line (console script, python -m, or Django's
            # manage.py) as the supervised child.
            return supervise([sys.executable, *sys.orig_argv[1:], "--no-restart"])
        return run_worker(queues=queues, concurrency=args.concurrency, pool=args.pool,
                          scheduler=not args.no_scheduler, loglevel=args.loglevel)
    finally:
        stop_metrics()


def scheduler(args: argparse.Namespace) -> int:
    from mailworker.logging import configure_logging
    from mailworker.scheduler import Scheduler

    configure_logging()
    rt = _runtime()
    sched = Scheduler(rt.settings, rt.store)
    running = threading.Event()
    stop_metrics = metrics_port.start(rt.settings, args.metrics_port, ready=running.is_set)

    def _stop(_signum: int, _frame: object) -> None:
        sched.stop()  # finish the current tick, then return: a clean exit on SIGTERM

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    running.set()
    try:
        sched.run()
    finally:
        stop_metrics()
    return 0


def send(args: argparse.Namespace) -> int:
    import mailworker

    _runtime()
    text = sys.stdin.read() if args.text == "-" else args.text
    mid = mailworker.send(sender=args.sender, to=args.to, cc=args.cc, bcc=args.bcc,
                          subject=args.subject, text=text, html=args.html, relay=args.relay,
                          queue=args.queue, idempotency_key=args.idempotency_key)
    if args.json:
        print_json({"id": mid})
    else:
        say(mid)
    return 0


def _ts(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _last_word(r: Any) -> str:
    """A recipient's last reply, or why it waits when no server has answered for it."""
    if r.reply and r.reply.text:
        return str(r.reply.text)
    return str(r.reason or "")


def _print_record(rec: Any, history: bool) -> None:
    say(f"message  {rec.id}")
    say(f"state    {rec.state.value}{'  (possible duplicate)' if rec.possible_duplicate else ''}")
    # attempts_made: what each recipient's attempts also count (record.attempts numbers
    # only failures, for the backoff, and would say 0 for mail delivered at once).
    say(f"relay    {rec.relay}   queue {rec.queue}   attempts {rec.attempts_made}")
    say(f"created  {_ts(rec.created_at)}   expires {_ts(rec.expires_at)}   "
        f"next {_ts(rec.next_attempt_at)}")
    reason = rec.reason()
    if reason:
        # Why it died, or why it waits (relay paused, unknown relay, a 4xx...).
        label = "reason " if rec.state.final else "waiting"
        say(f"{label}  {clean(reason, newlines=False)}")
    rows = [(r.address, r.state.value, r.reply.code if r.reply else "",
             r.reply.enhanced_code if r.reply else "", _last_word(r)[:60],
             r.attempts) for r in rec.recipients]
    say(table(["recipient", "state", "code", "enhanced", "last reply", "attempts"], rows))
    if len(rec.parts) > 1:
        from mailworker.runtime import get_runtime

        parts = [p for p in get_runtime().store.get_many(rec.parts) if p is not None]
        say(f"\nsplit by routing rules into {len(rec.parts)} parts, one per relay")
        say(table(["recipient", "relay", "state", "part"],
                  [(r.address, p.relay, r.state.value, p.id + (" (this)" if p.id == rec.id
                                                              else ""))
                   for p in parts for r in p.recipients]))
    if history:
        say("\nhistory")
        hrows = [(a.number, _ts(a.started_at), a.outcome, a.relay,
                  "; ".join(f"{x.get('recipient') or '*'} {x.get('code')} "
                            f"{str(x.get('text', ''))[:40]}" for x in a.replies)[:100]
                  or (a.error or {}).get("text", ""))
                 for a in rec.history]
        say(table(["#", "at", "outcome", "relay", "replies"], hrows))


def status(args: argparse.Namespace) -> int:
    rt = _runtime()
    rec = rt.store.get(args.id)
    if rec is None:
        raise CLIError(f"no message with id {args.id!r}",
                       "ids come from send() or 'mailworker send'; mail sent inside a "
                       "database transaction that rolled back was never queued; records "
                       "expire after retention", 1)
    if args.json:
        print_json(rec.summary())
    else:
        _print_record(rec, history=False)
    return 0


def _filter(args: argparse.Namespace) -> Any:
    from mailworker.backoff import parse_duration
    from mailworker.dlq import DeadLetterFilter

    try:
        older = parse_duration(args.older_than) if args.older_than else None
        newer = parse_duration(args.newer_than) if args.newer_than else None
    except ValueError as exc:
        raise CLIError(str(exc), "durations look like 90s, 15m, 24h, 7d", 2) from None
    return DeadLetterFilter(relay=args.relay, code=args.code, exception=args.exception,
                            domain=args.domain, older_than=older, newer_than=newer,
                            reason=args.reason)


def _has_filter(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) for k in ("relay", "code", "exception", "domain",
                                          "older_than", "newer_than", "reason"))


def dlq_list(args: argparse.Namespace) -> int:
    from mailworker.dlq import list_dead

    _runtime()
    recs = list_dead(_filter(args))
    if args.json:
        print_json([r.summary() for r in recs])
        return 0
    rows = [(r.id, _ts(r.dead_at), r.relay, r.sender,
             ",".join(x.address for x in r.recipients if x.state.value == "failed")[:40],
             (r.dead_reason or "")[:60]) for r in recs]
    say(table(["id", "dead since", "relay", "sender", "failed recipients", "reason"], rows))
    say(f"{len(recs)} dead letter(s)")
    return 0


#: How much of an unreadable record's stored document and headers ``dlq show`` prints.
_SHOW_DOC_CHARS = 4000
_SHOW_HEADER_LINES = 30


def dlq_show(args: argparse.Namespace) -> int:
    rt = _runtime()
    rec = rt.store.get(args.id)
    if rec is None:
        raise CLIError(f"no message with id {args.id!r}", "list dead letters with "
                       "'mailworker dlq list'", 1)
    try:
        raw = rt.store.raw(args.id)
    except redis.ResponseError:  # the key is not a record hash (the reason says so)
        raw = None
    # A record that could not be read comes back as a stand-in with no recipients (a real
    # one always has some): show what is stored, so the operator can tell whom it was
    # for and fix or purge it.
    document = rt.store.document(args.id) if not rec.recipients else None
    if args.json:
        from dataclasses import asdict

        print_json({**asdict(rec), "raw_size": len(raw) if raw is not None else None,
                    **({"stored_document": document} if document is not None else {})})
    else:
        _print_record(rec, history=True)
        if not rec.recipients:
            _print_stored(document, raw)
    if getattr(args, "raw", None):
        _write_raw(args.raw, raw)
    return 0


def _print_stored(document: str | None, raw: bytes | None) -> None:
    """The stored document and the message's headers of a record that could not be read."""
    say("\nstored document (the record could not be read: fix it and 'mailworker dlq retry' "
        "it, or purge it)")
    if document is None:
        say("  (none)")
    else:
        cut = f" ... ({len(document):,} chars)" if len(document) > _SHOW_DOC_CHARS else ""
        say("  " + clean(document[:_SHOW_DOC_CHARS], newlines=False) + cut)
    if raw is None:
        say("\nmessage bytes: none stored")
        return
    say(f"\nmessage: {len(raw):,} bytes stored (write them out with --raw FILE); headers:")
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    lines = head.decode("utf-8", "replace").splitlines()
    for line in lines[:_SHOW_HEADER_LINES]:
        say("  " + clean(line, newlines=False))
    if len(lines) > _SHOW_HEADER_LINES:
        say(f"  ... ({len(lines) - _SHOW_HEADER_LINES} more header lines)")


def _write_raw(target: str, raw: bytes | None) -> None:
    if raw is None:
        raise CLIError("no message bytes are stored for this id", "nothing to write", 1)
    if target == "-":
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        return
    try:
        with open(target, "xb") as fh:
            fh.write(raw)
    except FileExistsError:
        raise CLIError(f"{target} exists", "name a new file; --raw never overwrites", 2) from None
    except OSError as exc:
        raise CLIError(f"cannot write {target}: {exc.strerror}", "check the path", 2) from None


def _bulk(args: argparse.Namespace, action: str) -> int:
    from mailworker import dlq

    _runtime()
    if not args.ids and not _has_filter(args) and not args.all:
        raise CLIError(f"'dlq {action}' with no id and no filter would act on every dead letter",
                       "name ids, add a filter (--relay, --code, ...), or pass --all", 2)
    fn = dlq.retry if action == "retry" else dlq.purge
    ids = fn(args.ids or None, None if args.ids else _filter(args), dry_run=args.dry_run)
    if args.json:
        print_json({"action": action, "dry_run": args.dry_run, "ids": ids})
    else:
        verb = {"retry": "retried", "purge": "purged"}[action]
        prefix = "would be " if args.dry_run else ""
        for mid in ids:
            say(mid)
        say(f"{len(ids)} dead letter(s) {prefix}{verb}")
    return 0


def dlq_retry(args: argparse.Namespace) -> int:
    return _bulk(args, "retry")


def dlq_purge(args: argparse.Namespace) -> int:
    return _bulk(args, "purge")


def _queue_depths(rt: Any) -> dict[str, int]:
    out = {}
    for q in rt.settings.queues:
        try:
            out[q] = int(rt.redis.llen(q)) if rt.settings.broker == rt.settings.redis_url else -1
        except redis.ResponseError:
            out[q] = -1
    return out


def _left(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _snapshot(rt: Any) -> dict[str, Any]:
    # Relays as Redis knows them (every worker's), plus any configured here and idle yet.
    states = rt.store.relay_states()
    # Relay groups configured here: their counters (a group's mail is counted under its
    # name), and what they stand for; pauses and windows are their members'.
    for name in (*rt.settings.relays, *rt.settings.groups):
        states.setdefault(name, {"counters": {}, "paused": None, "window": None,
                                 "slots_in_use": 0, "rate": None})
    # The fleet-wide window (whole slots; None: not used lately, it starts at
    # mailworker.fleet.INITIAL_WINDOW), slots in use, and the rate in force (None: none).
    return {"queues": _queue_depths(rt), **rt.store.counts(),
            "relays": {name: st["counters"] for name, st in states.items()},
            "groups": {name: g.describe() for name, g in rt.settings.groups.items()},
            "paused": {name: {"reason": st["paused"]["reason"],
                              "seconds_left": round(st["paused"]["seconds_left"], 1)}
                       for name, st in states.items() if st["paused"]},
            "limits": {name: {"window": None if st.get("window") is None
                              else int(st["window"]),
                              "slots_in_use": st.get("slots_in_use", 0),
                              "rate": None if st.get("rate") is None
                              else round(st["rate"], 1)}
                       for name, st in states.items()}}


def stats(args: argparse.Namespace) -> int:
    rt = _runtime()
    while True:
        snap = _snapshot(rt)
        if args.json:
            print_json(snap)
        else:
            if args.watch:
                print("\033[2J\033[H", end="")  # our own clear-screen, never from data
            say(f"mailworker stats  {_ts(time.time())} UTC")
            say(table(["queue", "waiting on broker"], list(snap["queues"].items())))
            say(f"\nin flight {snap['in_flight']}   deferred {snap['deferred']}   "
                f"dead letters {snap['dead']}\n")
            rows = []
            for name, c in sorted(snap["relays"].items()):
                pause = snap["paused"].get(name)
                note = (f"paused, {_left(pause['seconds_left'])} left: {pause['reason']}"
                        if pause else f"group: {snap['groups'][name]}"
                        if name in snap["groups"] else "")
                lim = snap["limits"].get(name, {})
                window = (f"{lim.get('slots_in_use', 0)}/{lim['window']}"
                          if lim.get("window") is not None else "-")
                rate = f"{lim['rate']:g}/s" if lim.get("rate") is not None else "-"
                rows.append((name, c.get("delivered", 0), c.get("deferred", 0),
                             c.get("failed", 0), c.get("dead", 0), c.get("attempts", 0),
                             window, rate, note))
            say(table(["relay", "delivered", "deferred", "failed rcpts", "dead", "attempts",
                       "slots/window", "rate", "note"], rows))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def check(args: argparse.Namespace) -> int:
    from mailworker.cli.check import run_check

    return run_check(args.relay)


def demo(args: argparse.Namespace) -> int:
    from mailworker.demo import run_demo

    return run_demo(messages=args.messages)
