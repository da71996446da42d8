"""Settings: one immutable value built from defaults, a TOML file and the environment.

Precedence, lowest first: built-in defaults, the TOML file named by ``MAILWORKER_CONFIG``
(or passed explicitly), then ``MAILWORKER_*`` environment variables. Every setting is
documented in ``config/README.md``. A bad value fails at load with a message that names
the setting and what it accepts: a worker that starts is a worker whose config parsed.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mailworker.backoff import parse_duration
from mailworker.errors import MailworkerError, shown
from mailworker.relay import InvalidRelayError, Relay, parse_relay
from mailworker.relay_groups import (
    GroupError,
    RelayGroup,
    check_groups,
    group_from_env,
    group_from_spec,
    is_group_spec,
)
from mailworker.routing_rules import Route, RouteError, parse_routes

__all__ = ["MAX_DURATION", "ConfigError", "QueueSettings", "Settings", "check_settings",
           "load_settings", "queue_from_spec", "redact_url", "relay_from_spec"]

DEFAULT_QUEUES = ("transactional", "bulk")
_SECRET_OPTIONS = {"username_env", "password_env", "password_file"}
#: Longest duration any setting accepts (ten years): longer is a typo (milliseconds
#: for seconds), and times past it overflow dates in ``status`` and Redis expiries.
MAX_DURATION = 10 * 365 * 86400.0
#: A message's lifetime when neither its queue nor ``[retry] lifetime`` sets one.
DEFAULT_LIFETIME = 86400.0


class ConfigError(MailworkerError, ValueError):
    """A setting is missing or malformed; the message names it and what it accepts.

    A ``ValueError`` for callers that caught that before :class:`MailworkerError` existed.
    """


def redact_url(url: str | None) -> str | None:
    """*url* with its password replaced by ``***``, for reprs, errors and logs.

    The credentials end at the *last* '@', so a password holding an unencoded '@' or
    '/' is hidden whole (a URL parser would end it at the first of them and show the
    rest). Without a ':' the whole user part is hidden: it may be a bare password.
    """
    if not url or "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<URL hidden: it holds '@' but no scheme>"
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user + ':***' if colon else '***'}@{host}"


@dataclass(frozen=True)
class QueueSettings:
    """Per-queue delivery limits; a message may shorten its own lifetime."""

    name: str
    lifetime: float | None = None      # None: the [retry] table's lifetime (default 24 h)
    max_attempts: int | None = None    # None: the [retry] policy's max_attempts (default 20)


@dataclass(frozen=True)
class Settings:
    """Everything a producer, worker or scheduler needs to know."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None
    key_prefix: str = "mw"
    relays: Mapping[str, Relay] = field(default_factory=dict)
    # Relay groups (mailworker.relay_groups): a name send() and rules may use like a relay.
    groups: Mapping[str, RelayGroup] = field(default_factory=dict)
    default_relay: str = "default"
    queues: Mapping[str, QueueSettings] = field(
        default_factory=lambda: {q: QueueSettings(q) for q in DEFAULT_QUEUES}
    )
    default_queue: str = "transactional"
    default_sender: str | None = None
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    # A web request waits for Redis at most about connect + socket timeout; a refused or
    # reset connection is retried redis_retries times with exponential backoff.
    redis_connect_timeout: float = 1.0
    redis_socket_timeout: float = 2.0
    redis_retries: int = 2
    retention: float = 7 * 86400.0       # delivered records
    dead_retention: float = 30 * 86400.0  # dead letters (their own, longer, retention)
    # Short leases, renewed by the heartbeat every lease/3 while the batch runs: a killed
    # worker's mail moves again within lease + stuck_after (+ a tick), 26 s by default.
    lease_seconds: float = 15.0
    stuck_after: float = 10.0
    batch_size: int = 50
    tick_interval: float = 1.0
    task_time_limit: float = 600.0
    visibility_timeout: float = 3600.0
    # Prometheus /metrics, /healthz and /readyz of `mailworker worker` and `scheduler`
    # (0: off; --metrics-port overrides). All interfaces by default, for scrapers and probes.
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"  # noqa: S104 - opt-in port, for Kubernetes probes
    # The [retry] table as written. Read into the retry policy a layer up, by
    # mailworker.policy_config.policy_of(settings), so that config imports no policy.
    retry: Mapping[str, Any] = field(default_factory=dict)
    # The [[routes]] rules (mailworker.routing_rules): first match picks the relay.
    routes: tuple[Route, ...] = ()

    def __post_init__(self) -> None:
        # Settings built in code (configure(**overrides), frameworks) get the same range
        # checks as the file and the environment: NaN, inf and 1e300 never get in.
        for name in _SCALARS:
            _check_scalar(name, getattr(self, name))

    def __repr__(self) -> str:
        # The Redis URLs carry the password: reprs end up in debug pages and error reports.
        shown_urls = {"redis_url": redact_url(self.redis_url),
                      "broker_url": redact_url(self.broker_url)}
        body = ", ".join(f"{f.name}={shown_urls.get(f.name, getattr(self, f.name))!r}"
                         for f in fields(self) if f.repr)
        return f"Settings({body})"

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    def relay(self, name: str | None = None) -> Relay:
        """The named relay (default relay when None); a clear error for an unknown name."""
        name = name or self.default_relay
        try:
            return self.relays[name]
        except KeyError:
            known = ", ".join(sorted(self.relays)) or "none configured"
            raise ConfigError(
                f"unknown relay {name!r} (known: {known}); define it with "
                f"MAILWORKER_RELAY_{name.upper()}=smtp://host:port or [relays] in the config file"
            ) from None

    def target(self, name: str | None = None) -> str:
        """The name of a relay or relay group a message may name (default relay when
        None); the same clear error as :meth:`relay` for a name that is neither."""
        name = name or self.default_relay
        return name if name in self.groups else self.relay(name).name

    def queue(self, name: str | None = None) -> QueueSettings:
        name = name or self.default_queue
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues))
            raise ConfigError(
                f"unknown queue {name!r} (known: {known}); add it under [queues.{name}] "
                "in the config file"
            ) from None

    def lifetime(self, queue: str | None = None) -> float:
        """How long a message on *queue* may keep trying: the queue's, else the policy's."""
        q = self.queues.get(queue or self.default_queue)
        if q is not None and q.lifetime is not None:
            return q.lifetime
        try:
            return parse_duration(self.retry.get("lifetime", DEFAULT_LIFETIME))
        except ValueError as exc:
            raise ConfigError(f"config file: [retry]: retry.lifetime: {exc}") from None

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


_SCALARS: dict[str, type] = {
    "redis_url": str, "broker_url": str, "key_prefix": str, "default_relay": str,
    "default_queue": str, "default_sender": str, "max_message_size": int,
    "max_recipients": int, "redis_connect_timeout": float, "redis_socket_timeout": float,
    "redis_retries": int, "retention": float, "dead_retention": float,
    "lease_seconds": float, "stuck_after": float, "batch_size": int,
    "tick_interval": float, "task_time_limit": float, "visibility_timeout": float,
    "metrics_port": int, "metrics_address": str,
}
_DURATIONS = {"retention", "dead_retention", "lease_seconds", "stuck_after", "tick_interval",
              "task_time_limit", "visibility_timeout", "redis_connect_timeout",
              "redis_socket_timeout"}
_OPTIONAL = {"broker_url", "default_sender"}
# Whole-number settings: (least, most). Redis refuses values over 512 MiB; past the other
# ceilings a value is a typo, and would make one record or one task unreasonably big.
_COUNTS = {"max_message_size": (1, 512 * 1024 * 1024), "max_recipients": (1, 100_000),
           "batch_size": (1, 10_000), "redis_retries": (0, 10), "metrics_port": (0, 65535)}
_DEFAULT_COUNT = (1, 1_000_000_000)


def _hint(name: str) -> str:
    if name in _DURATIONS or _SCALARS[name] is float:
        return "a duration above zero and at most 10 years, like 30, '90s', '15m', '24h'"
    if _SCALARS[name] is int:
        low, high = _COUNTS.get(name, _DEFAULT_COUNT)
        return f"a whole number from {low:,} to {high:,}"
    return "text" if name in _OPTIONAL else "non-empty text"


def _check_scalar(name: str, value: Any) -> None:
    """Raise ConfigError unless *value* is a valid, already coerced value of *name*."""
    kind = _SCALARS[name]
    if kind is float:
        ok = (not isinstance(value, bool) and isinstance(value, int | float)
              and math.isfinite(value) and 0 < value <= MAX_DURATION)
    elif kind is int:
        low, high = _COUNTS.get(name, _DEFAULT_COUNT)
        ok = not isinstance(value, bool) and isinstance(value, int) and low <= value <= high
    else:
        ok = (value is None and name in _OPTIONAL) or (isinstance(value, str) and value != "")
    if not ok:
        if name.endswith("_url") and isinstance(value, str):
            value = redact_url(value)
        raise ConfigError(f"setting {name}={shown(value)} is not {_hint(name)}")


def _coerce(name: str, value: Any) -> Any:
    kind = _SCALARS[name]
    try:
        if name in _DURATIONS:
            coerced: Any = parse_duration(value)
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            coerced = int(value)
        else:
            coerced = str(value)
    except (TypeError, ValueError, OverflowError):
        coerced = value
    _check_scalar(name, coerced)
    return coerced


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build :class:`Settings` from the TOML file and ``MAILWORKER_*`` variables."""
    env = os.environ if environ is None else environ
    path = path or env.get("MAILWORKER_CONFIG")
    doc: dict[str, Any] = {}
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None

    values: dict[str, Any] = {}
    top = doc.get("mailworker", doc)
    for key, value in top.items():
        if key in _SCALARS:
            values[key] = _coerce(key, value)
        elif key not in {"relays", "queues", "retry", "routes"}:
            raise ConfigError(f"config file: unknown setting {key!r}; see config/README.md")
    for key in _SCALARS:
        var = f"MAILWORKER_{key.upper()}"
        if env.get(var):
            values[key] = _coerce(key, env[var])

    relays: dict[str, Relay] = {}
    groups: dict[str, RelayGroup] = {}
    try:
        for name, spec in (top.get("relays") or {}).items():
            if is_group_spec(spec):
                groups[name] = group_from_spec(name, spec)
            else:
                relays[name] = relay_from_spec(name, spec, env)
        for var, dsn in env.items():
            if var.startswith("MAILWORKER_RELAY_") and dsn:
                name = var.removeprefix("MAILWORKER_RELAY_").lower()
                group = group_from_env(name, dsn)
                (relays if group else groups).pop(name, None)  # the environment wins
                if group is not None:
                    groups[name] = group
                else:
                    relays[name] = parse_relay(name, dsn, dict(env))
    except (InvalidRelayError, GroupError) as exc:
        raise ConfigError(str(exc)) from None
    values["relays"] = relays
    values["groups"] = groups

    queues = {q: QueueSettings(q) for q in DEFAULT_QUEUES}
    for name, spec in (top.get("queues") or {}).items():
        queues[name] = queue_from_spec(name, spec, where="config file: ")
    values["queues"] = queues

    retry = top.get("retry") or {}
    if not isinstance(retry, Mapping):
        raise ConfigError("config file: [retry] must be a table; see config/README.md")
    values["retry"] = retry
    try:
        values["routes"] = parse_routes(top.get("routes"))
    except RouteError as exc:
        raise ConfigError(f"config file: {exc}; see config/README.md") from None

    return check_settings(Settings(**values))


def relay_from_spec(name: str, spec: str | Mapping[str, Any], env: Mapping[str, str]) -> Relay:
    """A relay from a DSN string or a ``{dsn = ..., option = ...}`` table.

    Raises :class:`InvalidRelayError` naming the bad part.
    """
    if isinstance(spec, str):
        return parse_relay(name, spec, dict(env))
    options = dict(spec)
    dsn = options.pop("dsn", None)
    if not dsn:
        raise InvalidRelayError(f"relay {name!r} needs a dsn")
    # Secret sources are resolved by the DSN parser, so they go into the query string.
    secrets = {k: options.pop(k) for k in list(options) if k in _SECRET_OPTIONS}
    if secrets:
        dsn += ("&" if "?" in dsn else "?") + urlencode(secrets)
    relay = parse_relay(name, dsn, dict(env))
    return relay.with_options(**options) if options else relay


def queue_from_spec(name: str, spec: Mapping[str, Any], where: str = "") -> QueueSettings:
    """Queue limits from a ``{lifetime = ..., max_attempts = ...}`` table; unset means
    the retry policy's own value."""
    unknown = set(spec) - {"lifetime", "max_attempts"}
    if unknown:
        raise ConfigError(f"{where}[queues.{name}]: unknown key(s) "
                          f"{', '.join(sorted(unknown))}; allowed: lifetime, max_attempts")
    try:
        attempts = int(spec["max_attempts"]) if "max_attempts" in spec else None
        if attempts is not None and attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        lifetime = parse_duration(spec["lifetime"]) if "lifetime" in spec else None
        if lifetime is not None and not 0 < lifetime <= MAX_DURATION:
            raise ValueError("lifetime must be above zero and at most 10 years")
        return QueueSettings(name, lifetime=lifetime, max_attempts=attempts)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}[queues.{name}]: {exc}") from None


_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _check_urls(settings: Settings) -> None:
    """redis_url and broker_url as URLs, checked at load: a wrong one otherwise surfaces
    at the first send() as a client library's error that names no option."""
    url = settings.redis_url
    if not isinstance(url, str) or url.partition("://")[0].lower() not in _REDIS_SCHEMES \
            or "://" not in url:
        raise ConfigError(f"redis_url={shown(redact_url(url) if isinstance(url, str) else url)}"
                          " is not a Redis URL: use redis://host:6379/0, rediss://host:6380/0 "
                          "(TLS) or unix:///path/to/redis.sock")
    broker = settings.broker_url
    if broker is not None and (not isinstance(broker, str) or "://" not in broker):
        shown_broker = redact_url(broker) if isinstance(broker, str) else broker
        raise ConfigError(f"broker_url={shown(shown_broker)} is not a broker URL: use e.g. "
                          "redis://host:6379/1 or amqp://user@host:5672//, or leave it unset "
                          "to use redis_url")


def _check_routes(settings: Settings) -> None:
    """Each rule's relay and queues exist (relays only where any are configured: a
    producer may leave relays to its workers, as for relay= in send())."""
    for i, rule in enumerate(settings.routes):
        where = f"[[routes]] rule {i + 1} ({rule.describe()})"
        targets = {*settings.relays, *settings.groups}
        if settings.relays and rule.relay not in targets:
            raise ConfigError(f"{where}: unknown relay {rule.relay!r} (known: "
                              f"{', '.join(sorted(targets))}); define it under [relays]")
        for q in rule.queue:
            if q not in settings.queues:
                raise ConfigError(f"{where}: unknown queue {q!r} (known: "
                                  f"{', '.join(sorted(settings.queues))})")


def check_settings(settings: Settings) -> Settings:
    """Checks across settings, for every way of building them (file, env, frameworks)."""
    if settings.default_queue not in settings.queues:
        settings.queue()  # raises with the list of known queues
    # The [retry] table is checked where it is read (mailworker.policy_config).
    for where, seconds in ((f"[queues.{q.name}] lifetime", q.lifetime)
                           for q in settings.queues.values() if q.lifetime is not None):
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_DURATION):
            raise ConfigError(f"{where}={shown(seconds)} is not a duration above zero and at "
                              "most 10 years")
    _check_urls(settings)
    if settings.groups:
        try:
            check_groups(settings.groups, set(settings.relays))
        except GroupError as exc:
            raise ConfigError(f"{exc}; see config/README.md") from None
    _check_routes(settings)
    if settings.lease_seconds < 3:
        # The heartbeat renews every lease_seconds / 3: below a second, a Redis hiccup
        # would lose leases of live batches.
        raise ConfigError(
            f"lease_seconds={settings.lease_seconds:g}s is too short: use 3s or more "
            "(the default 15s lets a killed worker's mail move again within about 26s)")
    return settings
