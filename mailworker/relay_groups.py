"""Relay groups as configured: a name that stands for several relays.

A group is ``failover`` (the first healthy member, in order) or ``roundrobin`` (spread
by weight over the healthy members), like Symfony Mailer's ``failover()`` and
``roundrobin()`` transports. A message names the group; which member carries each
attempt is decided at delivery (mailworker.groups), so a message moves to another member
when one is down and keeps its per-recipient state. This module is the value and its
checks only (no I/O): unknown members, a group listing itself (a cycle) or nesting
deeper than one level fail at load, naming the group, instead of at the first delivery.

In the config file::

    [relays.main]
    group = "failover"
    members = ["primary", "backup"]

    [relays.spread]
    group = "roundrobin"
    weights = { a = 3, b = 1 }     # members in this order; members = [...] gives weight 1

In the environment: ``MAILWORKER_RELAY_MAIN="failover(primary, backup)"`` and
``MAILWORKER_RELAY_SPREAD="roundrobin(a:3, b:1)"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["KINDS", "GroupError", "RelayGroup", "check_groups", "group_from_env",
           "group_from_spec", "is_group_spec"]

KINDS = ("failover", "roundrobin")
_ENV = re.compile(r"^\s*(failover|roundrobin)\s*\((.*)\)\s*$", re.IGNORECASE)
_MAX_WEIGHT = 1000


class GroupError(ValueError):
    """A group's definition is wrong; the message names the group and the fix."""


@dataclass(frozen=True)
class RelayGroup:
    """A group of relays: *kind* failover or roundrobin, *members* in order, one weight
    each (1 for failover)."""

    name: str
    kind: str
    members: tuple[str, ...]
    weights: tuple[int, ...]

    def describe(self) -> str:
        """``failover(primary, backup)`` / ``roundrobin(a:3, b:1)``, for the CLI."""
        if self.kind == "failover":
            return f"failover({', '.join(self.members)})"
        return "roundrobin(" + ", ".join(f"{m}:{w}" for m, w in
                                         zip(self.members, self.weights, strict=True)) + ")"


def is_group_spec(spec: object) -> bool:
    """Whether a ``[relays.<name>]`` entry defines a group (it has ``group =``)."""
    return isinstance(spec, Mapping) and "group" in spec


def _weight(name: str, member: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_WEIGHT:
        raise GroupError(f"relay group {name!r}: weight of {member!r} is {value!r}; use a whole "
                         f"number from 1 to {_MAX_WEIGHT}")
    return value


def _build(name: str, kind: str, members: Sequence[object],
           weights: Mapping[str, object] | None) -> RelayGroup:
    if kind not in KINDS:
        raise GroupError(f"relay group {name!r}: group = {kind!r} is not one of "
                         f"{', '.join(KINDS)}")
    if not members or not all(isinstance(m, str) and m for m in members):
        raise GroupError(f"relay group {name!r}: members must be a non-empty list of relay "
                         'names, e.g. members = ["primary", "backup"]')
    names = tuple(str(m) for m in members)
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise GroupError(f"relay group {name!r}: {', '.join(twice)} listed twice")
    if weights and kind == "failover":
        raise GroupError(f"relay group {name!r}: weights are for roundrobin groups; a failover "
                         "group tries its members in the order listed")
    extra = sorted(set(weights or {}) - set(names))
    if extra:
        raise GroupError(f"relay group {name!r}: weights name {', '.join(extra)}, not among "
                         "its members")
    return RelayGroup(name, kind, names,
                      tuple(_weight(name, m, (weights or {}).get(m, 1)) for m in names))


def group_from_spec(name: str, spec: Mapping[str, Any]) -> RelayGroup:
    """A group from a ``{group = ..., members = [...], weights = {...}}`` table."""
    unknown = set(spec) - {"group", "members", "weights"}
    if unknown:
        raise GroupError(f"relay group {name!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                         "a group has group, members and (roundrobin) weights")
    weights = spec.get("weights")
    if weights is not None and not isinstance(weights, Mapping):
        raise GroupError(f"relay group {name!r}: weights must be a table, e.g. "
                         "weights = { a = 3, b = 1 }")
    members = spec.get("members", list(weights or {}))
    if not isinstance(members, list):
        raise GroupError(f"relay group {name!r}: members must be a list of relay names")
    return _build(name, str(spec["group"]), members, weights)


def group_from_env(name: str, text: str) -> RelayGroup | None:
    """``failover(a, b)`` or ``roundrobin(a:3, b:1)`` as a group; None for anything else
    (a DSN)."""
    match = _ENV.match(text)
    if match is None:
        return None
    kind = match.group(1).lower()
    members: list[str] = []
    weights: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in match.group(2).split(","))):
        member, colon, weight = (s.strip() for s in item.partition(":"))
        members.append(member)
        if colon:
            weights[member] = int(weight) if weight.isdigit() else weight
    return _build(name, kind, members, weights or None)


def check_groups(groups: Mapping[str, RelayGroup], relays: Sequence[str] | set[str]) -> None:
    """Every member is a relay or a group of relays: unknown names, cycles and nesting
    deeper than one level raise :class:`GroupError` naming the group."""
    known = set(relays)
    clash = sorted(known & set(groups))
    if clash:
        raise GroupError(f"{', '.join(clash)}: defined both as a relay and as a relay group; "
                         "rename one")
    for group in groups.values():
        for m in group.members:
            if known and m not in known and m not in groups:  # none: left to the workers
                raise GroupError(
                    f"relay group {group.name!r}: unknown member {m!r} (known relays: "
                    f"{', '.join(sorted(known)) or 'none'}); define it under [relays]")
    for name in sorted(groups):
        path = _cycle(name, groups, [])
        if path:
            raise GroupError(f"relay groups form a cycle: {' -> '.join(path)}; a group may "
                             "not contain itself")
    for group in groups.values():
        for m in group.members:
            inner = groups.get(m)
            deeper = [x for x in (inner.members if inner else ()) if x in groups]
            if deeper:
                raise GroupError(
                    f"relay group {group.name!r}: member group {m!r} contains group "
                    f"{deeper[0]!r}; groups nest one level at most (list relays in {m!r})")


def _cycle(name: str, groups: Mapping[str, RelayGroup], path: list[str]) -> list[str]:
    if name in path:
        return [*path[path.index(name):], name]
    group = groups.get(name)
    if group is None:
        return []
    for m in group.members:
        found = _cycle(m, groups, [*path, name])
        if found:
            return found
    return []
