"""The SMTP layer: pooled, pipelined connections on smtplib, and a log line per reply.

Nothing here knows about Celery or Redis (see docs/architecture.md, "Layers").
"""

from mailworker.smtp.connection import Connection
from mailworker.smtp.errors import (
    CleartextAuthRefused,
    DeliveryUncertain,
    Failure,
    NotAttempted,
    ProtocolError,
    ReplyTimeout,
    Stage,
    TLSConfigurationError,
    failure_of,
)
from mailworker.smtp.pipeline import Envelope, RecipientResult, SendResult
from mailworker.smtp.pool import Pool, PoolManager, PoolStats, PoolTimeout, pools

__all__ = [
    "CleartextAuthRefused",
    "Connection",
    "DeliveryUncertain",
    "Envelope",
    "Failure",
    "NotAttempted",
    "Pool",
    "PoolManager",
    "PoolStats",
    "PoolTimeout",
    "ProtocolError",
    "RecipientResult",
    "ReplyTimeout",
    "SendResult",
    "Stage",
    "TLSConfigurationError",
    "failure_of",
    "pools",
]
