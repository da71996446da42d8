"""The naive baseline for ``benchmarks/bench_queue.py``: one Celery task per message.

This is what django-celery-email does: the web process turns each message into a dict of
its fields and publishes one task per message; the worker rebuilds the message, opens a
new ``smtplib.SMTP`` connection, sends it and quits. No pooling, no pipelining, no
batching, no store: the broker message *is* the mail.

It is deliberately ordinary Celery: JSON serializer (as django-celery-email uses), no
result backend, and every other setting at Celery's default (prefetch multiplier 4,
early acks). Run it like any Celery app::

    BASELINE_BROKER_URL=redis://127.0.0.1:6379/0 BASELINE_SMTP_PORT=2525 \\
        celery -A benchmarks.baseline_app worker -Q baseline -P threads -c 4

Configuration comes from the environment so the benchmark can point the workers and its
own producer at the same private Redis and sink: ``BASELINE_BROKER_URL``,
``BASELINE_SMTP_HOST`` (default 127.0.0.1), ``BASELINE_SMTP_PORT`` (default 25),
``BASELINE_SMTP_TIMEOUT`` (seconds, default 30).
"""

from __future__ import annotations

import functools
import os
import smtplib
import socket
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from celery import Celery

__all__ = ["app", "build", "enqueue", "send_email"]

SEND_TASK = "baseline.send_email"

app = Celery("baseline")
app.conf.update(
    broker_url=os.environ.get("BASELINE_BROKER_URL", "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    result_backend=None,
    task_ignore_result=True,
    worker_hijack_root_logger=True,
    worker_send_task_events=False,
    task_send_sent_event=False,
)


def build(fields: dict[str, Any]) -> EmailMessage:
    """The message as ``email.message.EmailMessage``, from the same fields on both sides."""
    msg = EmailMessage()
    msg["From"] = fields["from_email"]
    msg["To"] = ", ".join(fields["to"])
    msg["Subject"] = fields["subject"]
    msg["Date"] = fields.get("date") or formatdate(usegmt=True)
    if fields.get("message_id"):
        msg["Message-ID"] = fields["message_id"]
    msg.set_content(fields["body"])
    return msg


@functools.lru_cache(maxsize=1)
def _local_hostname() -> str:
    """Django's SMTP backend caches the FQDN (``DNS_NAME``); smtplib would look it up
    for every connection."""
    return socket.getfqdn()


@app.task(name=SEND_TASK, ignore_result=True)
def send_email(fields: dict[str, Any]) -> int:
    """Rebuild the message, open a new SMTP connection, send, quit (one per message)."""
    msg = build(fields)
    host = os.environ.get("BASELINE_SMTP_HOST", "127.0.0.1")
    port = int(os.environ.get("BASELINE_SMTP_PORT", "25"))
    timeout = float(os.environ.get("BASELINE_SMTP_TIMEOUT", "30"))
    # __exit__ sends QUIT and waits for its reply, as Django's backend close() does.
    with smtplib.SMTP(host, port, local_hostname=_local_hostname(), timeout=timeout) as smtp:
        smtp.send_message(msg, from_addr=fields["from_email"], to_addrs=fields["to"])
    return 1


def enqueue(fields: dict[str, Any], queue: str) -> None:
    """The producer side: build (and so validate) the ``EmailMessage``, publish its fields.

    Like django-celery-email, the broker message carries the message's fields as JSON;
    the headers the producer fixed (Date, Message-ID) travel with them so the worker
    sends the message that was built here.
    """
    msg = build(fields)
    payload = dict(fields, date=msg["Date"], message_id=msg["Message-ID"])
    send_email.apply_async(args=[payload], queue=queue, routing_key=queue)
