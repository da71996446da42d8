"""The Procfile's commands start against a real Redis and stop cleanly on SIGTERM.

Each process type is run the way a Procfile runner (or Kubernetes, or systemd with
KillMode=mixed) runs it: one process, SIGTERM to its main pid, then a deadline. The test's
own queues replace the Procfile's `-Q transactional,bulk`, so nothing here touches queues
another test or a real deployment uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until

from ._files import ROOT, procfile

pytestmark = pytest.mark.integration

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# What each process type logs once it is up (Celery's banner line; our structlog event).
READY = {"worker": b"ready.", "scheduler": b"scheduler.started"}


def resolve(argv: list[str]) -> list[str]:
    """`mailworker` as installed beside this interpreter, else run the module directly."""
    assert argv[0] == "mailworker"
    script = Path(sys.executable).parent / "mailworker"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "mailworker.cli.main"]
    return [*head, *argv[1:]]


def with_test_queues(argv: list[str], queues: str) -> list[str]:
    out = list(argv)
    if "-Q" in out:
        out[out.index("-Q") + 1] = queues
    return out


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:  # a failed test must not leave its processes behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_and_stop(name: str, env: dict[str, str], log: Path,
                 started: list[subprocess.Popen[bytes]]) -> tuple[int, str]:
    argv = with_test_queues(resolve(procfile()[name]), env["MW_TEST_QUEUES"])
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started.append(proc)
    wait_until(lambda: READY[name] in log.read_bytes() or proc.poll() is not None,
               START_TIMEOUT, message=f"{name} to start (log: {log})")
    assert proc.poll() is None, f"{name} exited early ({proc.returncode}):\n{log.read_text()}"
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not stop within {STOP_TIMEOUT}s of SIGTERM:\n{log.read_text()}")
    return code, log.read_text()


def test_procfile_worker_starts_and_stops(mw_env: dict[str, str], tmp_path: Path,
                                          processes: list[subprocess.Popen[bytes]]) -> None:
    # A worker needs a relay to start (it would otherwise only defer mail); none is used here.
    env = dict(mw_env, MAILWORKER_RELAY_DEFAULT="smtp://127.0.0.1:2525")
    code, log = run_and_stop("worker", env, tmp_path / "worker.log", processes)
    # Celery's warm shutdown exits 0 once running tasks are done.
    assert code == 0, f"worker exited {code} after SIGTERM:\n{log}"
    assert "Traceback" not in log, log


def test_procfile_scheduler_starts_and_stops(mw_env: dict[str, str], tmp_path: Path,
                                             processes: list[subprocess.Popen[bytes]]) -> None:
    code, log = run_and_stop("scheduler", mw_env, tmp_path / "scheduler.log", processes)
    assert code == 0, f"scheduler exited {code} after SIGTERM:\n{log}"
    assert "scheduler.stopped" in log, log
