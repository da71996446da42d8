"""systemd units, the Dockerfile and the Procfile, read as text (no systemd or Docker needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mailworker.celery_app import celery_config
from mailworker.config import Settings, load_settings

from ._files import DEPLOY, ROOT, dockerfile, procfile, unit

SYSTEMD = DEPLOY / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
             "ProtectHome": "yes", "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes"}


def test_both_units_exist() -> None:
    assert {p.name for p in UNITS} == {"mailworker-worker@.service",
                                       "mailworker-scheduler.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_runs_mailworker(path: Path) -> None:
    service = unit(path)["Service"]
    argv = service["ExecStart"].split()
    assert Path(argv[0]).name == "mailworker" and Path(argv[0]).is_absolute()
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "always"
    assert service["EnvironmentFile"] == "/etc/mailworker/env"
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{path.name}: {key}={value} missing"
    assert "Install" in unit(path)


def test_worker_unit_drains() -> None:
    service = unit(SYSTEMD / "mailworker-worker@.service")["Service"]
    argv = service["ExecStart"].split()
    assert argv[1:] == ["worker", "--no-scheduler", "-Q", "%i"]
    assert service["KillMode"] == "mixed", "SIGTERM to Celery's main process only"
    stop = int(service["TimeoutStopSec"])
    production = load_settings(ROOT / "config" / "production.toml", environ={
        "MAILWORKER_SMTP_PASSWORD": "x", "MAILWORKER_BULK_SMTP_PASSWORD": "x"})
    for settings in (Settings(), production):
        # Above the configured limit, not only the effective (lease-capped) one.
        assert stop > settings.task_time_limit
        assert stop > celery_config(settings)["task_time_limit"]


def test_scheduler_unit() -> None:
    service = unit(SYSTEMD / "mailworker-scheduler.service")["Service"]
    assert service["ExecStart"].split()[1:] == ["scheduler"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for path in UNITS:
        shutil.copy(path, tmp_path / path.name)
    instance = tmp_path / "mailworker-worker@transactional.service"
    instance.symlink_to(tmp_path / "mailworker-worker@.service")
    for name in ("mailworker-worker@transactional.service", "mailworker-scheduler.service"):
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60, check=False)
        # The one expected complaint: /opt/mailworker is not installed on this machine.
        problems = [line for line in (result.stdout + result.stderr).splitlines()
                    if line.strip() and "is not executable" not in line]
        assert not problems, f"{name}:\n" + "\n".join(problems)


def test_dockerfile() -> None:
    steps = dockerfile()
    words = [w for w, _ in steps]
    args = dict(reversed(steps))  # first occurrence of each instruction
    assert args["FROM"] == "python:3.11-slim"
    users = [a for w, a in steps if w == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), (
        "USER must come after the last RUN, so the installed image runs unprivileged")
    assert "pip install ." in " ".join(a for w, a in steps if w == "RUN")
    entry = dict(steps)["ENTRYPOINT"]
    assert entry.startswith("[") and '"mailworker"' in entry
    assert dict(steps)["CMD"] == '["worker"]'
    assert dict(steps)["STOPSIGNAL"] == "SIGTERM"
    assert "HEALTHCHECK" not in words


def test_procfile() -> None:
    processes = procfile()
    assert processes == {
        "worker": ["mailworker", "worker", "--no-scheduler", "-Q", "transactional,bulk"],
        "scheduler": ["mailworker", "scheduler"],
    }
