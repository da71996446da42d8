"""Fleet-wide per-relay limits hold across several worker processes."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import mailworker
from mailworker.config import load_settings
from mailworker.runtime import configure
from mailworker.store import MessageState
from tests.conftest import WorkerProcess
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def _limit(mw: Env, mw_env: dict[str, str], option: str) -> None:
    mw_env["MAILWORKER_RELAY_DEFAULT"] = mw.server.dsn() + ("&" if "?" in mw.server.dsn()
                                                             else "?") + option
    mw.settings = load_settings(environ=mw_env)
    mw.store = configure(mw.settings).store


def test_fleet_max_connections(mw: Env, mw_env: dict[str, str],
                               start_worker: Callable[..., WorkerProcess]) -> None:
    _limit(mw, mw_env, "fleet_max_connections=1")
    start_worker("-c", "4")
    start_worker("-c", "4")
    ids = []
    for i in range(0, 120, 10):  # many small batches, so workers contend for the slot
        ids += mailworker.send_many([{"to": f"u{j}@example.com", "text": "x"}
                                     for j in range(i, i + 10)])
    recs = mw.final(ids, timeout=60)
    assert all(r.state is MessageState.DELIVERED for r in recs)
    assert mw.server.max_concurrent_connections == 1
    assert mw.server.connections_opened > 1  # both workers took turns


def test_fleet_rate(mw: Env, mw_env: dict[str, str],
                    start_worker: Callable[..., WorkerProcess]) -> None:
    rate = 40
    _limit(mw, mw_env, f"fleet_rate={rate}")
    start_worker("-c", "4")
    start_worker("-c", "4")
    ids = mailworker.send_many([{"to": f"u{j}@example.com", "text": "x"} for j in range(160)])
    t0 = time.monotonic()
    worst = 0.0
    while True:  # sample arrivals against the bucket: burst + rate * elapsed
        n, elapsed = len(mw.server.messages), time.monotonic() - t0
        worst = max(worst, n - (rate + rate * elapsed))
        if n >= 160 or elapsed > 30:
            break
        time.sleep(0.02)
    recs = mw.final(ids, timeout=30)
    assert all(r.state is MessageState.DELIVERED for r in recs)
    assert worst <= rate * 0.25, f"{worst:.0f} messages over the budget"
    assert time.monotonic() - t0 >= (160 - rate) / rate * 0.8  # it really was throttled
