"""mailworker: reliable email delivery for Python web applications.

Enqueue in a millisecond (``send``, ``send_message``, ``send_many``), ask later what
became of each recipient (``status``); Celery workers deliver over pooled, pipelined SMTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InvalidMessageError",
    "MailworkerError",
    "QueueFull",
    "QueueUnavailable",
    "QueueUncertain",
    "__version__",
    "configure",
    "hooks",
    "on",
    "send",
    "send_many",
    "send_message",
    "status",
]

# Exports load lazily: importing mailworker (e.g. from Django settings) must not import
# Celery or read the environment.
_EXPORTS = {
    "send": "mailworker.api",
    "send_many": "mailworker.api",
    "send_message": "mailworker.api",
    "status": "mailworker.api",
    "configure": "mailworker.runtime",
    "hooks": "mailworker.hooks",
    "on": "mailworker.hooks",
    "ConfigError": "mailworker.config",
    "InvalidMessageError": "mailworker.message",
    "MailworkerError": "mailworker.errors",
    "QueueFull": "mailworker.errors",
    "QueueUncertain": "mailworker.errors",
    "QueueUnavailable": "mailworker.errors",
}

if TYPE_CHECKING:
    from mailworker.api import send, send_many, send_message, status
    from mailworker.config import ConfigError
    from mailworker.errors import MailworkerError, QueueFull, QueueUnavailable, QueueUncertain
    from mailworker.hooks import hooks, on
    from mailworker.message import InvalidMessageError
    from mailworker.runtime import configure


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mailworker' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
