"""``mailworker check RELAY``: debug a relay in ten seconds.

Connects exactly as a worker would (same TLS policy, same AUTH rules), prints every reply
of the session, the server's capabilities and what was negotiated, then QUITs. Nothing is
sent. On failure it says at which stage and what usually fixes it.
"""

from __future__ import annotations

from typing import Any

from mailworker.cli.output import CLIError, say
from mailworker.relay import InvalidRelayError, Relay, parse_relay
from mailworker.smtp import CleartextAuthRefused, Connection
from mailworker.smtp.errors import error_stage, error_text

__all__ = ["run_check"]

HINTS = {
    "connect": "is the host and port right, and is the server up? (firewalls drop silently: "
               "a timeout here usually means one)",
    "greeting": "the server refused the session; it may be overloaded or rate-limiting you",
    "ehlo": "the server rejected our EHLO name; set local_hostname=... on the relay",
    "tls": "certificate not trusted or STARTTLS missing: add ca_file=/path/ca.pem for a "
           "private CA; verify=false only for lab relays; use smtps:// for port 465",
    "auth": "check the user name and password (password_env / password_file), and that the "
            "server offers AUTH on this port",
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


def _resolve(target: str | None) -> Relay:
    if target and "://" in target:
        try:
            return parse_relay("check", target)
        except InvalidRelayError as exc:
            raise CLIError(str(exc), "see config/README.md, 'Relays'", 3) from None
    from mailworker.config import load_settings

    return load_settings().relay(target)


def run_check(target: str | None) -> int:
    relay = _resolve(target)
    say(f"checking relay {relay.name!r}: {relay.dsn} (security: {relay.security}, "
        f"verify: {relay.verify})")
    log = _Transcript()
    conn = Connection(relay, logger=log)
    failure: BaseException | None = None
    facts: dict[str, Any] = {}
    try:
        conn.open()
        conn.noop()
        facts = {"caps": dict(conn.capabilities), "encrypted": conn.encrypted,
                 "pipelining": conn.supports_pipelining, "max_size": conn.max_size}
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
        stage = error_stage(failure)
        where = stage.value if stage else "connect"
        hint = "cleartext-auth" if isinstance(failure, CleartextAuthRefused) else where
        raise CLIError(f"relay {relay.name!r} failed at {where}: {error_text(failure)}",
                       HINTS.get(hint), 1)
    caps = facts["caps"]
    say("\ncapabilities: " + (", ".join(f"{k} {v}".strip() for k, v in caps.items()) or "-"))
    say(f"encrypted:    {'yes' if facts['encrypted'] else 'NO'}")
    say(f"pipelining:   {'yes' if facts['pipelining'] else 'no'}")
    say(f"max size:     {facts['max_size'] or 'not declared'}")
    say(f"auth:         {'logged in as ' + relay.username if relay.username else 'not used'}")
    say(f"\nrelay {relay.name!r} OK")
    return 0
