"""The metrics port: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for probes.

Served by ``mailworker worker`` and ``mailworker scheduler`` when a port is set
(``--metrics-port`` or ``metrics_port``), from a thread of the process that supervises
(the worker's supervisor, so the port stays up while a crashed Celery child restarts).

- ``/metrics``: the counters and histograms of every process of this worker, added up
  from ``PROMETHEUS_MULTIPROC_DIR`` (see :mod:`mailworker.metrics`), and gauges read from
  Redis at scrape time: queue depths (the broker's list lengths), in flight, deferred,
  dead letters, the age of the oldest in-flight record, and per relay the pause, the
  fleet-wide connection slots in use, the window and the learned rate. The Redis reads
  are cached for :data:`CACHE_SECONDS`, so several scrapers cost one read. The gauges
  are fleet-wide: every worker shows the same values (aggregate them with ``max``).
- ``/healthz``: 200 while the process answers and Redis answers a PING within
  :data:`PROBE_TIMEOUT` seconds, else 503.
- ``/readyz``: 200 when healthy and the process's work has started (the Celery
  consumer is ready, or the scheduler loop runs), else 503.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailworker.config import Settings
from mailworker.metrics import ENV_DIR, METRICS
from mailworker.store import Store

__all__ = ["CACHE_SECONDS", "PROBE_TIMEOUT", "FleetCollector", "MetricsServer", "mark_ready"]

CACHE_SECONDS = 2.0
PROBE_TIMEOUT = 1.0
_READY_PREFIX = "ready-"


def mark_ready(ready: bool) -> None:
    """Say this process's work has started (or stopped), for ``/readyz`` of the process
    that serves: a file ``ready-<pid>`` in the multiprocess directory."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    path = Path(folder) / f"{_READY_PREFIX}{os.getpid()}"
    if ready:
        path.touch()
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def any_ready() -> bool:
    """Whether a live process of this worker marked itself ready."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return False
    for path in Path(folder).glob(f"{_READY_PREFIX}*"):
        pid = path.name.removeprefix(_READY_PREFIX)
        if pid.isdigit() and _alive(int(pid)):
            return True
    return False


class FleetCollector:
    """Gauges read from Redis when scraped (cached for :data:`CACHE_SECONDS`)."""

    def __init__(self, settings: Settings, store: Store, client: redis.Redis,
                 broker: redis.Redis | None) -> None:
        self.settings = settings
        self.store = store
        self.redis = client
        self.broker = broker
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Any]] | None = None

    def describe(self) -> list[Any]:
        return []  # no Redis read when the collector is registered

    def collect(self) -> Iterator[Any]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > CACHE_SECONDS:
                self._cached = (now, self._read())
            families = self._cached[1]
        yield from families

    def _read(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        def gauge(name: str, labels: list[str] | None = None) -> Any:
            return GaugeMetricFamily(name, METRICS[name][1], labels=labels)

        up = gauge("mailworker_redis_up")
        try:
            families = self._fleet(gauge)
        except (redis.RedisError, OSError):
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _fleet(self, gauge: Callable[..., Any]) -> list[Any]:
        depth = gauge("mailworker_queue_depth", ["queue"])
        if self.broker is not None:
            pipe = self.broker.pipeline(transaction=False)
            for q in self.settings.queues:
                pipe.llen(q)
            for q, n in zip(self.settings.queues, pipe.execute(raise_on_error=False),
                            strict=True):
                if isinstance(n, int):
                    depth.add_metric([q], n)
        counts = self.store.counts()
        singles = []
        for name, key in (("mailworker_in_flight", "in_flight"),
                          ("mailworker_deferred", "deferred"),
                          ("mailworker_dead_letters", "dead")):
            g = gauge(name)
            g.add_metric([], counts[key])
            singles.append(g)
        oldest = gauge("mailworker_oldest_in_flight_age_seconds")
        oldest.add_metric([], self._oldest_age())
        paused = gauge("mailworker_relay_paused", ["relay"])
        conns = gauge("mailworker_relay_connections", ["relay"])
        window = gauge("mailworker_relay_window", ["relay"])
        rate = gauge("mailworker_relay_rate", ["relay"])
        states = self.store.relay_states()
        for name in self.settings.relays:
            states.setdefault(name, {"paused": None, "slots_in_use": 0, "window": None,
                                     "rate": None})
        for name, st in sorted(states.items()):
            paused.add_metric([name], 1 if st.get("paused") else 0)
            conns.add_metric([name], st.get("slots_in_use") or 0)
            if st.get("window") is not None:
                window.add_metric([name], float(st["window"]))
            if st.get("rate") is not None:
                rate.add_metric([name], float(st["rate"]))
        return [depth, *singles, oldest, paused, conns, window, rate]

    def _oldest_age(self) -> float:
        """Age of the in-flight record with the earliest watchdog (0: none in flight)."""
        first = self.redis.zrange(self.store.inflight_key, 0, 0)
        if not first:
            return 0.0
        mid = first[0].decode() if isinstance(first[0], bytes) else str(first[0])
        rec = self.store.get(mid)
        return max(0.0, time.time() - rec.created_at) if rec is not None else 0.0


class MetricsServer:
    """The HTTP port, in a daemon thread; *ready* says whether the work has started."""

    def __init__(self, settings: Settings, ready: Callable[[], bool],
                 port: int | None = None, address: str | None = None) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.settings = settings
        self.ready = ready
        self.registry = CollectorRegistry()
        folder = os.environ.get(ENV_DIR)
        if folder:
            MultiProcessCollector(self.registry, path=folder)  # type: ignore[no-untyped-call]
        probe_opts = {"socket_timeout": PROBE_TIMEOUT, "socket_connect_timeout": PROBE_TIMEOUT,
                      "health_check_interval": 0, "retry": Retry(NoBackoff(), 0)}
        self.redis = redis.Redis.from_url(settings.redis_url, **probe_opts)
        broker = None
        if settings.broker.partition("://")[0] in ("redis", "rediss", "unix"):
            broker = (self.redis if settings.broker == settings.redis_url
                      else redis.Redis.from_url(settings.broker, **probe_opts))
        store = Store(self.redis, prefix=settings.key_prefix)
        self.registry.register(FleetCollector(settings, store, self.redis, broker))
        self.httpd = ThreadingHTTPServer(
            (address or settings.metrics_address, port or settings.metrics_port),
            self._handler())
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name="mailworker-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def healthy(self) -> bool:
        try:
            return bool(self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = server.healthy()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"redis unreachable\n")
                elif path == "/readyz":
                    if not server.healthy():
                        self._send(503, b"redis unreachable\n")
                    elif not server.ready():
                        self._send(503, b"starting\n")
                    else:
                        self._send(200, b"ready\n")
                else:
                    self._send(404, b"try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes,
                      ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes and probes every few seconds: not worth a log line

        return Handler
