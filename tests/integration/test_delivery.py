"""The queue end to end: real Redis, a real `mailworker worker` process, the test SMTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest

import mailworker
from mailworker.celery_app import deliver
from mailworker.store import MessageState, RcptState
from mailworker.testing import Fault
from tests.conftest import ROOT, WorkerProcess, wait_until
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration
StartWorker = Callable[..., WorkerProcess]


def copies(env: Env) -> Counter[tuple[str, str]]:
    """(Message-ID header, recipient) -> copies the server acknowledged."""
    return env.server.deliveries()


def test_messages_are_delivered_once_each(mw: Env, start_worker: StartWorker) -> None:
    start_worker()
    ids = mailworker.send_many(
        [{"to": [f"u{i}@example.com", f"v{i}@example.com"], "subject": f"m{i}", "text": "hi"}
         for i in range(30)]
    )
    recs = mw.final(ids)
    assert {r.state for r in recs} == {MessageState.DELIVERED}
    got = copies(mw)
    for r in recs:
        for rs in r.recipients:
            assert rs.state is RcptState.DELIVERED and rs.reply and rs.reply.code == 250
            assert got[(r.message_id, rs.address)] == 1
    st = mailworker.status(ids[0])
    assert st is not None and st["state"] == "delivered"
    assert st["recipients"][0]["reply"]["code"] == 250


def test_partial_refusal(mw: Env, start_worker: StartWorker) -> None:
    mw.server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
    mw.server.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted, try again", match="grey@",
                                    times=1))
    start_worker()
    mid = mailworker.send(to=["ok@example.com", "bad@example.com", "grey@example.com"],
                          subject="partial", text="x")
    [rec] = mw.final([mid])
    states = {r.address: r.state for r in rec.recipients}
    assert states == {"ok@example.com": RcptState.DELIVERED, "bad@example.com": RcptState.FAILED,
                      "grey@example.com": RcptState.DELIVERED}
    assert rec.state is MessageState.DEAD and "bad@example.com" in (rec.dead_reason or "")
    assert rec.recipient("bad@example.com").reply.enhanced_code == "5.1.1"  # type: ignore[union-attr]
    got = copies(mw)
    assert got[(rec.message_id, "ok@example.com")] == 1  # not sent again with the retry
    assert got[(rec.message_id, "grey@example.com")] == 1
    assert got[(rec.message_id, "bad@example.com")] == 0
    assert len(rec.history) == 2


def test_temporary_failure_then_success(mw: Env, start_worker: StartWorker) -> None:
    mw.server.add_fault(Fault.reply("MAIL", 451, "4.3.0 Try again later", times=1))
    start_worker()
    mid = mailworker.send(to="a@example.com", subject="retry", text="x")
    [rec] = mw.final([mid])
    assert rec.state is MessageState.DELIVERED
    assert [a.outcome for a in rec.history] == ["retry", "delivered"]
    assert rec.history[0].error["code"] == 451  # type: ignore[index]
    assert rec.history[0].error["stage"] == "mail"  # type: ignore[index]


def _cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailworker.cli.main", *args], env=env.env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_permanent_failure_dead_letter_then_retry(mw: Env, start_worker: StartWorker) -> None:
    mw.server.add_fault(Fault.reply("DOT", 554, "5.7.1 Message rejected as spam"))
    start_worker()
    mid = mailworker.send(to=["a@example.com", "b@example.com"], subject="spam?", text="x")
    [rec] = mw.final([mid])
    assert rec.state is MessageState.DEAD
    assert all(r.state is RcptState.FAILED for r in rec.recipients)

    listed = _cli(mw, "dlq", "list", "--code", "554", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)] == [mid]
    dry = _cli(mw, "dlq", "retry", mid, "--dry-run")
    assert dry.returncode == 0 and "would be retried" in dry.stdout
    assert mw.store.get(mid).state is MessageState.DEAD  # type: ignore[union-attr]

    mw.server.clear_faults()
    done = _cli(mw, "dlq", "retry", mid)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: mw.store.get(mid).state is MessageState.DELIVERED,  # type: ignore[union-attr]
               30, message="retried dead letter to be delivered")
    assert copies(mw)[(rec.message_id, "a@example.com")] == 1
    assert _cli(mw, "dlq", "list", "--json").stdout.strip() == "[]"


def test_message_past_lifetime_is_dead_lettered(mw: Env, start_worker: StartWorker) -> None:
    mw.server.add_fault(Fault.reply("RCPT", 450, "4.2.1 Mailbox busy"))
    start_worker()
    mid = mailworker.send(to="busy@example.com", subject="late", text="x",
                          expires_at=time.time() + 3)
    [rec] = mw.final([mid], timeout=30)
    assert rec.state is MessageState.DEAD
    assert "lifetime exceeded" in (rec.dead_reason or "")
    assert rec.recipients[0].reply.code == 450  # type: ignore[union-attr]


def test_duplicate_broker_delivery_sends_once(mw: Env, start_worker: StartWorker) -> None:
    queue = mw.settings.default_queue
    ids = mailworker.send_many([{"to": f"d{i}@example.com", "text": "x"} for i in range(10)])
    for _ in range(3):  # the broker hands the same ids out again and again
        deliver.apply_async(args=[ids], queue=queue, routing_key=queue)
    start_worker("-c", "4")
    recs = mw.final(ids)
    assert all(r.state is MessageState.DELIVERED for r in recs)
    got = copies(mw)
    assert all(got[(r.message_id, r.recipients[0].address)] == 1 for r in recs)
    assert len(mw.server.messages) == 10


def test_idempotency_key_sends_once(mw: Env, start_worker: StartWorker) -> None:
    a = mailworker.send(to="x@example.com", text="x", idempotency_key="order-42")
    b = mailworker.send(to="x@example.com", text="x", idempotency_key="order-42")
    assert a == b
    start_worker()
    mw.final([a])
    assert len(mw.server.messages) == 1
