"""Fast CLI checks: terminal-safe output (S2-10), --version, python -m, broken pipes, describe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mailworker import __version__
from mailworker.cli.output import clean, table
from mailworker.policy import Policy
from tests.conftest import ROOT

HOSTILE = ("550 5.1.1 \x1b[2J\x1b[H\x1b]0;pwned-title\x07\x1b[32mAll messages delivered OK"
           "\x1b[0m\x9b31m \x1bP+q\x1b\\ bell\x07 nul\x00 del\x7f \u202eevil")


def test_s2_10_clean_removes_sequences_and_escapes_controls() -> None:
    out = clean(HOSTILE)
    assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in out)
    assert "pwned-title" not in out  # the whole OSC string goes, not just its introducer
    # What was text stays readable; lone controls stay visible as escapes.
    assert out.startswith("550 5.1.1 All messages delivered OK")
    assert "bell\\x07" in out and "nul\\x00" in out and "del\\x7f" in out and "\\u202eevil" in out
    assert clean("line one\n\tline two") == "line one\n\tline two"
    assert clean("line one\n\tline two", newlines=False) == "line one  line two"
    assert clean("Grüße, 日本語 ✓") == "Grüße, 日本語 ✓"  # printable Unicode is untouched


def test_s2_10_table_cells_are_one_clean_line() -> None:
    text = table(["a", "reply"], [("x", HOSTILE), ("y", "two\nlines")])
    assert "\x1b" not in text and "\x07" not in text
    assert len(text.splitlines()) == 4  # header, rule, two rows: no cell broke a line


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False, env=env)


def test_version_and_python_dash_m() -> None:
    for args in (("-m", "mailworker", "--version"), ("-m", "mailworker.cli.main", "--version")):
        p = run(*args)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == f"mailworker {__version__}"
    p = run("-m", "mailworker", "--help")
    assert p.returncode == 0 and p.stdout.startswith("usage: mailworker")


def test_policy_describe_shows_the_whole_table() -> None:
    rows = Policy().describe()
    assert isinstance(rows, list) and rows[0]["name"] == "too-many-recipients"  # still data
    lines = repr(rows).splitlines()
    assert lines[0].split()[:3] == ["name", "exception", "codes"]
    assert [line.split()[0] for line in lines[1:]] == [r["name"] for r in rows]
    assert str(rows) == repr(rows)
    p = run("-c", "from mailworker.policy import Policy; print(Policy().describe())")
    assert p.returncode == 0 and len(p.stdout.splitlines()) == len(rows) + 1


@pytest.mark.parametrize("lines", [1, 0])
def test_broken_pipe_exits_quietly(lines: int) -> None:
    """`mailworker ... | head` (here: a reader that closes after *lines* lines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    # Enough output to overflow the pipe, so the write really meets the closed end.
    code = ("import sys; from mailworker.cli import main as m, commands as c;"
            "c.stats = lambda a: [print('x' * 100) for _ in range(20000)] and 0;"
            "m.commands.stats = c.stats;"
            "sys.exit(m.main(['stats']))")
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        assert p.stdout is not None and p.stderr is not None
        for _ in range(lines):
            p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read()
        code_ = p.wait(60)
    assert code_ == 0, err
    assert "BrokenPipe" not in err and "Traceback" not in err and err == ""


def test_json_output_escapes_controls(capsys: pytest.CaptureFixture[str]) -> None:
    # print_json is what --json uses: control characters arrive as \u escapes.
    from mailworker.cli.output import print_json

    print_json({"text": HOSTILE})
    data = capsys.readouterr().out
    assert "\x1b" not in data and json.loads(data)["text"] == HOSTILE
