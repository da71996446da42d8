"""``mailworker demo -n N``: exactly N messages, with a showcase that fits N.

Run as a subprocess, as a user runs it (the demo configures structlog and the runtime for
its whole process).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mailworker.demo import GREYLISTED, REFUSED, demo_batch
from tests.conftest import ROOT


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    return subprocess.run([sys.executable, "-m", "mailworker.cli.main", "demo", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def summary_rows(stdout: str) -> dict[str, str]:
    summary = stdout.split("\nsummary\n", 1)[1].split("\n\n", 1)[0]
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1)
                for line in summary.splitlines()[2:])


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_demo_batch_has_exactly_n_messages(n: int) -> None:
    batch = demo_batch(n)
    assert len(batch) == n
    targets = [item["to"] for item in batch]
    assert (GREYLISTED in targets) == (n >= 2)
    assert (REFUSED in targets) == (n >= 3)


def test_demo_with_one_message_queues_one_and_delivers_it() -> None:
    p = run_demo("-n", "1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "enqueued 1 messages" in p.stdout
    rows = summary_rows(p.stdout)
    assert (rows["messages"], rows["delivered"], rows["dead-lettered"]) == ("1", "1", "0")
    assert "greylisted message" not in rows and "refused message" not in rows


def test_demo_with_three_messages_shows_retry_and_dead_letter() -> None:
    p = run_demo("-n", "3")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = summary_rows(p.stdout)
    assert (rows["messages"], rows["delivered"], rows["dead-lettered"]) == ("3", "2", "1")
    assert rows["greylisted message"] == "delivered after 2 attempts"
    assert rows["refused message"].startswith("dead: nobody@example.org: 550 5.1.1")
    assert p.stdout.rstrip().endswith("stopping the worker...")


def test_demo_refuses_zero_messages_with_a_hint() -> None:
    p = run_demo("-n", "0")
    assert p.returncode == 2
    assert "at least 1 message" in p.stderr and "Traceback" not in p.stderr
