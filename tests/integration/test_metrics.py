"""/metrics, /healthz and /readyz of real `mailworker worker` and `mailworker scheduler`
processes: the counters match the records exactly; health follows Redis."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mailworker
from mailworker.metrics import metric_names
from mailworker.store import MessageState
from mailworker.testing import Fault
from mailworker.testing.polling import free_port
from tests.conftest import ROOT, RedisServer, WorkerProcess, stop_group, wait_until

from .conftest import Env

pytestmark = [pytest.mark.integration]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, lab), v in found.items()
               if n == name and all((k, val) in lab for k, val in labels.items()))


@pytest.fixture
def start_scheduler(mw_env: dict[str, str], tmp_path: Path
                    ) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"scheduler{len(procs)}.log").open("ab")
        p = subprocess.Popen([sys.executable, "-m", "mailworker.cli.main", "scheduler", *args],
                             env=env or mw_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        stop_group(p)


def test_metrics_match_the_records(mw: Env, start_worker: Callable[..., WorkerProcess],
                                   start_scheduler: Callable[..., subprocess.Popen[bytes]]
                                   ) -> None:
    mw.server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="gone"))
    mw.server.add_fault(Fault.reply("RCPT", 451, "4.7.1 Try later", match="slow", times=3))
    ids = mailworker.send_many(
        [{"to": f"ok{i}@example.com", "text": "hi"} for i in range(12)]
        + [{"to": [f"gone{i}@example.com"], "text": "hi"} for i in range(3)]
        + [{"to": [f"slow{i}@example.com", f"also{i}@example.com"], "text": "hi"}
           for i in range(2)])
    wport, sport = free_port(), free_port()
    start_worker("--no-scheduler", "--metrics-port", str(wport))
    sched = start_scheduler("--metrics-port", str(sport))
    wait_until(lambda: get(sport, "/readyz")[0] == 200 and get(wport, "/readyz")[0] == 200,
               30, message="both metrics ports ready")

    recs = mw.final(ids, timeout=60)
    by_state = {s: sum(r.state is s for r in recs) for s in MessageState}
    assert by_state[MessageState.DELIVERED] == 14 and by_state[MessageState.DEAD] == 3
    stored = mw.store.relay_stats()["default"]
    assert stored.get("deferred", 0) >= 1, stored  # the 451s deferred something

    found = samples(wport)
    assert {n for n, _ in found} <= metric_names() | {
        n for n, _ in found if not n.startswith("mailworker_")}
    assert total(found, "mailworker_messages_total", state="delivered") == 14
    assert total(found, "mailworker_messages_total", state="dead") == 3
    assert total(found, "mailworker_messages_total", state="deferred") == stored["deferred"]
    delivered_rcpts = sum(rc.state.value == "delivered" for r in recs for rc in r.recipients)
    assert total(found, "mailworker_recipients_total", state="delivered") == delivered_rcpts
    assert total(found, "mailworker_recipients_total", state="failed") == 3
    assert total(found, "mailworker_delivery_seconds_count") == 14
    attempts = sum(len(r.history) for r in recs)
    assert total(found, "mailworker_smtp_transaction_seconds_count") == attempts
    # Each recipient's RCPT reply was counted, by class: 3 x 550, 3 x 451.
    assert total(found, "mailworker_smtp_replies_total", stage="rcpt", **{"class": "5xx"}) == 3
    assert total(found, "mailworker_smtp_replies_total", stage="rcpt", **{"class": "4xx"}) == 3
    assert total(found, "mailworker_smtp_replies_total", stage="dot", **{"class": "2xx"}) >= 14

    # The fleet gauges, from the scheduler's port: read from Redis at scrape time.
    def settled() -> bool:
        g = samples(sport)
        return (total(g, "mailworker_in_flight") == 0
                and total(g, "mailworker_dead_letters") == 3
                and total(g, "mailworker_deferred") == 0)

    wait_until(settled, 15, message="the scheduler's gauges to show the final counts")
    g = samples(sport)
    assert total(g, "mailworker_redis_up") == 1
    assert total(g, "mailworker_relay_paused", relay="default") == 0
    assert get(sport, "/healthz")[0] == 200
    assert sched.poll() is None


def test_healthz_follows_redis(tmp_path: Path, mw_env: dict[str, str],
                               start_worker: Callable[..., WorkerProcess]) -> None:
    own = RedisServer(tmp_path)
    own.start()
    try:
        env = {**mw_env, "MAILWORKER_REDIS_URL": own.url,
               "MAILWORKER_RELAY_DEFAULT": "smtp://127.0.0.1:9"}
        port = free_port()
        start_worker("--metrics-port", str(port), env=env)
        wait_until(lambda: get(port, "/readyz")[0] == 200, 30, message="ready")
        assert get(port, "/healthz") == (200, "ok\n")
        own.stop()
        wait_until(lambda: get(port, "/healthz")[0] == 503, 15, message="unhealthy")
        assert get(port, "/readyz")[0] == 503
        own.start()
        wait_until(lambda: get(port, "/healthz")[0] == 200, 15, message="healthy again")
    finally:
        own.stop()
