"""SMTP sinks for the SMTP benchmark, each in a process of its own.

The client being measured runs in the benchmark's process, and its CPU is read with
``time.process_time()``; a sink in the same process would have its CPU counted against
the client (and would compete with it for the GIL). So both sinks are child processes,
bound to 127.0.0.1, stopped by their own PID at the end:

* :class:`SmtpSink`: Postfix's ``smtp-sink`` (C, event-driven, PIPELINING, no size limit,
  throws the mail away). The 0 ms case: the server is not what gets measured.
* :class:`LatencySink`: ``mailworker.testing.SMTPTestServer(latency=...)`` (aiosmtpd behind
  a proxy that adds one round trip to every exchange). The 10 ms case.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from mailworker.testing.polling import free_port

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

__all__ = ["LatencySink", "SmtpSink", "free_port", "smtp_sink_path"]


def smtp_sink_path() -> str | None:
    return shutil.which("smtp-sink") or next(
        (p for p in ("/usr/sbin/smtp-sink", "/usr/lib/postfix/sbin/smtp-sink")
         if os.path.exists(p)), None)


def _cpu_seconds(pid: int) -> float:
    """user+sys CPU of one process so far, from /proc (0.0 where /proc is missing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


class _Child:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def _terminate(self, graceful_wait: float = 5.0) -> None:
        """Stop our own child by its PID: SIGTERM, then SIGKILL if it lingers."""
        proc = self.proc
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(graceful_wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        self._terminate()


def _wait_listening(child: _Child, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", child.port), timeout=1).close()
            return
        except OSError:
            if child.proc.poll() is not None or time.monotonic() > deadline:
                child.stop()
                raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{child.port}"
                                   ) from None
            time.sleep(0.02)


class SmtpSink(_Child):
    """Postfix's ``smtp-sink`` on a free port of 127.0.0.1 (backlog 256)."""

    def __init__(self, log_path: Path | None = None) -> None:
        exe = smtp_sink_path()
        if exe is None:
            raise RuntimeError("Postfix's smtp-sink is not installed (apt-get install postfix)")
        self.port = free_port()
        argv = [exe, f"127.0.0.1:{self.port}", "256"]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "nobody"]  # it refuses to run as root without -u
        out = log_path.open("ab") if log_path else None
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=out or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT)
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        _wait_listening(self, "smtp-sink")

    def reset(self) -> None:
        """Nothing to forget: smtp-sink keeps no mail."""


_LATENCY_SERVER = r"""
import sys
from mailworker.testing import SMTPTestServer

server = SMTPTestServer(latency=float(sys.argv[1]), chunking=sys.argv[2:] == ["chunking"])
server.start()
print("port", server.port, flush=True)
try:
    for line in sys.stdin:  # one command a line; EOF stops the server
        cmd = line.strip()
        if cmd == "count":
            print("count", len(server.messages), flush=True)
        elif cmd == "reset":  # forget received mail: 100 KB messages add up
            server.reset()
            print("ok", flush=True)
finally:
    server.stop()
"""


class LatencySink(_Child):
    """``SMTPTestServer(latency=...)`` in a Python process of its own.

    Commands over stdin: ``count`` (messages received since the last reset) and
    ``reset``; closing stdin stops it.
    """

    def __init__(self, latency: float, log_path: Path | None = None, *,
                 chunking: bool = False) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        argv = [sys.executable, "-c", _LATENCY_SERVER, str(latency)]
        if chunking:  # offers CHUNKING and takes BDAT (and DATA, for a client that says no)
            argv.append("chunking")
        err = log_path.open("ab") if log_path else None
        try:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE,
                                         stderr=err or subprocess.DEVNULL)
        finally:
            if err is not None:
                err.close()  # the child has its own copy
        first = self._line()
        if len(first) != 2 or first[0] != "port":
            self.stop()
            raise RuntimeError(f"the latency sink did not start (said {first!r}; log: {log_path})")
        self.port = int(first[1])
        _wait_listening(self, "the latency sink")

    def _line(self) -> list[str]:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode().split()

    def _ask(self, cmd: str) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd}\n".encode())
        self.proc.stdin.flush()
        return self._line()

    def count(self) -> int:
        return int(self._ask("count")[1])

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None and proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()  # the server stops itself (bounded by its own stop timeout)
                proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._terminate()
