"""Django signals for a message's final state, sent from :mod:`mailworker.hooks`.

They fire where delivery happens: in the worker process, right after the outcome is
saved. A Django receiver therefore runs only in a worker that has loaded Django (run it
with ``python manage.py mailworker worker``); receivers connected in the web process see
nothing. Each signal is sent with ``sender=None`` and ``record``, the
:class:`mailworker.store.Record`: ``record.id`` (what ``mailworker_id`` and ``send()``
returned), ``record.state`` (``delivered`` or ``dead``), ``record.message_id`` (the
Message-ID header), ``record.recipients`` (each with ``address``, ``state``, ``reply``
and ``attempts``), ``record.metadata`` and ``record.dead_reason``.

A receiver that raises is logged and ignored; it never affects delivery or the other
receivers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog
from django.dispatch import Signal  # type: ignore[import-untyped]  # Django is untyped

from mailworker.hooks import hooks

if TYPE_CHECKING:
    from mailworker.store import Record

__all__ = ["connect_hooks", "message_dead_lettered", "message_delivered", "message_failed"]

log = structlog.get_logger("mailworker.contrib.django")

#: Every recipient was delivered.
message_delivered = Signal()
#: The message ended with at least one recipient refused or out of time.
message_failed = Signal()
#: The message went to the dead-letter store (sent together with ``message_failed``).
message_dead_lettered = Signal()

SIGNALS: dict[str, Any] = {
    "delivered": message_delivered,
    "failed": message_failed,
    "dead_lettered": message_dead_lettered,
}

class _Connected:
    lock = threading.Lock()
    done = False


def _relay(event: str, signal: Any) -> Any:
    def hook(record: Record) -> None:
        # send_robust: one broken receiver must not keep the others from running.
        for receiver, result in signal.send_robust(sender=None, record=record):
            if isinstance(result, Exception):
                log.error("django.signal_receiver_failed", hook_event=event, message_id=record.id,
                          receiver=getattr(receiver, "__qualname__", repr(receiver)),
                          error=f"{type(result).__name__}: {result}", exc_info=result)

    hook.__qualname__ = f"django_signal_{event}"
    return hook


def connect_hooks() -> None:
    """Relay mailworker's hooks to the Django signals; safe to call more than once."""
    with _Connected.lock:
        if _Connected.done:
            return
        for event, signal in SIGNALS.items():
            hooks.connect(event, _relay(event, signal))
        _Connected.done = True
