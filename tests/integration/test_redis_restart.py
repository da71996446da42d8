"""A restarted Redis (with AOF, as production must run it) loses no accepted mail."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mailworker
from mailworker.config import load_settings
from mailworker.runtime import configure, reset_runtime
from mailworker.store import MessageState
from mailworker.testing import SMTPTestServer
from tests.conftest import RedisServer, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_redis_restart_mid_delivery(aof_redis: RedisServer, mw_env: dict[str, str],
                                    start_worker: Callable[..., WorkerProcess],
                                    how: signal.Signals) -> None:
    with SMTPTestServer(latency=0.002) as smtp:
        mw_env.update(MAILWORKER_REDIS_URL=aof_redis.url,
                      MAILWORKER_RELAY_DEFAULT=smtp.dsn(deadline=5),
                      MAILWORKER_LEASE_SECONDS="8", MAILWORKER_STUCK_AFTER="2",
                      MAILWORKER_BATCH_SIZE="10")
        rt = configure(load_settings(environ=mw_env))
        try:
            ids = mailworker.send_many([{"to": f"r{i}@example.com", "text": f"m{i}"}
                                        for i in range(600)])
            start_worker("-c", "2")
            wait_until(lambda: len(smtp.messages) >= 100, 30, message="delivery under way")
            aof_redis.stop(how)  # Redis dies with deliveries in flight
            aof_redis.start()    # ...and comes back from its append-only file

            def all_final() -> bool:
                try:
                    recs = rt.store.get_many(ids)
                except Exception:  # redis-py reconnects on the next call
                    return False
                return all(r is not None and r.state.final for r in recs)

            wait_until(all_final, 120, interval=0.2, message="all messages final after restart")
            recs = [r for r in rt.store.get_many(ids) if r is not None]
            assert len(recs) == 600
            assert {r.state for r in recs} == {MessageState.DELIVERED}
            got = smtp.deliveries()
            for r in recs:
                n = got[(r.message_id, r.recipients[0].address)]
                assert n >= 1
                assert n == 1 or r.recipients[0].possible_duplicate
        finally:
            rt.pools.close_all()
            reset_runtime()
