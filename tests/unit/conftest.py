"""Fixtures for in-process delivery tests: a LocalDelivery with a quiet log and no jitter.

Every delivery, scheduler and dead-letter test gets the real code over fakeredis, a real
SMTP test server and a clock that only moves when the test says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from mailworker.backoff import Backoff
from mailworker.logging import configure_logging
from mailworker.policy import Policy
from mailworker.testing.local import LocalDelivery

#: Backoffs without jitter, so tests can assert exact times: 60 s doubling for
#: messages, 30 s doubling for relays.
POLICY = Policy(backoff=Backoff(initial=60, factor=2, maximum=3600, jitter=0),
                relay_backoff=Backoff(initial=30, factor=2, maximum=600, jitter=0))

MakeLocal = Callable[..., LocalDelivery]


@pytest.fixture
def make_local() -> Iterator[MakeLocal]:
    """Make LocalDelivery instances (closed after the test), logging to nowhere."""
    made: list[LocalDelivery] = []
    with open(os.devnull, "w") as sink:
        configure_logging(fmt="json", level="INFO", stream=sink)

        def make(*args: Any, **kw: Any) -> LocalDelivery:
            kw.setdefault("policy", POLICY)
            local = LocalDelivery(*args, **kw)
            made.append(local)
            return local

        try:
            yield make
        finally:
            for local in reversed(made):
                local.close()
            structlog.reset_defaults()
            structlog.contextvars.clear_contextvars()


@pytest.fixture
def local(make_local: MakeLocal) -> LocalDelivery:
    return make_local()
