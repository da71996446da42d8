"""The duplicate budget end to end: a relay that drops after the final dot, a real worker.

Each lost reply after the dot may have delivered the message, so retrying it risks a
second copy. Such attempts spend ``[retry] max_uncertain`` (default 1 retry); then the
message is dead-lettered as "may have been delivered", which ``mailworker dlq list
--reason`` finds. Before the budget existed, such a relay got up to ``max_attempts`` (20)
copies of each message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest

import mailworker
from mailworker.store import MessageState, RcptState
from mailworker.testing import Fault
from tests.conftest import ROOT, WorkerProcess
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailworker.cli.main", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_a_relay_dropping_after_the_dot_gets_each_message_at_most_twice(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    mw.server.add_fault(Fault.drop_after_dot(match="doomed"))        # every time
    mw.server.add_fault(Fault.drop_after_dot(match="lucky", times=1))  # once, then fine
    start_worker()
    doomed = mailworker.send_many([{"to": f"doomed{i}@example.com", "subject": f"d{i}",
                                    "text": "x"} for i in range(4)])
    lucky = mailworker.send(to="lucky@example.com", subject="lucky", text="x")
    recs = {r.id: r for r in mw.final([*doomed, lucky], timeout=60)}

    # Counted on the wire: every copy the server read, acknowledged or not.
    reached = Counter(m.message_id for m in mw.server.messages)
    for mid in doomed:
        rec = recs[mid]
        assert reached[rec.message_id] == 2, "1 + max_uncertain copies, no more"
        assert rec.state is MessageState.DEAD and rec.possible_duplicate
        assert rec.attempts == 2 and rec.attempts_made == 2
        assert (rec.dead_reason or "").count("may have been delivered: ") == 1
        rcpt = rec.recipients[0]
        assert rcpt.state is RcptState.FAILED and rcpt.possible_duplicate
        assert [a.decision and a.decision["uncertain_spent"] for a in rec.history] == [1, 1]
        assert [a.decision and a.decision["action"] for a in rec.history] == ["retry", "fail"]
    # One lost reply, then a 250: delivered, flagged, on the budget's single retry.
    won = recs[lucky]
    assert won.state is MessageState.DELIVERED and won.possible_duplicate
    assert reached[won.message_id] == 2 and mw.server.deliveries()[
        (won.message_id, "lucky@example.com")] == 1

    listed = cli(mw.env, "dlq", "list", "--reason", "May Have Been Delivered", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(r["id"] for r in json.loads(listed.stdout)) == sorted(doomed)
    other = cli(mw.env, "dlq", "list", "--reason", "retries exhausted", "--json")
    assert other.returncode == 0 and json.loads(other.stdout) == []
