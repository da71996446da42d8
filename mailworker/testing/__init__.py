"""Test helpers shipped with mailworker, for your application's tests and for ours.

* :func:`record_messages` / the ``mailworker_outbox`` pytest fixture: mail your app sends
  is delivered in-process into an :class:`Outbox` (no Redis, no worker), through the real
  message builder and retry policy; see ``docs/testing.md``.
* :class:`LocalDelivery`: the real deliverer, scheduler and dead-letter code in one
  process, over fakeredis, with an in-memory broker and a clock the test moves.
* :class:`SMTPTestServer`: a real SMTP server that records what it receives; add
  :class:`Fault` values to see how a worker copes with refusals, disconnects and slow
  relays, and give it a :class:`Persona` (connection cap, rate cap, dropping after the
  dot) or take it down and up, as providers push back.

Nothing here needs more than mailworker's own dependencies, except TLS test servers
(``SMTPTestServer(tls=...)``), which need ``pip install 'mailworker[testing]'``, and
:class:`LocalDelivery`, which needs fakeredis (``pip install 'mailworker[demo]'``).

Exports load lazily: the pytest plugin (``mailworker_outbox``) imports this package, and a
project's test run must not pay for (or measure the import of) what it does not use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Clock", "Fault", "FaultKind", "LocalDelivery", "Outbox", "Persona",
           "ReceivedMessage", "SMTPTestServer", "SentMessage", "StillPending", "free_port",
           "record_messages", "wait_until"]

_EXPORTS = {
    "Clock": "local", "LocalDelivery": "local", "StillPending": "local",
    "Fault": "faults", "FaultKind": "faults",
    "Outbox": "outbox", "SentMessage": "outbox", "record_messages": "outbox",
    "free_port": "polling", "wait_until": "polling",
    "Persona": "personas",
    "ReceivedMessage": "records",
    "SMTPTestServer": "server",
}

if TYPE_CHECKING:
    from .faults import Fault, FaultKind
    from .local import Clock, LocalDelivery, StillPending
    from .outbox import Outbox, SentMessage, record_messages
    from .personas import Persona
    from .polling import free_port, wait_until
    from .records import ReceivedMessage
    from .server import SMTPTestServer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mailworker.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found once, then a plain module attribute
    return value
