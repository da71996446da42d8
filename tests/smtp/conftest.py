"""Fixtures for the SMTP layer's tests: real servers on free ports, relays pointing at them.

Every test talks to a real server (the fault-injecting ``SMTPTestServer``, or Postfix's
``smtp-sink``); nothing here mocks a socket. Logging goes through the production processor
chain (JSON, redaction) into a null stream, so the reply log runs in every test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from mailworker.logging import configure_logging
from mailworker.testing import SMTPTestServer


@pytest.fixture(autouse=True)
def _quiet_logging() -> Iterator[None]:
    with open(os.devnull, "w") as sink:
        configure_logging(fmt="json", level="INFO", stream=sink)
        yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def make_server() -> Iterator[Callable[..., SMTPTestServer]]:
    """Start SMTPTestServers with the given options; all are stopped after the test."""
    started: list[SMTPTestServer] = []

    def make(**kwargs: Any) -> SMTPTestServer:
        server = SMTPTestServer(**kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., SMTPTestServer]) -> SMTPTestServer:
    return make_server()
