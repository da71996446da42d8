"""Test helpers shipped with mailworker, for your application's tests and for ours.

* :func:`record_messages` / the ``mailworker_outbox`` pytest fixture: mail your app sends
  is delivered in-process into an :class:`Outbox` (no Redis, no worker), through the real
  message builder and retry policy; see ``docs/testing.md``.
* :class:`SMTPTestServer`: a real SMTP server that records what it receives; add
  :class:`Fault` values to see how a worker copes with refusals, disconnects and slow
  relays, and give it a :class:`Persona` (connection cap, rate cap, dropping after the
  dot) or take it down and up, as providers push back.

Nothing here needs more than mailworker's own dependencies, except TLS test servers
(``SMTPTestServer(tls=...)``), which need ``pip install 'mailworker[testing]'``.
"""

from .faults import Fault, FaultKind
from .outbox import Outbox, SentMessage, record_messages
from .personas import Persona
from .polling import free_port, wait_until
from .records import ReceivedMessage
from .server import SMTPTestServer

__all__ = ["Fault", "FaultKind", "Outbox", "Persona", "ReceivedMessage", "SMTPTestServer",
           "SentMessage", "free_port", "record_messages", "wait_until"]
