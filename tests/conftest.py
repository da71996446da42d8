"""Shared fixtures: a private Redis server, and real `mailworker worker` processes.

Integration tests never share state with the machine's Redis on 6379: the session gets
its own `redis-server` on a free port, and each test its own key prefix and queue names.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailworker.testing.polling import free_port, stop_group, wait_until

ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A redis-server subprocess on a free port; restartable (persistence tests)."""

    def __init__(self, tmp: Path, appendonly: bool = False) -> None:
        self.port = free_port()
        self.dir = tmp
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed (run scripts/system-deps)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.dir),
             "--appendfsync", "always"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, message="redis-server to start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


class WorkerProcess:
    """A real `mailworker worker` subprocess, with its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path, args: list[str]) -> None:
        self.log = log
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailworker.cli.main", "worker", *args],
            env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: b"ready." in self.log.read_bytes() or self.proc.poll() is not None,
                   timeout, message=f"worker to be ready (log: {self.log})")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and any children)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_group(self.proc)
        self._fh.close()


@pytest.fixture
def mw_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for a test's producer and workers: own prefix, own queues."""
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env.update({
        "MAILWORKER_REDIS_URL": redis_url,
        "MAILWORKER_KEY_PREFIX": f"t{tag}",
        "MAILWORKER_TICK_INTERVAL": "0.2",
        "MAILWORKER_STUCK_AFTER": "5",
        "MAILWORKER_LOG_FORMAT": "json",
        "MAILWORKER_DEFAULT_SENDER": "app@example.com",
        "PYTHONPATH": str(ROOT),
    })
    cfg = tmp_path / "mailworker.toml"
    cfg.write_text(
        f'default_queue = "tx{tag}"\n'
        f'[queues.tx{tag}]\nlifetime = "1h"\n'
        f'[queues.bulk{tag}]\nlifetime = "1h"\n'
        '[retry]\nbackoff = { initial = "1s", factor = 1, maximum = "1s", jitter = 0 }\n'
        'relay_backoff = { initial = "1s", factor = 1, maximum = "1s", jitter = 0 }\n'
        'probe_interval = "1s"\n'
    )
    env["MAILWORKER_CONFIG"] = str(cfg)
    env["MW_TEST_QUEUES"] = f"tx{tag},bulk{tag}"
    return env


@pytest.fixture
def start_worker(mw_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> WorkerProcess:
        e = dict(env or mw_env)
        queue_args = ["-Q", e["MW_TEST_QUEUES"]] if "-Q" not in args else []
        w = WorkerProcess(e, tmp_path / f"worker{len(workers)}.log", [*queue_args, *args])
        workers.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in workers:
        w.stop()
