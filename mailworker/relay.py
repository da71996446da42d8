"""Relays: where mail goes, parsed from a DSN, with every connection option in one value.

A relay DSN is one of::

    smtp://[user[:password]@]host[:port][?options]            STARTTLS when offered (port 25)
    smtp+starttls://[user[:password]@]host[:port][?options]   STARTTLS required (port 587)
    smtps://[user[:password]@]host[:port][?options]           implicit TLS (port 465)

TLS levels (``tls=``; the names and meanings of Postfix's ``smtp_tls_security_level``):

=========  ==============================================================  ===============
level      meaning                                                         default for
=========  ==============================================================  ===============
none       never STARTTLS (``smtp://`` only)
may        STARTTLS when offered, certificate not checked; a failed        ``smtp://``
           handshake falls back to clear text on a new connection
           (opportunistic TLS, RFC 7435; ``smtp://`` only)
encrypt    TLS required, certificate not checked
verify     TLS required, certificate and host name verified                ``smtp+starttls://``,
                                                                           ``smtps://``
=========  ==============================================================  ===============

``verify=false`` is the older spelling: ``tls=encrypt`` on ``smtp+starttls://`` and
``smtps://``, ``tls=may`` on ``smtp://``, both with ``allow_unverified_auth=true`` (it
always sent credentials over unverified TLS and still does).

Options (query string; all optional; numbers must lie in the range shown):

=====================  ========  ===================================================
option                 default   meaning
=====================  ========  ===================================================
timeout                30        wall-clock limit for each reply, and for a write stalled, seconds
deadline               120       wall-clock limit for one whole transaction, seconds
connect_timeout        10        TCP connect, seconds
setup_timeout          60        greeting, EHLO, STARTTLS and handshake, AUTH: all of it
tls                    (scheme)  none, may, encrypt or verify: see above
verify                           false: the older spelling of an unverified level (above)
ca_file                          extra CA bundle (PEM) to trust, e.g. a private CA
allow_plain_auth       false     allow AUTH over an unencrypted channel (implies the next)
allow_unverified_auth  false     allow AUTH over TLS whose certificate was not verified
local_hostname                   name sent in EHLO (default: the machine's FQDN)
pipelining             true      use RFC 2920 PIPELINING when the server offers it
chunking               true      with PIPELINING, send BDAT (RFC 3030 CHUNKING) when offered,
                                 whole transactions pipelined (false: DATA, as before)
pipeline_window        8         BDAT transactions in flight per connection, 1-100
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

Everything is checked here, at load, so a bad relay stops the process with a message
naming the relay and the option rather than failing every message at send time:
numbers finite and in range, port 1-65535, ``local_hostname`` a valid EHLO name,
``ca_file`` a readable PEM bundle, secrets present, no option given twice.

Credentials can stay out of the URL (``password_env`` / ``password_file``), and the
password is never part of ``repr()`` or of the pool key's ``repr()``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import ssl
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["TLS_LEVELS", "InvalidRelayError", "Relay", "RelayKey", "Security", "TLSLevel",
           "parse_relay"]

Security = Literal["starttls-optional", "starttls", "tls"]
TLSLevel = Literal["none", "may", "encrypt", "verify"]
TLS_LEVELS: tuple[TLSLevel, ...] = ("none", "may", "encrypt", "verify")

_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("starttls-optional", 25),
    "smtp+starttls": ("starttls", 587),
    "smtps": ("tls", 465),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_HOST_RE = re.compile(r"^[A-Za-z0-9._:\-\[\]]+$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SECRET_KEY = os.urandom(16)  # per process: pool keys compare credentials, never store them


class InvalidRelayError(ValueError):
    """A relay DSN or option is malformed; the message names the bad part and the fix."""


@dataclass(frozen=True)
class RelayKey:
    """Everything that makes two relays' connections different; relays with equal keys
    share a pool. Holds a keyed hash of the credentials, never the password, and even
    that hash stays out of ``repr()``."""

    name: str
    host: str
    port: int
    security: Security
    tls: TLSLevel
    ca_file: str | None
    username: str | None
    local_hostname: str | None
    allow_plain_auth: bool
    allow_unverified_auth: bool
    pipelining: bool
    credentials: str = field(repr=False)
    chunking: bool = True
    pipeline_window: int = 8


@dataclass(frozen=True)
class Relay:
    """One SMTP destination with its connection and pool options.

    ``tls`` and ``verify`` may be left unset (None) when the relay is made: the scheme
    and ``verify`` decide the level (see the module docstring), and afterwards ``tls``
    is always a level and ``verify`` says whether that level verifies the certificate.
    """

    name: str
    host: str
    port: int
    security: Security = "starttls-optional"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    deadline: float = 120.0
    connect_timeout: float = 10.0
    setup_timeout: float = 60.0
    tls: TLSLevel | None = None
    verify: bool | None = None
    ca_file: str | None = None
    allow_plain_auth: bool = False
    allow_unverified_auth: bool = False
    local_hostname: str | None = None
    pipelining: bool = True
    chunking: bool = True
    pipeline_window: int = 8
    max_connections: int = 10
    max_messages: int = 100
    max_age: float = 300.0
    idle_timeout: float = 60.0
    noop_after: float = 10.0
    fleet_max_connections: int | None = None
    fleet_rate: float | None = None

    def __post_init__(self) -> None:
        level, unverified_auth = _tls_level(self.name, self.security, self.tls, self.verify)
        object.__setattr__(self, "tls", level)
        object.__setattr__(self, "verify", level == "verify")
        if unverified_auth:
            object.__setattr__(self, "allow_unverified_auth", True)

    @property
    def level(self) -> TLSLevel:
        """The TLS level (``tls``), typed as always set."""
        return self.tls or "verify"  # never None after __post_init__

    @property
    def key(self) -> RelayKey:
        secret = f"{self.username or ''}\0{self.password or ''}".encode()
        return RelayKey(self.name, self.host.lower(), self.port, self.security, self.level,
                        self.ca_file, self.username, self.local_hostname,
                        self.allow_plain_auth, self.allow_unverified_auth, self.pipelining,
                        hmac.new(_SECRET_KEY, secret, hashlib.sha256).hexdigest(),
                        self.chunking, self.pipeline_window)

    @property
    def address(self) -> str:
        """``host:port`` for log lines."""
        return f"{self.host}:{self.port}"

    def with_options(self, **options: Any) -> Relay:
        """A copy with some options changed (validated like DSN options).

        Changing one of ``tls`` and ``verify`` decides the level afresh from it (the
        other is forgotten), as if the DSN had said only that one."""
        changed = _coerce_options(
            self.name, {k: "" if v is None else _text(v) for k, v in options.items()})
        if "verify" in changed and "tls" not in changed:
            changed["tls"] = None
        elif "tls" in changed and "verify" not in changed:
            changed["verify"] = None
        return replace(self, **changed)

    @property
    def dsn(self) -> str:
        """The DSN without the password, safe to print; ``?tls=`` when not the scheme's."""
        scheme = {v[0]: k for k, v in _SCHEMES.items()}[self.security]
        user = f"{self.username}@" if self.username else ""
        level = "" if self.level == _DEFAULT_LEVEL[self.security] else f"?tls={self.level}"
        return f"{scheme}://{user}{self.host}:{self.port}{level}"


_DEFAULT_LEVEL: dict[Security, TLSLevel] = {
    "starttls-optional": "may", "starttls": "verify", "tls": "verify"}


def _tls_level(name: str, security: Security, tls: str | None, verify: bool | None
               ) -> tuple[TLSLevel, bool]:
    """The TLS level from the scheme, ``tls`` and the older ``verify``; and whether
    ``verify=false`` (which always allowed AUTH over unverified TLS) was the source."""
    scheme = {v[0]: k for k, v in _SCHEMES.items()}[security]
    if tls is None:
        if verify is None:
            return _DEFAULT_LEVEL[security], False
        if verify:
            if security == "starttls-optional":
                raise InvalidRelayError(
                    f"relay {name!r}: verify=true does not apply to smtp://, which encrypts "
                    "when it can without checking the certificate (tls=may); to require a "
                    "verified certificate use smtp+starttls:// (or tls=verify)")
            return "verify", False
        return ("may" if security == "starttls-optional" else "encrypt"), True
    if tls not in TLS_LEVELS:
        raise InvalidRelayError(
            f"relay {name!r}: option tls={tls!r} is not one of none, may, encrypt, verify")
    if security != "starttls-optional" and tls in ("none", "may"):
        raise InvalidRelayError(
            f"relay {name!r}: tls={tls} does not fit {scheme}://, which always encrypts; "
            f"use smtp://...?tls={tls}, or tls=encrypt / tls=verify on {scheme}://")
    if verify is not None and verify != (tls == "verify"):
        raise InvalidRelayError(
            f"relay {name!r}: verify={'true' if verify else 'false'} contradicts tls={tls}; "
            "give only tls= (verify= is its older spelling)")
    return tls, False  # checked against TLS_LEVELS above (mypy narrows it)


_TYPE_NAMES: dict[str, type] = {"float": float, "int": int, "bool": bool,
                                 "bool | None": bool, "int | None": int, "float | None": float}
_OPTION_TYPES: dict[str, type] = {
    f.name: _TYPE_NAMES.get(str(f.type), str)
    for f in fields(Relay)
    if f.name not in {"name", "host", "port", "security", "username", "password"}
}
_HOUR, _DAY = 3600.0, 86400.0
# (lowest, highest): seconds for floats, counts for ints. Above zero throughout; the upper
# bounds only catch typos (a timeout in milliseconds) and values that overflow timers.
_RANGES: dict[str, tuple[float, float]] = {
    "timeout": (0.001, _HOUR), "deadline": (0.001, _DAY), "connect_timeout": (0.001, _HOUR),
    "setup_timeout": (0.001, _HOUR), "max_age": (0.001, 7 * _DAY),
    "idle_timeout": (0.001, _DAY), "noop_after": (0.001, _DAY), "fleet_rate": (0.001, 1e6),
    "max_connections": (1, 1000), "max_messages": (1, 1_000_000),
    "fleet_max_connections": (1, 100_000), "pipeline_window": (1, 100),
}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
                word = value.lower()
                if word not in _TRUE | _FALSE:
                    raise ValueError
                out[key] = word in _TRUE
            elif kind is str:
                out[key] = (value.lower() if key == "tls" else value) or None
            else:
                number = kind(value)
                low, high = _RANGES[key]
                if not (math.isfinite(number) and low <= number <= high):
                    raise ValueError
                out[key] = number
        except ValueError:
            low, high = _RANGES.get(key, (0, 0))
            want = {bool: "true or false",
                    int: f"a whole number from {low:g} to {high:g}",
                    float: f"a number of seconds above 0 and at most {high:g}"}.get(kind, "text")
            if key == "fleet_rate":
                want = f"a number of messages per second above 0 and at most {high:g}"
            raise InvalidRelayError(
                f"relay {name!r}: option {key}={value!r} is not {want}"
            ) from None
    if out.get("local_hostname"):
        _check_ehlo_name(name, out["local_hostname"])
    if out.get("ca_file"):
        _check_ca_file(name, out["ca_file"])
    return out


def _check_ehlo_name(name: str, host: str) -> None:
    """EHLO takes a domain (letters, digits, hyphens) or an address literal ``[...]``."""
    if host.startswith("[") and host.endswith("]"):
        literal = host[1:-1]
        v6 = literal[:5].lower() == "ipv6:"
        try:
            ok = ipaddress.ip_address(literal[5:] if v6 else literal).version == (6 if v6 else 4)
        except ValueError:
            ok = False
    else:
        labels = host.removesuffix(".").split(".")
        ok = len(host) <= 253 and all(_LABEL_RE.match(label) for label in labels)
    if not ok:
        raise InvalidRelayError(
            f"relay {name!r}: option local_hostname={host!r} is not a valid EHLO name; use a "
            "domain (letters, digits, hyphens, dots) or an address literal like [192.0.2.1]")


def _check_ca_file(name: str, path: str) -> None:
    """The CA bundle must load now: a typo found at the first send pauses all mail."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        why = f"not a PEM certificate bundle ({exc.reason or exc})"
    except OSError as exc:  # missing, unreadable, a directory
        why = exc.strerror or str(exc)
    else:
        return
    raise InvalidRelayError(f"relay {name!r}: option ca_file={path!r}: {why}")


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
        port = parts.port
        if port == 0:
            raise ValueError
    except ValueError:
        raise InvalidRelayError(
            f"relay {name!r}: port in {_redact_dsn(dsn)!r} is not a number from 1 to 65535"
        ) from None
    if parts.path not in ("", "/") or parts.fragment:
        shown = "" if "@" in parts.path or parts.fragment else f" {parts.path!r}"
        raise InvalidRelayError(
            f"relay {name!r}: unexpected path or '#'{shown} in the DSN; options go after "
            "'?', and a '/', '@', ':' or '#' in the password must be percent-encoded "
            "(%2F, %40, %3A, %23)")
    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    raw = dict(pairs)
    if len(raw) != len(pairs):
        twice = sorted({k for k, _ in pairs if [p[0] for p in pairs].count(k) > 1})
        raise InvalidRelayError(f"relay {name!r}: option(s) given twice: {', '.join(twice)}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None

    for secret in ("username_env", "password_env", "password_file"):
        if secret in raw and not raw[secret]:
            raise InvalidRelayError(f"relay {name!r}: option {secret} is empty")
    if var := raw.pop("username_env", None):
        username = _from_env(name, env, var)
    if var := raw.pop("password_env", None):
        password = _from_env(name, env, var)
    if path := raw.pop("password_file", None):
        try:
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise InvalidRelayError(
                f"relay {name!r}: cannot read password_file {path!r}: {why}"
            ) from None
    if password and not username:
        raise InvalidRelayError(f"relay {name!r}: a password is set but no user name")

    options = _coerce_options(name, raw)
    return Relay(name=name, host=host, port=port or default_port, security=security,
                 username=username, password=password, **options)


def _from_env(name: str, env: Any, var: str) -> str:
    value = env.get(var)
    if not value:
        raise InvalidRelayError(f"relay {name!r}: environment variable {var} is not set")
    return str(value)


def _redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for error messages.

    The user info ends at the *last* ``@`` (a password may contain an unencoded ``@``,
    ``:`` or ``/``), so everything from the first ``:`` after ``//`` to that ``@`` goes.
    """
    scheme, sep, rest = dsn.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return dsn
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"
