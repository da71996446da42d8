"""Durable message records in Redis (DESIGN.md: the store is the truth)."""

from mailworker.store.record import (
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
