"""Compatibility path: the record model lives in :mod:`mailworker.record`.

It is plain data with no Redis in it, so the pure layers (outcome, policy, hooks) import
it from there; this module only re-exports it for code written against the old path.
"""

from mailworker.record import Attempt, MessageState, RcptState, RecipientState, Record, Reply

__all__ = ["Attempt", "MessageState", "RcptState", "RecipientState", "Record", "Reply"]
