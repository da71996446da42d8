"""``mailworker check RELAY``: debug a relay in ten seconds.

Connects exactly as a worker would (same TLS level, same AUTH rules), prints every reply
of the session, the server's capabilities and what was negotiated (TLS level, encrypted
or not, certificate verified or not), then QUITs. Nothing is sent. On failure it says at
which stage and what usually fixes it.
"""

from __future__ import annotations

from typing import Any

from mailworker.cli.output import CLIError, say
from mailworker.relay import InvalidRelayError, Relay, parse_relay
from mailworker.smtp import CleartextAuthRefused, Connection
from mailworker.smtp.errors import failure_of
from mailworker.smtp.tls import UnverifiedAuthRefused

__all__ = ["run_check"]

HINTS = {
    "connect": "is the host and port right, and is the server up? (firewalls drop silently: "
               "a timeout here usually means one)",
    "greeting": "the server refused the session; it may be overloaded or rate-limiting you",
    "ehlo": "the server rejected our EHLO name; set local_hostname=... on the relay",
    "tls": "certificate not trusted or STARTTLS missing: add ca_file=/path/ca.pem for a "
           "private CA; tls=encrypt (encrypted, certificate not checked) only for lab "
           "relays; use smtps:// for port 465",
    "auth": "check the user name and password (password_env / password_file), and that the "
            "server offers AUTH on this port",
    "unverified-auth": "mailworker will not send the password to a server whose certificate "
                       "it could not verify: add ca_file=/path/ca.pem for a private CA, or "
                       "set allow_unverified_auth=true knowing an active attacker could "
                       "take it",
    "cleartext-auth": "mailworker will not send the password without encryption: use "
                      "smtp+starttls:// or smtps:// (TLS), or set allow_plain_auth=true only "
                      "for a relay on localhost or a trusted network",
}


class _Transcript:
    """A structlog-like logger that keeps the session's events for printing."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def bind(self, **_: Any) -> _Transcript:
        return self

    def is_enabled_for(self, _level: int) -> bool:
        return True

    def _add(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    info = debug = warning = error = _add


LEVELS = {
    "none": "never STARTTLS",
    "may": "STARTTLS when offered, certificate not checked, clear text if it fails",
    "encrypt": "TLS required, certificate not checked",
    "verify": "TLS required, certificate verified",
}


def _encrypted(conn: Connection) -> str:
    if conn.encrypted:
        return "yes (implicit TLS)" if conn.relay.security == "tls" else "yes (STARTTLS)"
    if conn.tls_fallback:
        return "NO (STARTTLS failed; fell back to clear text, as tls=may does)"
    if conn.relay.level == "none":
        return "NO (tls=none)"
    return "NO (the server does not offer STARTTLS)"


def _verified(conn: Connection) -> str:
    if conn.verified:
        return "yes (certificate and host name)"
    if not conn.encrypted:
        return "no (not encrypted)"
    return (f"no: not checked (tls={conn.relay.level} does not check certificates; "
            "tls=verify or smtp+starttls:// does)")


def _resolve(target: str | None) -> Relay:
    if target and "://" in target:
        try:
            return parse_relay("check", target)
        except InvalidRelayError as exc:
            raise CLIError(str(exc), "see config/README.md, 'Relays'", 3) from None
    from mailworker.config import load_settings

    settings = load_settings()
    group = settings.groups.get(target or settings.default_relay)
    if group is not None:
        raise CLIError(f"{group.name!r} is a relay group: {group.describe()}",
                       "check its members one by one, e.g. mailworker check "
                       f"{group.members[0]}", 3)
    return settings.relay(target)


def run_check(target: str | None) -> int:
    relay = _resolve(target)
    say(f"checking relay {relay.name!r}: {relay.dsn} (tls={relay.level}: "
        f"{LEVELS[relay.level]})")
    log = _Transcript()
    conn = Connection(relay, logger=log)
    failure: BaseException | None = None
    facts: dict[str, Any] = {}
    try:
        conn.open()
        conn.noop()
        facts = {"caps": dict(conn.capabilities), "encrypted": _encrypted(conn),
                 "verified": _verified(conn),
                 "pipelining": conn.supports_pipelining, "chunking": conn.supports_chunking,
                 "max_size": conn.max_size}
    except Exception as exc:
        failure = exc
    finally:
        conn.close(quit=failure is None)
    for event, kw in log.events:
        if event == "smtp.reply":
            text = str(kw.get("text", "")).replace("\n", "\n" + " " * 14)
            say(f"  -> {kw.get('command', ''):<8.60}\n  <- {kw.get('code')} "
                f"({kw.get('latency_ms', 0):.1f} ms) {text}")
    if failure is not None:
        facts_ = failure_of(failure)
        where = facts_.stage.value if facts_.stage else "connect"
        hint = ("unverified-auth" if isinstance(failure, UnverifiedAuthRefused)
                else "cleartext-auth" if isinstance(failure, CleartextAuthRefused) else where)
        raise CLIError(f"relay {relay.name!r} failed at {where}: {facts_.summary}",
                       HINTS.get(hint), 1)
    caps = facts["caps"]
    say("\ncapabilities: " + (", ".join(f"{k} {v}".strip() for k, v in caps.items()) or "-"))
    say(f"tls level:    {relay.level}")
    say(f"encrypted:    {facts['encrypted']}")
    say(f"verified:     {facts['verified']}")
    say(f"pipelining:   {'yes' if facts['pipelining'] else 'no'}")
    say("chunking:     " + (f"yes (BDAT, {relay.pipeline_window} messages in flight)"
                            if facts["chunking"] else "no"))
    say(f"max size:     {facts['max_size'] or 'not declared'}")
    say(f"auth:         {'logged in as ' + relay.username if relay.username else 'not used'}")
    say(f"\nrelay {relay.name!r} OK")
    return 0
