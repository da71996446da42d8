"""Hooks on final states: plain callables run in the worker after the outcome is saved.

Events: ``delivered`` (every recipient got 250), ``failed`` (the message ended with at
least one recipient refused or out of time) and ``dead_lettered`` (it went to the
dead-letter store; fires together with ``failed``). A hook that raises is logged and
ignored: a bug in an app's hook must never un-deliver mail or block the queue.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from mailworker.record import Record

__all__ = ["EVENTS", "Hook", "Hooks", "hooks", "on"]

EVENTS = ("delivered", "failed", "dead_lettered")
Hook = Callable[["Record"], None]
log = structlog.get_logger("mailworker.hooks")


class Hooks:
    """A registry of callables per event."""

    def __init__(self) -> None:
        self._hooks: dict[str, list[Hook]] = defaultdict(list)

    def connect(self, event: str, fn: Hook) -> Hook:
        if event not in EVENTS:
            raise ValueError(f"unknown hook event {event!r}; use one of {', '.join(EVENTS)}")
        self._hooks[event].append(fn)
        return fn

    def disconnect(self, event: str, fn: Hook) -> None:
        if fn in self._hooks[event]:
            self._hooks[event].remove(fn)

    def fire(self, event: str, record: Record) -> None:
        for fn in list(self._hooks.get(event, ())):
            try:
                fn(record)
            except Exception:
                log.exception("hook.failed", hook_event=event, message_id=record.id,
                              hook=getattr(fn, "__qualname__", repr(fn)))


hooks = Hooks()


def on(event: str) -> Callable[[Hook], Hook]:
    """Decorator: ``@mailworker.on("delivered")`` registers a hook on the default registry."""

    def register(fn: Hook) -> Hook:
        return hooks.connect(event, fn)

    return register
