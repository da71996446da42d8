"""Durable message records in Redis (the store is the truth about every message).

:class:`Store` holds the records and their transitions, ``Store.relays``
(:class:`RelayState`) the fleet-wide relay state, and :mod:`mailworker.store.keys` the
whole key schema. The record model itself is plain data in :mod:`mailworker.record`,
re-exported here.
"""

from mailworker.record import (
    Attempt,
    MessageState,
    RcptState,
    RecipientState,
    Record,
    Reply,
)
from mailworker.store.keys import FAMILIES, Keys
from mailworker.store.redis_store import DEAD_RETENTION, Claim, Store, Unreadable
from mailworker.store.relays import RelayState

__all__ = [
    "DEAD_RETENTION",
    "FAMILIES",
    "Attempt",
    "Claim",
    "Keys",
    "MessageState",
    "RcptState",
    "RecipientState",
    "Record",
    "RelayState",
    "Reply",
    "Store",
    "Unreadable",
]
