"""Relays: where mail goes, parsed from a DSN, with every connection option in one value.

A relay DSN is one of::

    smtp://[user[:password]@]host[:port][?options]            STARTTLS when offered (port 25)
    smtp+starttls://[user[:password]@]host[:port][?options]   STARTTLS required (port 587)
    smtps://[user[:password]@]host[:port][?options]           implicit TLS (port 465)

Options (query string; all optional):

=====================  ========  ===================================================
option                 default   meaning
=====================  ========  ===================================================
timeout                30        socket timeout for each read/write, seconds
deadline               120       wall-clock limit for one whole transaction, seconds
connect_timeout        10        TCP connect + greeting, seconds
verify                 true      verify the server certificate (false only for labs)
ca_file                          extra CA bundle (PEM) to trust, e.g. a private CA
allow_plain_auth       false     allow AUTH over an unencrypted channel
local_hostname                   name sent in EHLO (default: the machine's FQDN)
pipelining             true      use RFC 2920 PIPELINING when the server offers it
max_connections        10        per worker process
max_messages           100       messages per connection before it is retired
max_age                300       seconds a connection may live
idle_timeout           60        seconds an idle pooled connection is kept
noop_after             10        idle seconds after which checkout sends a NOOP
fleet_max_connections            connections to this relay across ALL workers (Redis-kept)
fleet_rate                       messages per second to this relay across ALL workers
username_env                     read the user name from this environment variable
password_env                     read the password from this environment variable
password_file                    read the password from this file (trailing newline stripped)
=====================  ========  ===================================================

Credentials can stay out of the URL (``password_env`` / ``password_file``), and the
password is never part of ``repr()`` or of the pool key's ``repr()``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["InvalidRelayError", "Relay", "RelayKey", "Security", "parse_relay"]

Security = Literal["starttls-optional", "starttls", "tls"]

_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("starttls-optional", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_HOST_RE = re.compile(r"^[A-Za-z0-9._:\-\[\]]+$")


class InvalidRelayError(ValueError):
    """A relay DSN or option is malformed; the message names the bad part and the fix."""


class RelayKey(NamedTuple):
    """What makes two relays share connections. Never holds the password."""

    host: str
    port: int
    security: Security
    username: str | None


@dataclass(frozen=True)
class Relay:
    """One SMTP destination with its connection and pool options."""

    name: str
    host: str
    port: int
    security: Security = "starttls-optional"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    deadline: float = 120.0
    connect_timeout: float = 10.0
    verify: bool = True
    ca_file: str | None = None
    allow_plain_auth: bool = False
    local_hostname: str | None = None
    pipelining: bool = True
    max_connections: int = 10
    max_messages: int = 100
    max_age: float = 300.0
    idle_timeout: float = 60.0
    noop_after: float = 10.0
    fleet_max_connections: int | None = None
    fleet_rate: float | None = None

    @property
    def key(self) -> RelayKey:
        return RelayKey(self.host.lower(), self.port, self.security, self.username)

    @property
    def address(self) -> str:
        """``host:port`` for log lines."""
        return f"{self.host}:{self.port}"

    def with_options(self, **options: Any) -> Relay:
        """A copy with some options changed (validated like DSN options)."""
        return replace(self, **_coerce_options(self.name, {k: str(v) for k, v in options.items()}))

    @property
    def dsn(self) -> str:
        """The DSN without the password, safe to print."""
        scheme = {v[0]: k for k, v in _SCHEMES.items()}[self.security]
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


_TYPE_NAMES: dict[str, type] = {"float": float, "int": int, "bool": bool,
                                 "int | None": int, "float | None": float}
_OPTION_TYPES: dict[str, type] = {
    f.name: _TYPE_NAMES.get(str(f.type), str)
    for f in fields(Relay)
    if f.name not in {"name", "host", "port", "security", "username", "password"}
}


def _coerce_options(name: str, raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind = _OPTION_TYPES.get(key)
        if kind is None:
            known = ", ".join(sorted(_OPTION_TYPES))
            raise InvalidRelayError(
                f"relay {name!r}: unknown option {key!r}; known options: {known}")
        try:
            if kind is bool:
                low = value.lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError
                out[key] = low in _TRUE
            elif kind is str:
                out[key] = value or None
            else:
                number = kind(value)
                if number <= 0:
                    raise ValueError
                out[key] = number
        except ValueError:
            want = {bool: "true or false", int: "a positive whole number",
                    float: "a positive number of seconds"}.get(kind, "text")
            raise InvalidRelayError(
                f"relay {name!r}: option {key}={value!r} is not {want}"
            ) from None
    return out


def parse_relay(name: str, dsn: str, environ: dict[str, str] | None = None) -> Relay:
    """Parse a relay DSN; raise :class:`InvalidRelayError` naming the bad part.

    ``username_env``, ``password_env`` and ``password_file`` are resolved here, at load,
    so that a missing secret fails when the worker starts rather than at the first send.
    """
    env = os.environ if environ is None else environ
    if not dsn or not dsn.strip():
        raise InvalidRelayError(
            f"relay {name!r}: the DSN is empty; expected e.g. smtp://mail.example.com:25")
    try:
        parts = urlsplit(dsn.strip())
    except ValueError as exc:
        raise InvalidRelayError(f"relay {name!r}: cannot parse DSN: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise InvalidRelayError(
            f"relay {name!r}: scheme {parts.scheme!r} is not supported; "
            "use smtp://, smtp+starttls:// or smtps://"
        )
    security, default_port = _SCHEMES[scheme]
    host = parts.hostname
    if not host or not _HOST_RE.match(host):
        raise InvalidRelayError(f"relay {name!r}: missing or invalid host in {_redact_dsn(dsn)!r}")
    try:
        port = parts.port or default_port
    except ValueError:
        raise InvalidRelayError(
            f"relay {name!r}: port in {_redact_dsn(dsn)!r} is not a number from 1 to 65535"
        ) from None
    if parts.path not in ("", "/"):
        raise InvalidRelayError(
            f"relay {name!r}: unexpected path {parts.path!r}; options go after '?'")
    raw = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None

    if var := raw.pop("username_env", None):
        username = _from_env(name, env, var)
    if var := raw.pop("password_env", None):
        password = _from_env(name, env, var)
    if path := raw.pop("password_file", None):
        try:
            password = Path(path).read_text().rstrip("\r\n")
        except OSError as exc:
            raise InvalidRelayError(
                f"relay {name!r}: cannot read password_file {path!r}: {exc.strerror}"
            ) from None
    if password and not username:
        raise InvalidRelayError(f"relay {name!r}: a password is set but no user name")

    options = _coerce_options(name, raw)
    return Relay(name=name, host=host, port=port, security=security,
                 username=username, password=password, **options)


def _from_env(name: str, env: Any, var: str) -> str:
    value = env.get(var)
    if not value:
        raise InvalidRelayError(f"relay {name!r}: environment variable {var} is not set")
    return str(value)


def _redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for error messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
