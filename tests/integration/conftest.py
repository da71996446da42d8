"""An SMTP test server plus a producer runtime pointed at the test's Redis and queues."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mailworker.config import Settings, load_settings
from mailworker.runtime import configure, reset_runtime
from mailworker.store import Record, Store
from mailworker.testing import SMTPTestServer
from tests.conftest import wait_until


@dataclass
class Env:
    server: SMTPTestServer
    env: dict[str, str]
    settings: Settings
    store: Store

    def final(self, ids: list[str], timeout: float = 30.0) -> list[Record]:
        """Wait until every id is in a final state; return the records."""

        def done() -> list[Record] | None:
            recs = self.store.get_many(ids)
            if all(r is not None and r.state.final for r in recs):
                return [r for r in recs if r is not None]
            return None

        return wait_until(done, timeout, message=f"{len(ids)} messages to reach a final state")  # type: ignore[no-any-return]


@pytest.fixture
def mw_server_options() -> dict[str, Any]:
    """Keyword arguments for the ``mw`` fixture's SMTPTestServer; a test module overrides
    this fixture for another server (e.g. ``{"chunking": True}``)."""
    return {}


@pytest.fixture
def mw(mw_env: dict[str, str], mw_server_options: dict[str, Any]) -> Iterator[Env]:
    server = SMTPTestServer(**mw_server_options)
    server.start()
    mw_env["MAILWORKER_RELAY_DEFAULT"] = server.dsn()  # the workers start from mw_env too
    env = mw_env
    settings = load_settings(environ=env)
    rt = configure(settings)
    try:
        yield Env(server, env, settings, rt.store)
    finally:
        server.stop()
        rt.pools.close_all()
        reset_runtime()
