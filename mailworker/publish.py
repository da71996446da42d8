"""Wake-ups: the one rule for telling workers which records to look at.

``send()``, ``dlq retry`` and the scheduler all wake records the same way, through
:func:`wake`:

* **Grouping.** Ids are grouped by (queue, relay), in the order first seen, and each group
  is cut into batches of ``batch_size``; one broker message per batch. A batch for one
  relay lets a worker reuse one pooled connection for all of it.
* **Failures.** Every id handed to :func:`wake` is already safe in Redis and in the
  in-flight set, where the sweeper finds it within ``stuck_after`` if no wake-up comes.
  So a failed publish is logged (``wake.publish_failed``) and never raised: the caller's
  work (the mail accepted, the dead letter requeued, the tick) is done. The first failure
  stops the publishing, so a broker that is down costs the caller one timeout, not one
  per batch; the ids not published are left to the sweeper.

A :data:`Publisher` sends one batch; the runtime holds the process's
(:attr:`mailworker.runtime.Runtime.publisher`), Celery's :func:`mailworker.broker.publish`
unless a test or :class:`mailworker.testing.LocalDelivery` swaps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import structlog

__all__ = ["Publisher", "Routed", "batches", "wake"]

log = structlog.get_logger("mailworker.publish")

Publisher = Callable[[Sequence[str], str], None]
"""Publishes one wake-up: a batch of ids, and the queue it goes to."""

Routed = tuple[str, str, str]
"""(id, queue, relay) of a record to wake."""


def batches(routed: Iterable[Routed], batch_size: int) -> list[tuple[str, list[str]]]:
    """(queue, ids) per broker message: grouped by (queue, relay), at most *batch_size*."""
    groups: dict[tuple[str, str], list[str]] = {}
    for mid, queue, relay in routed:
        groups.setdefault((queue, relay), []).append(mid)
    return [(queue, ids[i:i + batch_size])
            for (queue, _relay), ids in groups.items()
            for i in range(0, len(ids), batch_size)]


def wake(publisher: Publisher, routed: Iterable[Routed], batch_size: int) -> list[str]:
    """Publish wake-ups for *routed* records; return the ids left to the sweeper (empty
    when every batch went out). Never raises for a publish failure (see above)."""
    todo = batches(routed, batch_size)
    for n, (queue, ids) in enumerate(todo):
        try:
            publisher(ids, queue)
        except Exception as exc:
            left = [mid for _queue, batch in todo[n:] for mid in batch]
            log.warning("wake.publish_failed", error=f"{type(exc).__name__}: {exc}",
                        queue=queue, count=len(left),
                        note="records are safe in Redis; the sweeper wakes them")
            return left
    return []
