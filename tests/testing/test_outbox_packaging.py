"""What an app gets from ``pip install mailworker``: the test kit needs no test-only
packages, the pytest fixture is registered by the package's entry point, and the demo
runs without trustme."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailworker.testing.polling import free_port
from tests.conftest import ROOT

# Installed by the project's own [test] extra but not by `pip install mailworker`.
NOT_RUNTIME = ["trustme", "cryptography", "fakeredis", "hypothesis", "yaml", "django", "flask",
               "pytest", "_pytest"]

BLOCKER = f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_RUNTIME!r}:
            raise ImportError(f"{{name}} is not a runtime dependency")

sys.meta_path.insert(0, Block())
"""


def python(code: str, env: dict[str, str] | None = None,
           cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env, check=False)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    return env | extra


def test_testing_kit_imports_only_runtime_dependencies() -> None:
    p = python(BLOCKER + """
import mailworker.testing
from mailworker.testing import SMTPTestServer, record_messages
with SMTPTestServer() as server:  # plain SMTP needs no trustme
    pass
try:
    SMTPTestServer(tls="starttls")
except ImportError as exc:
    print(exc)
""")
    assert p.returncode == 0, p.stderr
    assert "pip install 'mailworker[testing]'" in p.stdout


def test_outbox_works_with_only_runtime_dependencies() -> None:
    env = clean_env(MAILWORKER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                    MAILWORKER_RELAY_DEFAULT="smtp://mail.example.test:25")
    p = python(BLOCKER + """
import mailworker
from mailworker.testing import record_messages
with record_messages() as outbox:
    mid = mailworker.send(to="a@example.com", sender="app@example.com", text="hi")
assert [m.id for m in outbox] == [mid], outbox.messages
print("ok")
""", env)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_demo_runs_without_trustme() -> None:
    p = python("import sys; sys.modules['trustme'] = None\n"
               "from mailworker.cli.main import main\nsys.exit(main(['demo', '-n', '1']))",
               clean_env())
    assert p.returncode == 0, p.stdout + p.stderr
    assert "delivered" in p.stdout


def test_pytest_fixture_comes_from_the_entry_point(tmp_path: Path) -> None:
    (tmp_path / "test_app.py").write_text(
        "import mailworker\n\n"
        "def test_welcome(mailworker_outbox):\n"
        "    mailworker.send(to='a@example.com', sender='app@example.com', subject='Hi',\n"
        "                    text='x')\n"
        "    assert [m.subject for m in mailworker_outbox] == ['Hi']\n")
    env = clean_env(MAILWORKER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                    MAILWORKER_RELAY_DEFAULT="smtp://mail.example.test:25")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "test_app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout
