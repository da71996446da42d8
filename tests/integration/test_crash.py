"""Lose nothing: workers killed with SIGKILL mid-delivery, again and again.

Two real workers deliver 2,000 messages; one is killed several times as delivery
progresses and started again. At the end every message is final, and the SMTP server saw
each (message, recipient) exactly once, except copies the records flag as possible
duplicates (a worker died between the server's 250 and saving it: the window SMTP itself
cannot close). Those are counted and reported, with how many pairs were flagged in all
(a kill flags only the transaction window it struck) and how long after the last kill
everything was final.

The suite runs a short version; the full one (10,000 messages, 100 kills) is
``MW_CRASH_TOTAL=10000 MW_CRASH_KILLS=100 MW_CRASH_DOT_DELAY=0.15 MW_CRASH_LEASE=15
MW_CRASH_STUCK_AFTER=10 pytest tests/integration/test_crash.py -s`` (the default leases):
the relay's delay after each final dot slows delivery to about 40 messages a second, so
the kills (one per worker start, about 2 s) strike throughout the run rather than after.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

import mailworker
from mailworker.store import MessageState
from mailworker.testing import Fault
from tests.conftest import WorkerProcess, wait_until
from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = int(os.environ.get("MW_CRASH_TOTAL", "2000"))
KILLS = int(os.environ.get("MW_CRASH_KILLS", "4"))
DOT_DELAY = float(os.environ.get("MW_CRASH_DOT_DELAY", "0"))
# Scaled down in the suite; the full run uses the defaults (15 s and 10 s).
LEASE = os.environ.get("MW_CRASH_LEASE", "5")
STUCK_AFTER = os.environ.get("MW_CRASH_STUCK_AFTER", "3")


def test_sigkill_loses_nothing_and_flags_every_duplicate(
    mw: Env, start_worker: Callable[..., WorkerProcess], mw_env: dict[str, str]
) -> None:
    # How fast a dead worker's mail moves again is part of what is measured.
    if DOT_DELAY:
        mw.server.add_fault(Fault.delay("DOT", DOT_DELAY))
    mw_env.update(MAILWORKER_RELAY_DEFAULT=mw.server.dsn(deadline=5),
                  MAILWORKER_BATCH_SIZE="20", MAILWORKER_LEASE_SECONDS=LEASE,
                  MAILWORKER_STUCK_AFTER=STUCK_AFTER)
    steady = start_worker("-c", "4")
    victim = start_worker("-c", "4")
    ids: list[str] = []
    for start in range(0, TOTAL, 500):
        ids += mailworker.send_many([
            {"to": [f"r{i}@example.com"] + ([f"s{i}@example.org"] if i % 2 else []),
             "subject": f"crash {i}", "text": f"body {i}\n"}
            for i in range(start, min(start + 500, TOTAL))
        ])

    kills, last_kill = 0, time.monotonic()
    for k in range(KILLS):
        # Spread over the run, the last one near its end, so "final after the last kill"
        # measures recovery rather than the rest of the backlog.
        threshold = int(TOTAL * 0.95 * (k + 1) / KILLS)
        wait_until(lambda t=threshold: len(mw.server.messages) >= t, 120,
                   message=f"{threshold} messages at the server")
        victim.kill()
        last_kill = time.monotonic()
        kills += 1
        victim = start_worker("-c", "4")

    recs = mw.final(ids, timeout=120)
    settled = time.monotonic() - last_kill
    steady.stop()
    victim.stop()

    assert kills == KILLS
    assert all(r.state is MessageState.DELIVERED for r in recs), \
        {r.state.value for r in recs}
    got = mw.server.deliveries()
    expected = {(r.message_id, rs.address): rs.possible_duplicate
                for r in recs for rs in r.recipients}
    missing = [k for k in expected if got[k] == 0]
    unflagged_dupes = [k for k, flagged in expected.items() if got[k] > 1 and not flagged]
    flagged_dupes = [k for k, flagged in expected.items() if got[k] > 1 and flagged]
    strangers = [k for k in got if k not in expected]
    print(f"\ncrash test: {len(expected)} (message, recipient) pairs, {kills} SIGKILLs, "
          f"{len(flagged_dupes)} pairs with a second copy, all flagged possible_duplicate; "
          f"{sum(flagged for flagged in expected.values())} pairs flagged in all; "
          f"all final {settled:.1f} s after the last kill")
    assert settled < 60, f"{settled:.1f} s from the last kill until all final"
    assert missing == []
    assert unflagged_dupes == []
    assert strangers == []
