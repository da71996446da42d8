"""The exceptions an application catches, and the helper that keeps their text short.

Every error mailworker raises on purpose derives from :class:`MailworkerError`, so an
app can catch "anything mailworker refused" in one clause. The subclasses keep the
standard bases callers already catch: bad input is a ``ValueError``
(:class:`~mailworker.message.InvalidMessageError`, :class:`~mailworker.config.ConfigError`)
and a queue that cannot take mail is an ``OSError``, like the SMTP backends'
``SMTPException``/``OSError``, so ``except OSError`` code written for Django's SMTP
backend keeps working.

Imports nothing from the rest of the package (nor redis), so any module may use it.
"""

from __future__ import annotations

__all__ = ["MailworkerError", "QueueFull", "QueueUnavailable", "QueueUncertain", "shown"]

#: Longest repr of a caller's value echoed in an error message: an error must never
#: carry a whole attachment into a 400 response body or a log line.
SHOWN_LIMIT = 80


class MailworkerError(Exception):
    """Base class of every error mailworker raises on purpose."""


# The names are the documented API, read as states ("the queue is unavailable/full"),
# like the stdlib's ``queue.Full``.
class QueueUnavailable(MailworkerError, OSError):  # noqa: N818
    """The store (Redis) could not take or read the mail: unreachable, timed out, refused.

    Raised as such when Redis certainly did not run the call (the connection was refused,
    or Redis answered with an error: read-only replica, still loading, ...): nothing of
    the call was queued (``send_many`` writes a batch in one atomic script), so retrying
    it later is safe. When that is not known, the subclass :class:`QueueUncertain` is
    raised instead. The Redis error is the ``__cause__``.
    """

    #: True when the mail may have been queued all the same (see :class:`QueueUncertain`).
    maybe_queued: bool = False


class QueueUncertain(QueueUnavailable):
    """Redis's answer was lost after the request was sent (a timeout, a connection reset
    mid-call): the batch may have been queued, in which case it will be delivered.

    Retrying the same call without an ``idempotency_key`` may then send a second copy.
    With one, retrying is safe: Redis keeps the key, and a retry of a batch that was
    queued returns the first message's id and sends nothing more. ``except
    QueueUnavailable`` still catches it.
    """

    maybe_queued = True


class QueueFull(QueueUnavailable):
    """Redis refused the write for lack of memory (``maxmemory`` with ``noeviction``).

    Nothing of the call was queued. Retrying only helps once workers have delivered
    mail and ``retention`` has freed finished records, or Redis was given more memory.
    """


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``repr(value)`` cut to *limit* characters, for quoting a caller's value in an error.

    Large values are cut before ``repr`` runs, so quoting a 30 MB attachment costs
    nothing; the length of what was cut is said, so the reader knows it was big.
    """
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        unit = "chars" if isinstance(value, str) else "bytes"
        return f"{repr(value[:limit])[: limit - 3]}... ({len(value):,} {unit})"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
