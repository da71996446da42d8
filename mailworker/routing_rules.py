"""Routing rules: which relay a message goes to, by sender domain, recipient domain,
queue and metadata (the ``[[routes]]`` tables of the config file).

Rules are tried in order and the first whose conditions all hold wins; a rule without
conditions matches everything (a catch-all at the end). No rule matching means the
default relay. An explicit ``relay=`` in ``send()`` is the caller's choice and wins over
every rule.

The recipient domain is decided per recipient, so one message may need two relays: it is
then split at enqueue into one record per relay (see :func:`split`), each delivered and
tracked per recipient like any record (``mailworker.api`` links the parts).

Domains match exactly (any case) or, written ``*.example.com``, any subdomain of
example.com (not example.com itself: list both for both). A metadata condition
``{key = "value"}`` holds when the message's metadata has that key with that value
(compared as text); ``"*"`` matches any value, as long as the key is there.

Pure: no I/O. :mod:`mailworker.config` reads the tables with :func:`parse_routes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Route", "RouteError", "choose", "domain_of", "parse_routes", "split"]

_CONDITIONS = ("sender_domain", "recipient_domain", "queue", "metadata")


class RouteError(ValueError):
    """A ``[[routes]]`` table is malformed; the message names the rule and the key."""


@dataclass(frozen=True)
class Route:
    """One rule: the relay, and the conditions that must all hold (empty: any)."""

    relay: str
    sender_domain: tuple[str, ...] = ()
    recipient_domain: tuple[str, ...] = ()
    queue: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The conditions as written, for ``mailworker route`` and errors."""
        parts = [f"{name} in {', '.join(getattr(self, name))}"
                 for name in ("sender_domain", "recipient_domain", "queue")
                 if getattr(self, name)]
        parts += [f"metadata {k} = {v}" for k, v in self.metadata.items()]
        return " and ".join(parts) or "any message"


def domain_of(address: str) -> str:
    """The domain of an address (after the last '@'), lower case; '' without one."""
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def _text(value: Any) -> str:
    """A metadata value as a rule compares it (TOML's true is "true", as is Python's)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _domain_matches(patterns: tuple[str, ...], domain: str) -> bool:
    for p in patterns:
        if p.startswith("*."):
            if domain.endswith(p[1:]):
                return True
        elif domain == p:
            return True
    return False


def _matches(rule: Route, sender: str, recipient: str | None, queue: str,
             metadata: Mapping[str, Any]) -> bool:
    if rule.sender_domain and not _domain_matches(rule.sender_domain, domain_of(sender)):
        return False
    if rule.recipient_domain and (recipient is None or not _domain_matches(
            rule.recipient_domain, domain_of(recipient))):
        return False
    if rule.queue and queue not in rule.queue:
        return False
    for key, want in rule.metadata.items():
        if key not in metadata or (want != "*" and _text(metadata[key]) != want):
            return False
    return True


def choose(routes: Sequence[Route], *, sender: str, recipient: str | None, queue: str,
           metadata: Mapping[str, Any] | None = None) -> tuple[int, Route] | None:
    """The first rule (its index from 0, and the rule) that routes mail from *sender* to
    *recipient* on *queue*; None: no rule matches (the default relay)."""
    meta = metadata or {}
    for i, rule in enumerate(routes):
        if _matches(rule, sender, recipient, queue, meta):
            return i, rule
    return None


def split(routes: Sequence[Route], default_relay: str, *, sender: str,
          recipients: Sequence[str], queue: str,
          metadata: Mapping[str, Any] | None = None) -> dict[str, list[str]]:
    """Recipients grouped by the relay the rules give each, in order of first
    appearance (one group: the message is not split)."""
    out: dict[str, list[str]] = {}
    for rcpt in recipients:
        found = choose(routes, sender=sender, recipient=rcpt, queue=queue, metadata=metadata)
        out.setdefault(found[1].relay if found else default_relay, []).append(rcpt)
    return out


def _texts(where: str, key: str, value: Any, *, domains: bool) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(x, str) and x.strip() for x in items):
        raise RouteError(f"{where}: {key} must be a non-empty text or list of texts, "
                         f"e.g. {key} = [\"example.com\", \"*.example.com\"]"
                         if domains else f"{where}: {key} must be a queue name or a list "
                         "of them")
    out = tuple(x.strip().lower().rstrip(".") if domains else x.strip() for x in items)
    for d in out if domains else ():
        if "@" in d or " " in d or d.count("*") > (1 if d.startswith("*.") else 0):
            raise RouteError(f"{where}: {key} {d!r} is not a domain; write example.com or "
                             "*.example.com (any subdomain)")
    return out


def parse_routes(specs: Any) -> tuple[Route, ...]:
    """The ``[[routes]]`` array of tables into rules, with errors naming rule and key."""
    if specs is None:
        return ()
    if not isinstance(specs, list):
        raise RouteError("routes must be an array of tables: write each rule as "
                         "[[routes]] with relay = \"name\" and its conditions")
    out = []
    for i, spec in enumerate(specs):
        where = f"[[routes]] rule {i + 1}"
        if not isinstance(spec, Mapping):
            raise RouteError(f"{where} is not a table")
        unknown = set(spec) - {"relay", *_CONDITIONS}
        if unknown:
            raise RouteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                             f"relay, {', '.join(_CONDITIONS)}")
        relay = spec.get("relay")
        if not isinstance(relay, str) or not relay.strip():
            raise RouteError(f"{where}: relay = \"name\" is required (a relay under [relays])")
        meta = spec.get("metadata", {})
        if not isinstance(meta, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str | int | bool) for k, v in meta.items()):
            raise RouteError(f"{where}: metadata must be a table of key = \"value\" "
                             "(\"*\": any value), e.g. metadata = { tenant = \"acme\" }")
        out.append(Route(
            relay=relay.strip(),
            sender_domain=(_texts(where, "sender_domain", spec["sender_domain"], domains=True)
                           if "sender_domain" in spec else ()),
            recipient_domain=(_texts(where, "recipient_domain", spec["recipient_domain"],
                                     domains=True) if "recipient_domain" in spec else ()),
            queue=_texts(where, "queue", spec["queue"], domains=False) if "queue" in spec else (),
            metadata={k: _text(v) for k, v in meta.items()},
        ))
    return tuple(out)
