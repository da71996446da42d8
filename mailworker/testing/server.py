"""An SMTP server for tests: records what it receives and injects faults on request.

It runs aiosmtpd on its own event loop in a daemon thread, so synchronous test code (and
Celery workers under test) can talk to it with any SMTP client::

    with SMTPTestServer(tls="starttls", auth={"u": "p"}) as server:
        server.add_fault(Fault.reply("RCPT", 550, "5.1.1 No such user", match="bad@"))
        deliver(relay=server.dsn(user="u", password="p"))
        assert server.wait_for_messages(1)[0].recipients == ("good@example.test",)

``chunking=True`` offers CHUNKING and accepts ``BDAT`` (RFC 3030) besides DATA. It is off
by default so that clients which use BDAT whenever it is offered keep taking the DATA path
in tests written before it existed; see :meth:`FaultySMTP.smtp_BDAT
<mailworker.testing.session.FaultySMTP.smtp_BDAT>` for the replies and faults.

``latency`` puts a :class:`~mailworker.testing.latency.LatencyProxy` in front of the
server to model a network round trip (see that module for the model). ``persona`` gives
it a provider's standing limits (a connection cap, a rate cap, dropping after the dot),
and :meth:`SMTPTestServer.down` / :meth:`~SMTPTestServer.up` an outage; see
:mod:`mailworker.testing.personas`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import shutil
import socket
import ssl
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode

from aiosmtpd.smtp import TLSSetupException

from .faults import Fault, FaultBook
from .latency import LatencyProxy
from .personas import DownMode, Persona, Provider
from .records import ReceivedMessage, Recorder
from .session import FaultySMTP, SessionConfig

if TYPE_CHECKING:
    import trustme

__all__ = ["SMTPTestServer"]

log = logging.getLogger("mailworker.testing")

TLSMode = Literal["starttls", "implicit"]
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_CLOSE_GRACE = 1.0
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapped away


class SMTPTestServer:
    """A fault-injecting SMTP server on a thread of its own; also a context manager.

    All inspection methods are thread-safe and return snapshots.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tls: TLSMode | None = None,
        auth: Mapping[str, str] | None = None,
        require_auth: bool = False,
        auth_require_tls: bool = False,
        latency: float = 0.0,
        max_recipients: int | None = None,
        size_limit: int | None = None,
        smtputf8: bool = True,
        pipelining: bool = True,
        chunking: bool = False,
        hostname: str = "mx.test",
        persona: Persona | None = None,
    ) -> None:
        if tls not in (None, "starttls", "implicit"):
            raise ValueError(f"tls must be None, 'starttls' or 'implicit', not {tls!r}")
        if require_auth and not auth:
            raise ValueError("require_auth needs auth={user: password} so a client can log in")
        if latency < 0:
            raise ValueError(f"latency must not be negative, not {latency}")
        for name, limit in (("max_recipients", max_recipients), ("size_limit", size_limit)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be None or at least 1, not {limit}")
        self.host = host
        self.port = port
        self.tls = tls
        self.latency = latency
        #: The throwaway CA that signed the server's certificate (None without TLS).
        self.ca: trustme.CA | None = None
        #: PEM file of that CA, for clients to trust (None without TLS).
        self.ca_file: str | None = None
        context = self._make_tls(hostname) if tls else None
        self._implicit_context = context if tls == "implicit" else None
        self._faults = FaultBook()
        self._recorder = Recorder()
        self._config = SessionConfig(
            recorder=self._recorder,
            faults=self._faults,
            hostname=hostname,
            auth=dict(auth) if auth else None,
            require_auth=require_auth,
            auth_require_tls=auth_require_tls,
            max_recipients=max_recipients,
            size_limit=size_limit,
            smtputf8=smtputf8,
            pipelining=pipelining,
            chunking=chunking,
            starttls_context=context if tls == "starttls" else None,
            implicit_tls=tls == "implicit",
            provider=Provider(persona),
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def _make_tls(self, hostname: str) -> ssl.SSLContext:
        # Imported here: trustme is in the `testing` extra, and only TLS servers need it.
        try:
            import trustme
        except ImportError:
            raise ImportError(
                "SMTPTestServer(tls=...) needs trustme for its throwaway CA: "
                "pip install 'mailworker[testing]'") from None
        self.ca = trustme.CA()
        names = {"127.0.0.1", "localhost", "::1", hostname, self.host} - set(_WILDCARDS)
        cert = self.ca.issue_cert(*sorted(names))
        # The file lives as long as the server object (a restarted server still needs it).
        directory = tempfile.mkdtemp(prefix="mailworker-testing-")
        weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        self.ca_file = str(Path(directory) / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        return context

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start listening; returns once connections are accepted.

        After a stop(), start() listens on the same port again, so a test can take the
        relay down and bring it back.
        """
        if self._thread is not None:
            raise RuntimeError("this SMTPTestServer is already running")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="SMTPTestServer", daemon=True
        )
        self._thread.start()
        try:
            self.port = ready.result(timeout=_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close every connection and the listener; join the thread (bounded)."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT)
        self._thread = self._loop = self._stopping = None
        if thread.is_alive():
            raise RuntimeError(f"SMTPTestServer did not stop within {_STOP_TIMEOUT}s")

    def __enter__(self) -> SMTPTestServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_quiet_exception_handler)
        try:
            loop.run_until_complete(self._serve(loop, ready))
        except BaseException as exc:  # handed to start()'s caller
            if not ready.done():
                ready.set_exception(exc)
        finally:
            _cancel_leftovers(loop)
            loop.close()

    async def _serve(self, loop: asyncio.AbstractEventLoop, ready: concurrent.futures.Future[int]
                     ) -> None:
        self._loop, self._stopping = loop, asyncio.Event()
        config = self._config
        public_host = _bind_address(self.host)
        inner_host = _WILDCARDS.get(public_host, public_host)
        smtp = await loop.create_server(
            lambda: FaultySMTP(config, loop),
            inner_host if self.latency else public_host,
            0 if self.latency else self.port,
            ssl=self._implicit_context,
        )
        proxy: LatencyProxy | None = None
        try:
            port: int = smtp.sockets[0].getsockname()[1]
            if self.latency:
                proxy = LatencyProxy(self.latency, inner_host, port)
                port = await proxy.start(public_host, self.port)
            ready.set_result(port)
            await self._stopping.wait()
        finally:
            smtp.close()
            if proxy is not None:
                proxy.close()
            await _close_sessions(config.sessions)

    # -- faults ------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        """Arm a fault; it applies to connections already open as well as new ones."""
        self._faults.add(fault)
        loop = self._loop
        if fault.kind == "idle_disconnect" and loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._rearm_idle)

    def _rearm_idle(self) -> None:
        for session in list(self._config.sessions):
            session.arm_idle()

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def faults_triggered(self) -> list[tuple[int, Fault]]:
        """(connection id, fault) for every time a fault fired, oldest first."""
        return self._faults.triggered

    def reset(self) -> None:
        """Forget messages, commands, counts and faults (between tests sharing a server).
        The persona and an outage stay; their refusal counts are forgotten."""
        self._faults.reset()
        self._recorder.reset()
        self._config.provider.reset()

    # -- provider personas -------------------------------------------------------------

    @property
    def persona(self) -> Persona:
        return self._config.provider.persona

    def set_persona(self, persona: Persona) -> None:
        """Change the standing limits; connections already open keep their place under a
        connection cap, and the rate's bucket starts full."""
        self._config.provider.persona = persona

    def down(self, mode: DownMode = "421") -> None:
        """Go down until :meth:`up`; connections open now are closed at once.

        ``"421"``: new connections are greeted ``421 4.3.2`` and closed (and open ones get
        that 421 as they are closed); ``"close"``: closed without a byte; ``"refuse"``:
        the listener is closed, so connecting is refused (then nothing can be counted).
        """
        if mode not in ("421", "close", "refuse"):
            raise ValueError(f"mode must be '421', 'close' or 'refuse', not {mode!r}")
        self._config.provider.set_down(mode)
        if mode == "refuse":
            self.stop()
        else:
            self._on_loop(lambda: _hang_up_all(self._config.sessions, mode == "421"))

    def up(self) -> None:
        """Come back from :meth:`down`, on the same port."""
        was = self._config.provider.down_mode
        self._config.provider.set_down(None)
        if was == "refuse" and self._thread is None:
            self.start()

    @property
    def is_down(self) -> bool:
        return self._config.provider.down_mode is not None

    @property
    def refusals(self) -> Counter[str]:
        """Refusals by the persona and outages, by kind: ``connection_cap``, ``rate_cap``,
        ``down``, ``drop_after_dot``."""
        return self._config.provider.refusals

    @property
    def refusal_events(self) -> list[tuple[float, str]]:
        """(``time.monotonic()``, kind) of every refusal counted in :attr:`refusals`."""
        return self._config.provider.refusal_events

    def _on_loop(self, action: Callable[[], None]) -> None:
        """Run *action* on the server's loop and wait for it (a no-op when stopped)."""
        loop = self._loop
        if loop is None:
            return

        async def run() -> None:
            action()

        try:
            done = asyncio.run_coroutine_threadsafe(run(), loop)
        except RuntimeError:  # the loop already ended
            return
        done.result(timeout=_STOP_TIMEOUT)

    # -- what the server saw -----------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message received in full, in arrival order (a copy)."""
        return self._recorder.messages

    @property
    def commands(self) -> list[tuple[int, str]]:
        """(connection id, command line) as received; AUTH credentials are redacted."""
        return self._recorder.commands

    def deliveries(self) -> Counter[tuple[str | None, str]]:
        """(Message-ID, recipient) -> copies acknowledged with 2xx; >1 means duplicates."""
        return self._recorder.deliveries()

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until ``n`` messages arrived and return them all; TimeoutError otherwise."""
        return self._recorder.wait_for_messages(n, timeout)

    @property
    def connections_opened(self) -> int:
        return self._recorder.connections_opened

    @property
    def active_connections(self) -> int:
        return self._recorder.active_connections

    @property
    def max_concurrent_connections(self) -> int:
        return self._recorder.max_concurrent_connections

    def dsn(
        self, scheme: str | None = None, user: str | None = None, password: str | None = None,
        **options: Any,
    ) -> str:
        """A relay DSN for this server, e.g. ``smtp+starttls://127.0.0.1:40123?ca_file=...``.

        The scheme defaults to the server's TLS mode (``smtp``, ``smtp+starttls`` or
        ``smtps``); ``ca_file`` is added when the server has TLS.
        """
        if scheme is None:
            scheme = {"starttls": "smtp+starttls", "implicit": "smtps"}.get(self.tls or "", "smtp")
        if self.ca_file is not None:
            options = {"ca_file": self.ca_file, **options}
        credentials = ""
        if user is not None:
            credentials = quote(user, safe="")
            if password is not None:
                credentials += ":" + quote(password, safe="")
            credentials += "@"
        host = _WILDCARDS.get(self.host, self.host)  # a listener on all interfaces
        host = f"[{host}]" if ":" in host else host
        query = urlencode({key: _option_text(value) for key, value in options.items()})
        return f"{scheme}://{credentials}{host}:{self.port}" + (f"?{query}" if query else "")

    def __repr__(self) -> str:
        state = "running" if self._thread is not None else "stopped"
        return (
            f"<SMTPTestServer {self.host}:{self.port} {state} tls={self.tls} "
            f"latency={self.latency} [{len(self.messages)} messages, "
            f"{self.active_connections} active connections]>"
        )


def _bind_address(host: str) -> str:
    """One address to listen on: a name like "localhost" would otherwise get a listener
    per address family, each on its own free port."""
    if not host:
        return "0.0.0.0"  # noqa: S104 - the caller asked for every interface
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return str(socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][4][0])


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _close_sessions(sessions: set[FaultySMTP]) -> None:
    """Close live connections, then abort those that do not finish within a grace time."""
    for session in list(sessions):
        session.drop()
    deadline = time.monotonic() + _CLOSE_GRACE
    while sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for session in list(sessions):
        if isinstance(session.transport, asyncio.Transport):
            session.transport.abort()


def _hang_up_all(sessions: set[FaultySMTP], with_421: bool) -> None:
    """Close every live connection now, as a server going down does (on its loop)."""
    for session in list(sessions):
        session.flush()
        if with_421 and session.transport is not None and not session.transport.is_closing():
            session.transport.write(b"421 4.3.2 Service shutting down\r\n")  # type: ignore[attr-defined]
        session.drop()


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Keep clients hanging up (or distrusting our certificate) out of the test output."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError | ssl.SSLError | TLSSetupException
                  | asyncio.IncompleteReadError | TimeoutError):
        log.debug("test SMTP server: %s", context.get("message"), exc_info=exc)
        return
    loop.default_exception_handler(context)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
