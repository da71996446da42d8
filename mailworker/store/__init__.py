"""Durable message records in Redis (the store is the truth about every message).

The record model itself is plain data in :mod:`mailworker.record`, re-exported here.
"""

from mailworker.record import (
    Attempt,
    MessageState,
    RcptState,
    RecipientState,
    Record,
    Reply,
)
from mailworker.store.redis_store import Claim, Store, Unreadable

__all__ = [
    "Attempt",
    "Claim",
    "MessageState",
    "RcptState",
    "RecipientState",
    "Record",
    "Reply",
    "Store",
    "Unreadable",
]
