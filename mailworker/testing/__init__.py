"""Test helpers shipped with mailworker: an SMTP server that records and misbehaves.

Use :class:`SMTPTestServer` in your own tests to check what your application sends, and
add :class:`Fault` values to see how it copes with refusals, disconnects and slow relays.
"""

from .faults import Fault, FaultKind
from .polling import free_port, wait_until
from .records import ReceivedMessage
from .server import SMTPTestServer

__all__ = ["Fault", "FaultKind", "ReceivedMessage", "SMTPTestServer", "free_port", "wait_until"]
