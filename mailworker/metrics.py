"""Prometheus instruments: counters and histograms recorded where outcomes are saved.

Off by default and then free: every recording function starts with one check of a
module flag. ``mailworker worker --metrics-port`` (or ``MAILWORKER_METRICS_PORT``) turns
them on with :func:`enable` in the process that delivers; :mod:`mailworker.metrics_http`
serves them, with gauges read from Redis at scrape time.

Prefork and the supervised child are several processes, so the instruments use
prometheus_client's multiprocess mode: each process writes its values to small files in
``PROMETHEUS_MULTIPROC_DIR`` and the process that serves ``/metrics`` adds them up.
prometheus_client chooses that mode when it is first imported, so :func:`prepare_dir`
sets the variable before anything imports it, and this module imports it only in
:func:`enable`. A worker started without a port never imports prometheus_client.

What is counted (labels ``relay`` and ``queue``):

- ``mailworker_messages_total{state}``: each saved outcome of a message: ``delivered``
  and ``dead`` once per message (final), ``deferred`` once per deferred attempt.
- ``mailworker_recipients_total{state}``: recipients at a message's final state
  (``delivered``, ``failed``) and the recipients still open at each deferral
  (``deferred``).
- ``mailworker_smtp_replies_total{relay, class, stage}``: every SMTP reply read, by code
  class (``2xx``, ``4xx``, ``5xx``, ``other``) and the command it answers; counted through
  the reply log's hook (:data:`mailworker.smtp.replylog.ReplyLog.on_reply`), so the SMTP
  layer imports nothing of Prometheus.
- ``mailworker_delivery_seconds``: from when a message was due (enqueue, or ``send_at``)
  to its delivery.
- ``mailworker_smtp_transaction_seconds``: the SMTP time of each attempt (its history
  entry's start to finish).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailworker.smtp.replylog import ReplyLog

if TYPE_CHECKING:
    from mailworker.outcome import Step
    from mailworker.record import Record

__all__ = ["ENV_DIR", "enable", "enabled", "metric_names", "prepare_dir", "reply", "saved"]

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds: SMTP transactions take milliseconds to a minute; deliveries up to a day.
_TXN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                     3600.0, 4 * 3600.0, 86400.0)
_STAGES = {"<DOT>": "dot", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data", "EHLO": "ehlo",
           "HELO": "ehlo", "STARTTLS": "tls", "AUTH": "auth", "RSET": "rset",
           "QUIT": "quit", "NOOP": "noop", "": "greeting"}
_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

_on = False
_m: dict[str, Any] = {}

#: Name, type and help of every instrument, including the gauges of metrics_http (the
#: dashboard and alert tests check every expression against this list).
METRICS: dict[str, tuple[str, str]] = {
    "mailworker_messages_total": ("counter", "Messages saved, by final state or deferral"),
    "mailworker_recipients_total": ("counter", "Recipients at final states and deferrals"),
    "mailworker_smtp_replies_total": ("counter", "SMTP replies by code class and stage"),
    "mailworker_delivery_seconds": ("histogram", "From due (enqueue or send_at) to delivery"),
    "mailworker_smtp_transaction_seconds": ("histogram", "SMTP time of one attempt"),
    "mailworker_queue_depth": ("gauge", "Wake-ups waiting on the broker per queue"),
    "mailworker_in_flight": ("gauge", "Records queued or being sent"),
    "mailworker_deferred": ("gauge", "Records waiting for a retry"),
    "mailworker_dead_letters": ("gauge", "Records in the dead letters"),
    "mailworker_oldest_in_flight_age_seconds": ("gauge", "Age of the oldest in-flight record"),
    "mailworker_relay_paused": ("gauge", "1 while the relay is paused fleet-wide"),
    "mailworker_relay_connections": ("gauge", "Fleet-wide connection slots in use"),
    "mailworker_relay_window": ("gauge", "Fleet-wide concurrency window (slots)"),
    "mailworker_relay_rate": ("gauge", "Learned fleet rate in force (messages/s)"),
    "mailworker_redis_up": ("gauge", "1 if Redis answered the last scrape"),
}


def metric_names() -> set[str]:
    """Every series name a scrape can show (histograms with their suffixes)."""
    names = set()
    for name, (kind, _) in METRICS.items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def prepare_dir(path: str | None = None) -> str:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory, before any import of
    prometheus_client, and return it.

    An operator's own ``PROMETHEUS_MULTIPROC_DIR`` is used (emptied of our ``*.db``
    files: values of a previous run would add to this one's); without one, a fresh
    temporary directory. Children inherit the variable and write their files there.
    """
    chosen = path or os.environ.get(ENV_DIR)
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        for old in Path(chosen).glob("*.db"):
            old.unlink(missing_ok=True)
    else:
        chosen = tempfile.mkdtemp(prefix="mailworker-metrics-")
    os.environ[ENV_DIR] = chosen
    return chosen


def remove_dir(path: str) -> None:
    """Remove a directory :func:`prepare_dir` made (the operator's own is kept)."""
    if Path(path).name.startswith("mailworker-metrics-"):
        shutil.rmtree(path, ignore_errors=True)


def enabled() -> bool:
    return _on


def enable() -> None:
    """Create the instruments and start counting (idempotent)."""
    global _on
    if _on:
        return
    from prometheus_client import Counter, Histogram

    def help_of(name: str) -> str:
        return METRICS[name][1]

    base = ("relay", "queue")
    _m["messages"] = Counter("mailworker_messages", help_of("mailworker_messages_total"),
                             [*base, "state"])
    _m["recipients"] = Counter("mailworker_recipients",
                               help_of("mailworker_recipients_total"), [*base, "state"])
    _m["replies"] = Counter("mailworker_smtp_replies", help_of("mailworker_smtp_replies_total"),
                            ["relay", "class", "stage"])
    _m["delivery"] = Histogram("mailworker_delivery_seconds",
                               help_of("mailworker_delivery_seconds"), base,
                               buckets=_DELIVERY_BUCKETS)
    _m["txn"] = Histogram("mailworker_smtp_transaction_seconds",
                          help_of("mailworker_smtp_transaction_seconds"), base,
                          buckets=_TXN_BUCKETS)
    ReplyLog.on_reply = reply
    _on = True


def reply(relay: str, command: str, code: int) -> None:
    """Count one SMTP reply (installed as the reply log's hook by :func:`enable`)."""
    word = command.split(" ", 1)[0].upper() if command else ""
    stage = _STAGES.get(word, "other")
    _m["replies"].labels(relay, _CLASSES.get(code // 100, "other"), stage).inc()


def saved(record: Record, step: Step, now: float) -> None:
    """Count one saved outcome (called by the Deliverer for each committed record).

    ``step.counters`` says what happened in this step, as the store counts it: an
    ``attempts`` entry for an SMTP attempt, ``deferred`` for a deferral after one (a hold
    without an attempt, behind a pause or a full window, counts as ``held``).
    """
    if not _on:
        return
    state = step.state.value
    attempted = "attempts" in step.counters
    if state == "deferred" and not attempted:
        state = "held"
    elif state not in ("delivered", "dead", "deferred"):
        return
    relay, queue = record.relay, record.queue
    _m["messages"].labels(relay, queue, state).inc()
    counts: dict[str, int] = {}
    for r in record.recipients:
        if state in ("delivered", "dead"):
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
        elif r.state.open:
            counts[state] = counts.get(state, 0) + 1
    for rstate, n in counts.items():
        _m["recipients"].labels(relay, queue, rstate).inc(n)
    if state == "delivered":
        due = record.send_at or record.created_at
        _m["delivery"].labels(relay, queue).observe(max(0.0, now - due))
    if attempted and record.history:
        last = record.history[-1]
        _m["txn"].labels(relay, queue).observe(max(0.0, last.finished_at - last.started_at))
