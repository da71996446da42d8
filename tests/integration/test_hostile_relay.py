"""S2-02 end to end: one hostile relay must not stall a real worker's other mail.

A real `mailworker worker` (two threads) serves two relays: the healthy test server, and
one that trickles its EHLO reply a byte at a time forever (each read succeeds, so a
per-read socket timeout never fires; before the fix both threads hung there and nothing
was delivered on either relay). Mail to the healthy relay must keep flowing while the
hostile relay's mail is held and retried, and once the hostile relay behaves again its
mail goes out too: the threads came back.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

import mailworker
from mailworker.config import load_settings
from mailworker.runtime import configure
from mailworker.store import MessageState
from mailworker.testing import Fault, SMTPTestServer, wait_until
from tests.conftest import WorkerProcess
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration
SETUP_TIMEOUT = 1.5


def connect_failures(worker: WorkerProcess) -> list[dict[str, object]]:
    events = []
    for line in worker.log.read_text().splitlines():
        if '"smtp.connect_failed"' in line:
            events.append(json.loads(line))
    return events


def test_s2_02_hostile_relay_does_not_stall_the_healthy_one(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    hostile = SMTPTestServer()
    hostile.start()
    try:
        hostile.add_fault(Fault.trickle("EHLO", seconds=0.05))
        env = dict(mw.env, MAILWORKER_RELAY_HOSTILE=hostile.dsn(
            timeout=30, connect_timeout=2, setup_timeout=SETUP_TIMEOUT, deadline=10))
        configure(load_settings(environ=env))  # the producer must know the relay too
        worker = start_worker("-c", "2", env=env)

        stuck = [mailworker.send(to=f"h{i}@example.com", subject=f"h{i}", text="x",
                                 relay="hostile") for i in range(4)]
        wait_until(lambda: hostile.connections_opened >= 2, 20,
                   message="both worker threads to reach the hostile relay")
        healthy = [mailworker.send(to=f"ok{i}@example.com", subject=f"ok{i}", text="x")
                   for i in range(10)]

        recs = mw.final(healthy, timeout=30)
        assert {r.state for r in recs} == {MessageState.DELIVERED}
        assert not hostile.messages
        for rec in mw.store.get_many(stuck):
            assert rec is not None and not rec.state.final  # held for a retry, not lost
        failures = wait_until(lambda: connect_failures(worker), 10,
                              message="the hostile relay's failure in the worker log")
        assert failures[0]["error"] == "ReplyTimeout" and failures[0]["stage"] == "ehlo"
        assert f"setup_timeout={SETUP_TIMEOUT:g}s" in str(failures[0]["detail"])

        hostile.clear_faults()  # the relay behaves again: its mail goes, so no thread is lost
        assert {r.state for r in mw.final(stuck, timeout=30)} == {MessageState.DELIVERED}
        assert len(hostile.messages) == 4
    finally:
        hostile.stop()
