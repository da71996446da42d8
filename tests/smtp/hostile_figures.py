"""Figures for S2-02: how long a hostile relay holds the calling thread, and peak memory.

Run: ``.venv/bin/python -m tests.smtp.hostile_figures``

The test server (with a hostile fault) runs in this process; each case's client runs in
a fresh subprocess, so its peak RSS (``VmHWM``) is the client's alone. The relay
options are the review's (``timeout=2``, ``deadline=6``) plus ``setup_timeout=5``.
A "baseline" row (a healthy session) shows what the interpreter and imports cost.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

from mailworker.testing import Fault, SMTPTestServer

OPTIONS = {"timeout": 2, "connect_timeout": 3, "setup_timeout": 5, "deadline": 6}
# name: (fault, extras, what the client does); extras: "user" (AUTH), "tls" (STARTTLS
# server), or relay option overrides.
CASES: dict[str, tuple[Fault | None, dict[str, object], str]] = {
    "baseline (healthy)": (None, {}, "send"),
    "greeting: 220- lines forever": (Fault.endless("GREETING", code=220), {}, "open"),
    "greeting: never sent": (Fault.hang("GREETING"), {}, "open"),
    "EHLO: 250- lines forever": (Fault.endless("EHLO"), {}, "open"),
    "EHLO: one byte per 0.5 s": (Fault.trickle("EHLO", seconds=0.5), {}, "open"),
    "EHLO: a byte per 0.5 s, timeout=30": (Fault.trickle("EHLO", seconds=0.5),
                                            {"timeout": 30}, "open"),
    "EHLO: 100 kB line": (Fault.overlong("EHLO"), {}, "open"),
    "EHLO: never answered": (Fault.hang("EHLO"), {}, "open"),
    "STARTTLS: never answered": (Fault.hang("STARTTLS"), {"tls": True}, "open"),
    "AUTH: 334- lines forever": (Fault.endless("AUTH", code=334), {"user": "u"}, "open"),
    "AUTH: never answered": (Fault.hang("AUTH"), {"user": "u"}, "open"),
    "NOOP: 250- lines forever": (Fault.endless("NOOP"), {}, "noop"),
    "NOOP: never answered": (Fault.hang("NOOP"), {}, "noop"),
    "QUIT: 221- lines forever": (Fault.endless("QUIT", code=221), {}, "quit"),
    "QUIT: one byte per 0.5 s": (Fault.trickle("QUIT", seconds=0.5, code=221), {}, "quit"),
    "MAIL: 250- lines forever": (Fault.endless("MAIL"), {}, "send"),
    "MAIL: one byte per 0.5 s": (Fault.trickle("MAIL", seconds=0.5), {}, "send"),
    "after the dot: 250- lines forever": (Fault.endless("DOT"), {}, "send"),
    "after the dot: one byte per 0.5 s": (Fault.trickle("DOT", seconds=0.5), {}, "send"),
}

CHILD = """
import json, sys, time
from mailworker.relay import parse_relay
from mailworker.smtp import Connection, Envelope
from mailworker.smtp.errors import failure_of
relay = parse_relay("hostile", sys.argv[1])
action = sys.argv[2]
conn = Connection(relay)
env = Envelope("s@example.test", ("r@example.test",), b"Subject: x\\r\\n\\r\\nhi\\r\\n")
error, stage = None, None
started = time.monotonic()
try:
    if action != "open":
        conn.open()
        started = time.monotonic()
    if action == "open":
        conn.open()
    elif action == "noop":
        conn.noop()
    elif action == "send":
        conn.send(env)
    conn.close()
except Exception as exc:
    error, stage = type(exc).__name__, str(failure_of(exc).stage or "")
took = time.monotonic() - started
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
with open("/proc/self/status") as status:
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"took": took, "error": error, "stage": stage, "rss_kb": rss}))
"""


def run_case(fault: Fault | None, extras: dict[str, object], action: str) -> dict[str, object]:
    extras = dict(extras)
    user, tls = extras.pop("user", None), extras.pop("tls", False)
    with SMTPTestServer(auth={"u": "p"} if user else None,
                        tls="starttls" if tls else None) as server:
        if fault is not None:
            server.add_fault(fault)
        options: dict[str, Any] = {**OPTIONS, **extras, "allow_plain_auth": bool(user)}
        dsn = server.dsn(user=str(user) if user else None, password="p" if user else None,
                         **options)
        out = subprocess.run([sys.executable, "-c", CHILD, dsn, action], capture_output=True,
                             text=True, timeout=120, check=False)
    if out.returncode != 0:
        return {"error": f"child failed: {out.stderr[-300:]}"}
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    print(f"relay options: {OPTIONS}; python {sys.version.split()[0]}")
    print(f"{'server behaviour':38} {'call s':>7} {'peak RSS MB':>11}  error (stage)")
    for name, (fault, extras, action) in CASES.items():
        r = run_case(fault, extras, action)
        took = float(r.get("took", float("nan")))  # type: ignore[arg-type]
        rss = int(r.get("rss_kb", 0)) / 1024  # type: ignore[call-overload]
        err = f"{r.get('error')} ({r.get('stage')})" if r.get("error") else "-"
        print(f"{name:38} {took:7.2f} {rss:11.1f}  {err}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this process, with the servers: peak RSS {own:.1f} MB)")


if __name__ == "__main__":
    main()
