"""Settings: one immutable value built from defaults, a TOML file and the environment.

Precedence, lowest first: built-in defaults, the TOML file named by ``MAILWORKER_CONFIG``
(or passed explicitly), then ``MAILWORKER_*`` environment variables. Every setting is
documented in ``config/README.md``. A bad value fails at load with a message that names
the setting and what it accepts: a worker that starts is a worker whose config parsed.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from mailworker.policy import Policy, parse_duration
from mailworker.relay import InvalidRelayError, Relay, parse_relay

__all__ = ["ConfigError", "QueueSettings", "Settings", "check_settings", "load_settings",
           "queue_from_spec", "relay_from_spec"]

DEFAULT_QUEUES = ("transactional", "bulk")
_SECRET_OPTIONS = {"username_env", "password_env", "password_file"}


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names it and what it accepts."""


@dataclass(frozen=True)
class QueueSettings:
    """Per-queue delivery limits; a message may shorten its own lifetime."""

    name: str
    lifetime: float | None = None      # None: the [retry] policy's lifetime (default 24 h)
    max_attempts: int | None = None    # None: the [retry] policy's max_attempts (default 20)


@dataclass(frozen=True)
class Settings:
    """Everything a producer, worker or scheduler needs to know."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None
    key_prefix: str = "mw"
    relays: Mapping[str, Relay] = field(default_factory=dict)
    default_relay: str = "default"
    queues: Mapping[str, QueueSettings] = field(
        default_factory=lambda: {q: QueueSettings(q) for q in DEFAULT_QUEUES}
    )
    default_queue: str = "transactional"
    default_sender: str | None = None
    max_message_size: int = 10 * 1024 * 1024
    retention: float = 7 * 86400.0
    # Short leases, renewed by the heartbeat every lease/3 while the batch runs: a killed
    # worker's mail moves again within lease + stuck_after (+ a tick), 26 s by default.
    lease_seconds: float = 15.0
    stuck_after: float = 10.0
    batch_size: int = 50
    tick_interval: float = 1.0
    task_time_limit: float = 600.0
    visibility_timeout: float = 3600.0
    policy: Policy = field(default_factory=Policy)

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
        return q.lifetime if q is not None and q.lifetime is not None else self.policy.lifetime

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


_SCALARS: dict[str, type] = {
    "redis_url": str, "broker_url": str, "key_prefix": str, "default_relay": str,
    "default_queue": str, "default_sender": str, "max_message_size": int,
    "retention": float, "lease_seconds": float, "stuck_after": float, "batch_size": int,
    "tick_interval": float, "task_time_limit": float, "visibility_timeout": float,
}
_DURATIONS = {"retention", "lease_seconds", "stuck_after", "tick_interval",
              "task_time_limit", "visibility_timeout"}


def _coerce(name: str, value: Any) -> Any:
    kind = _SCALARS[name]
    try:
        if name in _DURATIONS:
            seconds = parse_duration(value)
            if seconds <= 0:  # 0 would disable leases, time limits or retention
                raise ValueError
            return seconds
        if kind is int:
            number = int(value)
            if number <= 0:
                raise ValueError
            return number
        return str(value)
    except (TypeError, ValueError):
        hint = ("a duration above zero, like 30, '90s', '15m', '24h'" if name in _DURATIONS
                else "a positive whole number")
        raise ConfigError(f"setting {name}={value!r} is not {hint}") from None


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
        elif key not in {"relays", "queues", "retry"}:
            raise ConfigError(f"config file: unknown setting {key!r}; see config/README.md")
    for key in _SCALARS:
        var = f"MAILWORKER_{key.upper()}"
        if env.get(var):
            values[key] = _coerce(key, env[var])

    relays: dict[str, Relay] = {}
    try:
        for name, spec in (top.get("relays") or {}).items():
            relays[name] = relay_from_spec(name, spec, env)
        for var, dsn in env.items():
            if var.startswith("MAILWORKER_RELAY_") and dsn:
                name = var.removeprefix("MAILWORKER_RELAY_").lower()
                relays[name] = parse_relay(name, dsn, dict(env))
    except InvalidRelayError as exc:
        raise ConfigError(str(exc)) from None
    values["relays"] = relays

    queues = {q: QueueSettings(q) for q in DEFAULT_QUEUES}
    for name, spec in (top.get("queues") or {}).items():
        queues[name] = queue_from_spec(name, spec, where="config file: ")
    values["queues"] = queues

    try:
        values["policy"] = Policy.from_config(top.get("retry") or {})
    except ValueError as exc:
        raise ConfigError(f"config file: [retry]: {exc}") from None

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
        if lifetime is not None and lifetime <= 0:
            raise ValueError("lifetime must be above zero")
        return QueueSettings(name, lifetime=lifetime, max_attempts=attempts)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}[queues.{name}]: {exc}") from None


def check_settings(settings: Settings) -> Settings:
    """Checks across settings, for every way of building them (file, env, frameworks)."""
    if settings.default_queue not in settings.queues:
        settings.queue()  # raises with the list of known queues
    if settings.lease_seconds < 3:
        # The heartbeat renews every lease_seconds / 3: below a second, a Redis hiccup
        # would lose leases of live batches.
        raise ConfigError(
            f"lease_seconds={settings.lease_seconds:g}s is too short: use 3s or more "
            "(the default 15s lets a killed worker's mail move again within about 26s)")
    return settings
