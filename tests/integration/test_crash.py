"""Lose nothing: workers killed with SIGKILL mid-delivery, again and again.

Two real workers deliver 2,000 messages; one is killed several times as delivery
progresses and started again. At the end every message is final, and the SMTP server saw
each (message, recipient) exactly once, except copies the records flag as possible
duplicates (a worker died between the server's 250 and saving it: the window SMTP itself
cannot close). Those are counted and reported.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import mailworker
from mailworker.store import MessageState
from tests.conftest import WorkerProcess, wait_until
from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL = 2000


def test_sigkill_loses_nothing_and_flags_every_duplicate(
    mw: Env, start_worker: Callable[..., WorkerProcess], mw_env: dict[str, str]
) -> None:
    # Short leases so a dead worker's mail is swept back quickly.
    mw_env.update(MAILWORKER_RELAY_DEFAULT=mw.server.dsn(deadline=5),
                  MAILWORKER_LEASE_SECONDS="8", MAILWORKER_STUCK_AFTER="2",
                  MAILWORKER_BATCH_SIZE="20")
    steady = start_worker("-c", "4")
    victim = start_worker("-c", "4")
    ids: list[str] = []
    for start in range(0, TOTAL, 500):
        ids += mailworker.send_many([
            {"to": [f"r{i}@example.com"] + ([f"s{i}@example.org"] if i % 2 else []),
             "subject": f"crash {i}", "text": f"body {i}\n"}
            for i in range(start, start + 500)
        ])

    kills = 0
    for threshold in (200, 700, 1200):
        wait_until(lambda t=threshold: len(mw.server.messages) >= t, 60,
                   message=f"{threshold} messages at the server")
        victim.kill()
        kills += 1
        victim = start_worker("-c", "4")

    recs = mw.final(ids, timeout=120)
    steady.stop()
    victim.stop()

    assert kills == 3
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
          f"{len(flagged_dupes)} duplicate copies, all flagged possible_duplicate; "
          f"{sum(flagged for flagged in expected.values())} pairs flagged in all")
    assert missing == []
    assert unflagged_dupes == []
    assert strangers == []
