"""Simulated network round trips for the test server, without netem or root.

:class:`LatencyProxy` listens on the public port and relays each connection to the real
server on an internal port. Every chunk read from one side is written to the other
``latency / 2`` seconds after it arrived, in order. Commands a client sends in one write
therefore cost one round trip together (PIPELINING pays off as it does on a real
network), while a command-reply-command dialogue pays one round trip per command.

A new connection's first server bytes (the greeting, or the TLS ServerHello) are also held
until one round trip after the connection was accepted, standing in for the TCP handshake
that a local connect() does not pay: the greeting arrives 1.5 round trips after connect.

TLS passes through untouched. When the server closes, the client's side is closed once
everything the server sent has been delivered; when the client closes or half-closes,
the server's side is half-closed (after the delayed bytes), so the server's last replies
still reach the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

__all__ = ["HANDSHAKE_ROUND_TRIPS", "LatencyProxy"]

#: Round trips a TCP handshake costs before the server's first bytes can leave.
HANDSHAKE_ROUND_TRIPS = 1.0
_TICK = time.get_clock_info("monotonic").resolution


class LatencyProxy:
    """A TCP relay adding ``latency`` seconds of round trip to every connection."""

    def __init__(self, latency: float, target_host: str, target_port: int) -> None:
        self.latency = latency
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 for a free port); return the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Link(self, loop).client, host, port
        )
        port_: int = self._server.sockets[0].getsockname()[1]
        return port_

    def close(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()


class _Pipe:
    """Bytes travelling one way, each chunk released ``delay`` after it arrived, in order."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, delay: float, on_eof: Callable[[], None],
        not_before: float = 0.0,
    ) -> None:
        self._loop = loop
        self._delay = delay
        self._not_before = not_before
        self._on_eof = on_eof
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._ended = False
        self.dst: asyncio.Transport | None = None

    def send(self, data: bytes | None) -> None:
        """Queue a chunk, or the end of the stream (None)."""
        if self._ended:
            return
        self._ended = data is None
        due = max(self._loop.time(), self._not_before) + self._delay
        self._queue.append((due, data))
        if self._timer is None and self.dst is not None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def attach(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        if self._queue and self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time() + _TICK  # call_at may fire up to one clock tick early
        chunks: list[bytes] = []
        eof = False
        while self._queue and self._queue[0][0] <= now:
            data = self._queue.popleft()[1]
            if data is None:
                eof = True
                break
            chunks.append(data)
        if chunks and self.dst is not None and not self.dst.is_closing():
            self.dst.write(b"".join(chunks))
        if eof:
            self._on_eof()
        elif self._queue:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)


class _End(asyncio.Protocol):
    """One socket of a relayed connection; what it reads goes into its outgoing pipe."""

    def __init__(self, link: _Link, out: _Pipe) -> None:
        self.link = link
        self.out = out
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link.made(self)

    def data_received(self, data: bytes) -> None:
        self.out.send(data)

    def eof_received(self) -> bool:
        self.out.send(None)
        return True  # keep our side open: the link closes it once the EOF is relayed

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.send(None)
        self.link.lost()

    # Back-pressure: a peer that cannot keep up stops us reading from the other side.
    def pause_writing(self) -> None:
        other = self.link.other(self).transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.link.other(self).transport
        if other is not None and not other.is_closing():
            other.resume_reading()


class _Link:
    """One client connection relayed to the server through two delayed pipes."""

    def __init__(self, proxy: LatencyProxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop
        one_way = proxy.latency / 2
        accepted = loop.time()
        self.up = _Pipe(loop, one_way, self._client_finished)
        self.down = _Pipe(
            loop, one_way, self.close,
            not_before=accepted + HANDSHAKE_ROUND_TRIPS * proxy.latency,
        )
        self.client = _End(self, self.up)
        self.backend = _End(self, self.down)
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    def other(self, end: _End) -> _End:
        return self.backend if end is self.client else self.client

    def made(self, end: _End) -> None:
        if end is self.client:
            assert end.transport is not None
            self.proxy._links.add(self)
            self.down.attach(end.transport)
            end.transport.pause_reading()  # until the server side is connected
            self._connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        host, port = self.proxy._target
        try:
            await self.loop.create_connection(lambda: self.backend, host, port)
        except OSError:
            self.close()
            return
        assert self.backend.transport is not None and self.client.transport is not None
        if self._closed:  # closed (stop()) while connecting
            self.backend.transport.close()
            return
        self.up.attach(self.backend.transport)
        if not self.client.transport.is_closing():
            self.client.transport.resume_reading()

    def _client_finished(self) -> None:
        """The client stopped sending: pass the half-close on, keep relaying replies."""
        backend = self.backend.transport
        if backend is None or backend.is_closing():
            self.close()
        elif backend.can_write_eof():
            backend.write_eof()
        else:
            backend.close()

    def lost(self) -> None:
        if self.client.transport is not None and self.client.transport.is_closing() and (
            self.backend.transport is None or self.backend.transport.is_closing()
        ):
            self._forget()

    def close(self) -> None:
        """Close both sides (after any bytes already written are flushed)."""
        if self._closed:
            return
        self._closed = True
        self.up.cancel()
        self.down.cancel()
        for end in (self.client, self.backend):
            if end.transport is not None:
                end.transport.close()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        self._forget()

    def _forget(self) -> None:
        with contextlib.suppress(KeyError):
            self.proxy._links.remove(self)
