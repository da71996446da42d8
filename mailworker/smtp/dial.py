"""TCP connect with one wall-clock bound that covers the DNS lookup too.

``socket.create_connection(addr, timeout)`` bounds each connect attempt, but not the
``getaddrinfo`` before it (the system resolver's own timeouts and retries, per
nameserver), and a name with several unreachable addresses costs one full timeout per
address. Here the lookup runs on a short-lived daemon thread that the caller waits for
only until the deadline (a resolver that never answers strands that thread, never the
worker), and every connect attempt gets only what is left of the same deadline.

A thread per lookup rather than a pool: pooled connections make lookups rare, and a
thread pool would not survive a prefork worker's ``fork``.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

__all__ = ["dial", "local_name"]


def _resolve(host: str, port: int, timeout: float) -> list[Any]:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal: no lookup
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    done = threading.Event()
    box: dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except Exception as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name="mailworker-dns", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"looking up {host} took longer than connect_timeout={timeout:g}s")
    if "error" in box:
        raise box["error"]
    infos: list[Any] = box["infos"]
    return infos


def dial(host: str, port: int, timeout: float) -> socket.socket:
    """A connected socket to *host*:*port* within *timeout* seconds, lookup included."""
    deadline = time.monotonic() + timeout
    infos = _resolve(host, port, timeout)
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    if last is not None and time.monotonic() < deadline:
        raise last
    raise TimeoutError(f"no address of {host}:{port} answered within "
                       f"connect_timeout={timeout:g}s" + (f" (last: {last})" if last else ""))


def local_name(timeout: float = 2.0) -> str:
    """This host's name for EHLO: ``socket.getfqdn()`` (a DNS lookup), bounded; the plain
    host name when the lookup is slow. Set the relay's ``local_hostname`` to skip it."""
    box: dict[str, str] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            box["name"] = socket.getfqdn()
        finally:
            done.set()

    threading.Thread(target=lookup, name="mailworker-fqdn", daemon=True).start()
    if done.wait(timeout) and box.get("name"):
        return box["name"]
    return socket.gethostname() or "localhost"
