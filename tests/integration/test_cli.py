"""The `mailworker` command: every subcommand, good input and bad, as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from mailworker.store import MessageState
from mailworker.testing import Fault, SMTPTestServer
from tests.conftest import ROOT, WorkerProcess, free_port, wait_until
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def run(env: dict[str, str], *args: str, stdin: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailworker.cli.main", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          input=stdin, check=False)


def assert_one_line_error(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("mailworker: error: ") and len(lines) <= 2, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_send_status_and_bad_input(mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    sent = run(mw.env, "send", "--to", "a@example.com", "--subject", "hi", "--text", "-",
               stdin="body from stdin\n")
    assert sent.returncode == 0, sent.stderr
    mid = sent.stdout.strip()
    st = run(mw.env, "status", mid, "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] in {"queued", "sending",
                                                                      "delivered"}
    start_worker()
    mw.final([mid])
    st = run(mw.env, "status", mid)
    assert st.returncode == 0 and "delivered" in st.stdout and "a@example.com" in st.stdout

    before = mw.store.counts()
    assert_one_line_error(run(mw.env, "send", "--to", "bob@", "--text", "x"), 2, "to[0]",
                          "nothing was queued")
    assert_one_line_error(run(mw.env, "send", "--to", "a@example.com", "--text", "x",
                              "--relay", "nope"), 3, "unknown relay 'nope'")
    assert_one_line_error(run(mw.env, "send", "--to", "a@example.com", "--subject",
                              "x\r\nBcc: victim@example.com", "--text", "x"), 2)
    assert mw.store.counts() == before  # nothing accepted by the bad calls
    assert_one_line_error(run(mw.env, "status", "0" * 32), 1, "no message")


def test_dlq_show_purge_and_filters(mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    mw.server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="gone@"))
    start_worker()
    ids = [run(mw.env, "send", "--to", f"gone@{d}", "--text", "x").stdout.strip()
           for d in ("a.example", "b.example")]
    mw.final(ids)
    shown = run(mw.env, "dlq", "show", ids[0])
    assert shown.returncode == 0 and "550" in shown.stdout and "history" in shown.stdout
    listed = json.loads(run(mw.env, "dlq", "list", "--domain", "a.example", "--json").stdout)
    assert [r["id"] for r in listed] == [ids[0]]
    assert_one_line_error(run(mw.env, "dlq", "purge"), 2, "--all")
    assert_one_line_error(run(mw.env, "dlq", "list", "--older-than", "soon"), 2)
    dry = run(mw.env, "dlq", "purge", "--all", "--dry-run", "--json")
    assert sorted(json.loads(dry.stdout)["ids"]) == sorted(ids)
    assert mw.store.counts()["dead"] == 2
    purged = run(mw.env, "dlq", "purge", "--domain", "b.example")
    assert purged.returncode == 0 and "1 dead letter(s) purged" in purged.stdout
    assert mw.store.get(ids[1]) is None and mw.store.get(ids[0]) is not None


def test_stats(mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker()
    mid = run(mw.env, "send", "--to", "a@example.com", "--text", "x").stdout.strip()
    mw.final([mid])
    snap = json.loads(run(mw.env, "stats", "--json").stdout)
    assert snap["relays"]["default"]["delivered"] == 1
    assert snap["dead"] == 0
    text = run(mw.env, "stats")
    assert text.returncode == 0 and "default" in text.stdout


def test_check_good_bad_and_malformed(mw: Env) -> None:
    ok = run(mw.env, "check")
    assert ok.returncode == 0 and "relay 'default' OK" in ok.stdout and "EHLO" in ok.stdout
    with SMTPTestServer(tls="starttls") as tls:
        untrusted = tls.dsn().split("?")[0]  # without the test CA
        assert_one_line_error(run(mw.env, "check", untrusted), 1, "failed at tls")
    assert_one_line_error(run(mw.env, "check", "smtp://host:99999"), 3, "port")
    assert_one_line_error(run(mw.env, "check", "nosuchrelay"), 3, "unknown relay")
    closed = f"smtp://127.0.0.1:{free_port()}?connect_timeout=2"
    assert_one_line_error(run(mw.env, "check", closed), 1, "failed at connect")


def test_redis_unreachable_is_one_line(mw: Env) -> None:
    env = dict(mw.env, MAILWORKER_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    for args in (("send", "--to", "a@example.com", "--text", "x"), ("status", "x"),
                 ("dlq", "list"), ("stats",), ("worker",)):
        assert_one_line_error(run(env, *args), 4, "cannot reach Redis")


def test_bad_config_and_queue(mw: Env, tmp_path: object) -> None:
    env = dict(mw.env, MAILWORKER_RELAY_DEFAULT="http://nope")
    assert_one_line_error(run(env, "stats"), 3, "scheme 'http'")
    assert_one_line_error(run(mw.env, "worker", "-Q", "nope"), 3, "unknown queue")


def test_worker_scheduler_retries_then_delivers(mw: Env,
                                                start_worker: Callable[..., WorkerProcess]) -> None:
    mw.server.add_fault(Fault.reply("RCPT", 451, "4.7.1 Greylisted", times=1))
    start_worker()
    mid = run(mw.env, "send", "--to", "grey@example.com", "--text", "x").stdout.strip()
    wait_until(lambda: (r := mw.store.get(mid)) is not None and r.state is MessageState.DELIVERED,
               30, message="greylisted message delivered by the embedded scheduler")


def test_demo_runs_and_summarises() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    p = run(env, "demo", "-n", "60", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = p.stdout.split("\nsummary\n", 1)[1].split("\n\n", 1)[0]
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1)
                for line in summary.splitlines()[2:])
    assert rows["messages"] == "60"
    assert rows["delivered"] == "59"
    assert rows["dead-lettered"] == "1"
    assert rows["not final"] == "0"
    assert rows["greylisted message"] == "delivered after 2 attempts"
    assert rows["refused message"].startswith("dead: nobody@example.org: 550 5.1.1")
    assert '"code": 451' in p.stdout  # the reply log shows the greylisting


def test_worker_restarts_a_crashed_celery_child(mw: Env,
                                                start_worker: Callable[..., WorkerProcess]) -> None:
    w = start_worker()
    child = int(subprocess.run(["pgrep", "-P", str(w.proc.pid)], capture_output=True,
                               text=True, check=True).stdout.split()[0])
    os.kill(child, 9)  # the Celery process dies; the supervisor must start another
    mid = run(mw.env, "send", "--to", "a@example.com", "--text", "x").stdout.strip()
    mw.final([mid], timeout=60)
    assert b"worker.crashed" in w.log.read_bytes()
    assert w.proc.poll() is None


# --- issue 10 / S2-10: what the operator sees ------------------------------------------------

HOSTILE = "5.1.1 \x1b[2J\x1b[H\x1b]0;pwned-title\x07\x1b[32mAll messages delivered OK\x1b[0m"


def assert_terminal_safe(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, (p.stdout, p.stderr)
    for stream in (p.stdout, p.stderr):
        assert "\x1b" not in stream and "\x07" not in stream and "pwned-title" not in stream


def test_s2_10_relay_text_reaches_the_terminal_cleaned(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    """A relay's reply text with escape sequences, through status, dlq list/show and check;
    also the RCPT-level dead letters --exception finds, and why a message waits."""
    mw.server.add_fault(Fault.reply("RCPT", 550, HOSTILE, match="gone@"))
    mw.server.add_fault(Fault.reply("NOOP", 250, HOSTILE))
    start_worker()
    dead = run(mw.env, "send", "--to", "gone@a.example", "--text", "x").stdout.strip()
    partial = run(mw.env, "send", "--to", "ok@example.com", "--to", "gone@b.example",
                  "--text", "x").stdout.strip()
    # Queued for a relay this shell knows and the worker does not: it waits, and says why.
    producer = dict(mw.env, MAILWORKER_RELAY_ELSEWHERE=f"smtp://127.0.0.1:{free_port()}")
    waiting = run(producer, "send", "--relay", "elsewhere", "--to", "a@example.com",
                  "--text", "x").stdout.strip()
    mw.final([dead, partial])
    wait_until(lambda: (r := mw.store.get(waiting)) is not None and r.last_error, 30,
               message="the worker to hold the message for the unknown relay")

    for args in (("status", dead), ("dlq", "list"), ("dlq", "show", dead), ("check",),
                 ("status", partial)):
        p = run(mw.env, *args)
        assert_terminal_safe(p)
        assert "All messages delivered OK" in p.stdout or args == ("dlq", "list")
    # One attempt count for a message and its delivered recipient.
    shown = run(mw.env, "status", partial).stdout
    assert "attempts 1" in shown
    assert re.search(r"ok@example\.com\s+delivered\s+250.*\s1$", shown, re.M), shown
    held = run(mw.env, "status", waiting)
    assert held.returncode == 0 and "waiting  unknown relay 'elsewhere'" in held.stdout

    def listed(*flt: str) -> set[str]:
        p = run(mw.env, "dlq", "list", "--json", *flt)
        assert p.returncode == 0, p.stderr
        return {r["id"] for r in json.loads(p.stdout)}

    assert listed("--exception", "SMTPRecipientsRefused") == {dead, partial}
    assert listed("--exception", "smtplib.SMTPRecipientsRefused") == {dead, partial}
    assert listed("--exception", "SMTPDataError") == set()


def test_stats_lists_every_relay_in_redis_with_pause_time_left(mw: Env) -> None:
    # Relays only some worker knows: counters and a pause written by "another" worker.
    mw.store.redis.hincrby(mw.store.key("stats", "backup"), "delivered", 3)
    mw.store.pause_relay("backup", 125, "535 5.7.8 auth failed \x1b[31m(check password)")
    mw.store.pause_relay("paused-only", 30, "certificate not trusted")
    snap = json.loads(run(mw.env, "stats", "--json").stdout)
    assert snap["relays"]["backup"]["delivered"] == 3
    assert set(snap["relays"]) >= {"backup", "paused-only", "default"}
    assert 100 < snap["paused"]["backup"]["seconds_left"] <= 125
    assert snap["paused"]["paused-only"]["reason"] == "certificate not trusted"
    assert "default" not in snap["paused"]
    text = run(mw.env, "stats")
    assert_terminal_safe(text)
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("backup"))
    assert re.search(r"paused, 2m0\ds left: 535 5\.7\.8 auth failed", line), line


def test_worker_without_relay_refuses_unless_allowed(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    env = {k: v for k, v in mw.env.items() if not k.startswith("MAILWORKER_RELAY_")}
    p = run(env, "worker", "-Q", env["MW_TEST_QUEUES"])
    assert_one_line_error(p, 3, "no relay is configured", "--allow-no-relay")
    w = start_worker("--allow-no-relay", env=env)  # starts, and says ready
    assert w.proc.poll() is None


def test_stats_shows_each_relays_window_slots_and_rate(mw: Env) -> None:
    # A relay only the workers know: two slots held, its window grown to 3, a rate learned.
    relays = mw.store.relays
    for token in ("a", "b"):
        relays.take_slot("elsewhere", token, ceiling=8, initial=2, hold_seconds=60)
    common = {"ceiling": 8, "initial": 2, "regrow_after": 60, "rate_ceiling": None,
              "rate_floor": 1}
    relays.feedback("elsewhere", "ok", accepted=2, **common)
    relays.feedback("elsewhere", "slow", **common)
    snap = json.loads(run(mw.env, "stats", "--json").stdout)
    # The rate: 0.7 x the 2 transactions seen in the first second.
    assert snap["limits"]["elsewhere"] == {"window": 3, "slots_in_use": 2, "rate": 1.4}
    assert snap["limits"]["default"] == {"window": None, "slots_in_use": 0, "rate": None}
    line = next(ln for ln in run(mw.env, "stats").stdout.splitlines()
                if ln.startswith("elsewhere"))
    assert re.search(r"\b2/3\s+1\.4/s\b", line), line
