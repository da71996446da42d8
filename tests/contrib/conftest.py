"""Fixtures for the framework integrations: a test SMTP server and a worker environment."""

from __future__ import annotations

import email
import email.policy
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailworker.runtime import get_runtime, reset_runtime
from mailworker.testing import SMTPTestServer
from tests.conftest import ROOT, stop_group, wait_until

# The example projects are what the tests drive: make them importable (mailshop, flaskshop).
EXAMPLES = ROOT / "examples"
for project in ("django_app", "flask_app"):
    if str(EXAMPLES / project) not in sys.path:
        sys.path.insert(0, str(EXAMPLES / project))


@pytest.fixture(autouse=True)
def _fresh_runtime() -> Iterator[None]:
    """Each test configures the process runtime its own way; leave none behind."""
    yield
    reset_runtime()


@pytest.fixture
def smtp_server() -> Iterator[SMTPTestServer]:
    server = SMTPTestServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def worker_env(mw_env: dict[str, str], smtp_server: SMTPTestServer) -> dict[str, str]:
    """mw_env with the default relay pointing at the test SMTP server."""
    return dict(mw_env, MAILWORKER_RELAY_DEFAULT=smtp_server.dsn())


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def queue_names(env: dict[str, str]) -> tuple[str, str]:
    """(transactional, bulk) queue names of this test (see tests/conftest.py mw_env)."""
    tx, bulk = env["MW_TEST_QUEUES"].split(",")
    return tx, bulk


def store_keys(prefix: str) -> list[bytes]:
    return sorted(get_runtime().redis.keys(f"{prefix}:m:*"))


@contextmanager
def framework_worker(argv: list[str], env: dict[str, str], log: Path,
                     cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """A worker started through a framework (``manage.py mailworker worker``, ``flask
    mailworker worker``), ready inside the block and stopped (warm, then killed) after."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: b"ready." in log.read_bytes() or proc.poll() is not None, 30,
                   message=f"{' '.join(argv[1:4])} to be ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield proc
    finally:
        stop_group(proc)
