"""A private Postfix ``smtpd`` for interoperability tests, started in a temporary directory.

Why Postfix: it implements PIPELINING and CHUNKING (BDAT) the way much of the Internet's
mail is received, so a client that works against it works against a real MTA, not just
against our own test server's reading of RFC 3030.

How the instance is private: its own ``config_directory`` (``main.cf``, ``master.cf``),
``queue_directory``, ``data_directory`` and log file, all in a fresh directory under the
system temp dir; its ``master`` runs in the foreground (``master -c DIR -d``) as a child
of the test, and is stopped by its PID (SIGTERM, which ends its daemons too), then the
directory is removed. Nothing of the system's Postfix (``/etc/postfix``, its queue, a
running system instance) is read or touched except the installed binaries. Only
``smtpd`` listens, on ``127.0.0.1:<free port>``.

How a test sees what Postfix accepted, byte-exact: ``smtpd_proxy_filter`` points at a
capture :class:`~mailworker.testing.SMTPTestServer` (the "before-queue content filter"
set-up). Postfix passes each transaction it accepted (the recipients it accepted, the
content) on to the capture server *while* the client waits, and relays the capture
server's reply after the content to the client. So a client that read Postfix's 250 after
the content finds the message in ``postfix.capture.messages``, and a refusal by Postfix
(RCPT, MAIL, size) means the capture never saw that recipient or message. No queue
manager, delivery agents or DNS are involved. Postfix converts BDAT to DATA towards the
filter and prepends its own ``Received:`` header: :func:`content_of` strips that header,
leaving the bytes the client sent (CRLF-terminated lines; Postfix does not rewrite them).

What Postfix refuses is configurable (:class:`PostfixConfig`): recipients refused with a
given reply (``check_recipient_access`` with a ``texthash:`` map, no ``postmap``),
senders refused at MAIL (``check_sender_access``, ``smtpd_delay_reject = no``),
``smtpd_recipient_limit`` (452 4.5.3 beyond it), ``message_size_limit`` (552 5.3.4).

What Postfix did is in its log (``maillog_file`` via ``postlogd``): :meth:`Postfix.log`,
and :meth:`Postfix.command_counts` reads the per-session ``disconnect from ...`` lines
(``ehlo=1 mail=3 rcpt=3 bdat=3 quit=1``), which say whether a client used BDAT or DATA.

Needs: Postfix 3.4 or later installed (``scripts/system-deps``), and root (``master``
refuses to run otherwise). Tests skip with the reason when either is missing.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailworker.testing import SMTPTestServer
from mailworker.testing.polling import free_port, wait_until

__all__ = ["Postfix", "PostfixConfig", "content_of", "postfix_missing", "running_postfix"]

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
_DISCONNECT = re.compile(r"disconnect from \S+ (.*)$")


def _daemon_directory() -> Path | None:
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    if not os.path.exists(postconf):
        return None
    try:
        out = subprocess.run([postconf, "-dh", "daemon_directory"], capture_output=True,
                             text=True, timeout=10, check=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out.stdout.strip())
    return path if (path / "master").exists() and (path / "smtpd").exists() else None


def postfix_missing() -> str | None:
    """Why a private Postfix cannot run here (for ``pytest.skip``), or None if it can."""
    if _daemon_directory() is None:
        return "Postfix is not installed (run scripts/system-deps)"
    if os.geteuid() != 0:
        return "a private Postfix master needs root (it refuses to start otherwise)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the 'postfix' user is missing (a broken Postfix install)"
    return None


@dataclass(frozen=True)
class PostfixConfig:
    """What the private Postfix refuses; every limit is optional."""

    #: Recipient address (or domain) -> reply, e.g. ``{"bad@example.com": "550 5.1.1 No
    #: such user"}``; Postfix answers RCPT with it.
    refuse_recipients: Mapping[str, str] = field(default_factory=dict)
    #: Sender address (or domain) -> reply; Postfix answers MAIL with it.
    refuse_senders: Mapping[str, str] = field(default_factory=dict)
    #: ``smtpd_recipient_limit``: RCPTs beyond it get ``452 4.5.3 Error: too many recipients``.
    recipient_limit: int | None = None
    #: ``message_size_limit`` in bytes (Postfix's default is 10240000).
    size_limit: int | None = None
    #: Offer CHUNKING (Postfix does by default); False discards the EHLO keyword.
    chunking: bool = True
    #: Offer PIPELINING (Postfix does by default).
    pipelining: bool = True
    #: ``smtpd_forbid_unauth_pipelining``: Postfix 3.9's default (3.7 has the setting,
    #: off). A client that sends a command it had to wait for a reply to (after the
    #: greeting, EHLO, DATA, NOOP or QUIT, RFC 2920's ends of a group) gets ``554 5.5.0
    #: Error: SMTP protocol synchronization`` and is disconnected: the interop tests
    #: catch an over-eager client.
    forbid_unauth_pipelining: bool = True
    #: More ``main.cf`` settings, verbatim.
    extra: Mapping[str, str] = field(default_factory=dict)


class Postfix:
    """A private Postfix instance: ``master`` and ``smtpd`` on ``127.0.0.1:port``, with a
    capture :class:`SMTPTestServer` behind it as its before-queue filter."""

    def __init__(self, config: PostfixConfig | None = None) -> None:
        self.config = config or PostfixConfig()
        self.host = "127.0.0.1"
        self.port = 0
        #: The server Postfix passes accepted mail to (``capture.messages``).
        self.capture = SMTPTestServer(hostname="capture.test")
        self.dir: Path | None = None
        self._master: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start ``master`` and wait until smtpd answers."""
        if (reason := postfix_missing()) is not None:
            pytest.skip(reason)
        daemons = _daemon_directory()
        assert daemons is not None
        self.capture.start()
        try:
            self._start(daemons)
        except BaseException:
            self.stop()
            raise

    def _start(self, daemons: Path) -> None:
        # Not pytest's tmp_path: its 0700 parents would keep the postfix user out.
        self.dir = Path(tempfile.mkdtemp(prefix="mailworker-postfix-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        etc, spool, data = self.dir / "etc", self.dir / "spool", self.dir / "data"
        owner = pwd.getpwnam("postfix")
        for sub in (etc, spool, data, spool / "pid", spool / "public", spool / "private"):
            sub.mkdir(mode=0o755)
        for sub in (data, spool / "public", spool / "private"):
            os.chown(sub, owner.pw_uid, owner.pw_gid)
            sub.chmod(0o700 if sub.name != "public" else 0o755)
        (etc / "recipients").write_text(_table(self.config.refuse_recipients))
        (etc / "senders").write_text(_table(self.config.refuse_senders))
        (etc / "main.cf").write_text(self._main_cf(etc, spool, data, daemons))
        (etc / "master.cf").write_text(self._master_cf())
        (self.dir / "maillog").touch()
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "MAIL_CONFIG": str(etc)}
        atexit.register(self.stop)  # a test run that ends early still stops its master
        self._master = subprocess.Popen(
            [str(daemons / "master"), "-c", str(etc), "-d"], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.dir / "master.err").open("wb"), start_new_session=True,
        )
        wait_until(self._answers, _START_TIMEOUT,
                   message=f"the private Postfix on port {self.port} to answer "
                           f"(see {self.dir}/maillog, master.err)")

    def _answers(self) -> bool:
        import socket

        if self._master is not None and self._master.poll() is not None:
            raise RuntimeError(f"postfix master exited ({self._master.returncode}): "
                               f"{self._errors()}")
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.settimeout(5)
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    def _errors(self) -> str:
        assert self.dir is not None
        parts = []
        for name in ("master.err", "maillog"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop ``master`` (and with it its daemons) by PID; remove the directory."""
        atexit.unregister(self.stop)
        master, self._master = self._master, None
        if master is not None and master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)  # its own session: only its daemons
                master.wait(_STOP_TIMEOUT)
        self.capture.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Postfix:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration -----------------------------------------------------------------

    def _main_cf(self, etc: Path, spool: Path, data: Path, daemons: Path) -> str:
        cfg = self.config
        discard = [word for word, on in (("chunking", cfg.chunking),
                                         ("pipelining", cfg.pipelining)) if not on]
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(spool),
            "data_directory": str(data),
            "daemon_directory": str(daemons),
            "mail_owner": "postfix",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            "relay_domains": "",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "maillog_file": str(self.dir / "maillog") if self.dir else "",
            "maillog_file_prefixes": str(self.dir),
            "notify_classes": "",
            "biff": "no",
            "smtpd_tls_security_level": "none",
            "smtpd_proxy_filter": f"127.0.0.1:{self.capture.port}",
            "smtpd_proxy_ehlo": "postfix.test",
            "smtpd_proxy_timeout": "30s",
            "smtpd_delay_reject": "no",  # a refused sender is refused at MAIL
            "smtpd_sender_restrictions": f"check_sender_access texthash:{etc}/senders",
            "smtpd_recipient_restrictions":
                f"check_recipient_access texthash:{etc}/recipients, permit_mynetworks, reject",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            # Tests make many errors on purpose: no tarpit sleeps, no error hang-ups.
            "smtpd_error_sleep_time": "0",
            "smtpd_soft_error_limit": "10000",
            "smtpd_hard_error_limit": "10000",
            "smtpd_junk_command_limit": "10000",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_discard_ehlo_keywords": ", ".join(discard),
            "smtputf8_enable": "yes",
            "smtpd_forbid_unauth_pipelining": "yes" if cfg.forbid_unauth_pipelining else "no",
        }
        if cfg.recipient_limit is not None:
            settings["smtpd_recipient_limit"] = str(cfg.recipient_limit)
        if cfg.size_limit is not None:
            settings["message_size_limit"] = str(cfg.size_limit)
        settings.update(cfg.extra)
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _master_cf(self) -> str:
        # No chroot (column 5 "n"): the daemons read this directory's files directly.
        return (
            f"{self.host}:{self.port} inet n - n - - smtpd\n"
            "rewrite unix - - n - - trivial-rewrite\n"
            "anvil unix - - n - 1 anvil\n"
            "proxymap unix - - n - - proxymap\n"
            "postlog unix-dgram n - n - 1 postlogd\n"
        )

    # -- what Postfix did --------------------------------------------------------------

    def log(self) -> str:
        """The instance's mail log so far."""
        assert self.dir is not None
        return (self.dir / "maillog").read_text(errors="replace")

    def command_counts(self) -> list[Counter[str]]:
        """Per finished session, Postfix's command counts from its ``disconnect from``
        log line, e.g. ``{"ehlo": 1, "mail": 3, "rcpt": 3, "bdat": 3, "quit": 1}``.
        A count written ``ok/total`` (some refused) is read as the total."""
        sessions = []
        for line in self.log().splitlines():
            if "postfix" in line and (found := _DISCONNECT.search(line)):
                counts: Counter[str] = Counter()
                for item in found.group(1).split():
                    name, _, value = item.partition("=")
                    counts[name] = int(value.rpartition("/")[2])
                sessions.append(counts)
        return sessions

    def wait_for_sessions(self, n: int, timeout: float = 10.0) -> list[Counter[str]]:
        """Wait until ``n`` sessions have ended (Postfix logs a session at disconnect)."""
        return wait_until(lambda: (c := self.command_counts()) and len(c) >= n and c,  # type: ignore[no-any-return]
                          timeout, message=f"{n} finished Postfix sessions in the log")

    def dsn(self, **options: object) -> str:
        from urllib.parse import urlencode

        query = urlencode({k: str(v).lower() if isinstance(v, bool) else str(v)
                           for k, v in options.items()})
        return f"smtp://{self.host}:{self.port}" + (f"?{query}" if query else "")


def _table(entries: Mapping[str, str]) -> str:
    return "".join(f"{key} {value}\n" for key, value in entries.items())


def content_of(data: bytes) -> bytes:
    """The bytes the client sent, from what the capture server got: Postfix's own
    ``Received:`` header (the first header field, possibly folded) removed."""
    if not data.startswith(b"Received:"):
        return data
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[end:]


def running_postfix(config: PostfixConfig | None = None) -> Iterator[Postfix]:
    """For fixtures: ``yield from running_postfix(cfg)`` starts one and always stops it."""
    postfix = Postfix(config)
    postfix.start()
    try:
        yield postfix
    finally:
        postfix.stop()


