"""Which member of a relay group carries each message of a batch.

A record names a group (``rec.relay`` stays the group's name); each delivery pass asks
this module for a member per message, from the members' health as the whole fleet sees
it: a member is skipped while it is paused (``pause:<relay>``) or dead (a whole cohort
of its connection attempts failed, and its next probe is not due). The health is one
Redis round trip for every member, cached for :data:`HEALTH_TTL` seconds per process
and dropped as soon as this process pauses a relay, so a batch costs at most one read.

* ``failover``: the first healthy member in order; with none healthy, the first member
  (whose pause then holds the mail, as for a plain relay).
* ``roundrobin``: smooth weighted round robin (nginx's) over the healthy members, per
  process: exact in one process, proportional over many; with none healthy, over all.

A member that is itself a group (one level at most, checked at load) is resolved the
same way. Pauses, windows and feedback stay per member: delivery treats the member
as the relay of the attempt.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from mailworker.config import Settings
from mailworker.record import Attempt
from mailworker.relay_groups import RelayGroup
from mailworker.store import Store

__all__ = ["HEALTH_TTL", "Groups", "failed_member", "forget"]

log = structlog.get_logger("mailworker.groups")

#: Seconds a process trusts its last read of the members' health.
HEALTH_TTL = 1.0


@dataclass
class _Shared:
    """Per store and process: the cached health and the round-robin counters."""

    read_at: float = float("-inf")
    health: dict[str, str | None] = field(default_factory=dict)
    current: dict[str, dict[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_shared: weakref.WeakKeyDictionary[Store, _Shared] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _state(store: Store) -> _Shared:
    with _shared_lock:
        state = _shared.get(store)
        if state is None:
            state = _shared[store] = _Shared()
        return state


#: Stages at which a failure is the relay's, not the message's: connect, greeting, EHLO,
#: TLS, AUTH (a 421 at any stage too).
_RELAY_STAGES = frozenset({"connect", "greeting", "ehlo", "tls", "auth"})


def failed_member(history: Sequence[Attempt]) -> str | None:
    """The relay the last attempt failed on at the relay level (it was down, closing or
    refusing the session), or None: the next pick avoids it when another member is up."""
    if not history:
        return None
    last = history[-1]
    error = last.error or {}
    if error.get("stage") in _RELAY_STAGES or error.get("code") == 421:
        return last.relay
    return None


def forget(store: Store) -> None:
    """Drop the cached health (this process just paused a relay of *store*)."""
    state = _state(store)
    with state.lock:
        state.read_at = float("-inf")


class Groups:
    """Resolves group names to members for one delivery pass's settings and store."""

    def __init__(self, settings: Settings, store: Store,
                 clock: Callable[[], float] = time.time) -> None:
        self.groups = settings.groups
        self.store, self.clock = store, clock

    def is_group(self, name: str) -> bool:
        return name in self.groups

    def _members(self) -> list[str]:
        return sorted({m for g in self.groups.values() for m in g.members
                       if m not in self.groups})

    def health(self) -> dict[str, str | None]:
        """Each plain member's reason to be skipped (None: healthy), cached briefly."""
        state = _state(self.store)
        now = self.clock()
        with state.lock:
            if 0 <= now - state.read_at < HEALTH_TTL:
                return state.health
        try:
            health = self.store.relays.health(self._members())
        except Exception as exc:  # Redis blip: every member is taken as healthy
            log.warning("relay_group.health_unread", error=f"{type(exc).__name__}: {exc}")
            health = {}
        with state.lock:
            state.read_at, state.health = now, health
        return health

    def pick(self, name: str, health: dict[str, str | None], avoid: str | None = None) -> str:
        """The member (a relay name) that carries the next message sent to *name*.

        *avoid*: the member this message's last attempt failed on at the relay level (see
        :func:`failed_member`); another healthy member is preferred. Without it, a member
        whose probe is due counts as healthy, so the messages held until that probe time
        would all go back to it as the probe, fail with it, be held to the next probe,
        and so on: they would never reach the healthy member while it stayed down."""
        group = self.groups.get(name)
        if group is None:
            return name
        healthy = [m for m in group.members if self._healthy(m, health)]
        if avoid is not None:
            healthy = [m for m in healthy if m != avoid] or healthy
        if group.kind == "failover":
            return self.pick((healthy or list(group.members))[0], health)
        return self.pick(self._next(group, healthy or list(group.members)), health)

    def _healthy(self, name: str, health: dict[str, str | None]) -> bool:
        group = self.groups.get(name)
        if group is None:
            return health.get(name) is None
        return any(health.get(m) is None for m in group.members)

    def _next(self, group: RelayGroup, members: Iterable[str]) -> str:
        """Smooth weighted round robin: each member gains its weight, the highest is
        chosen and loses the total."""
        weights = dict(zip(group.members, group.weights, strict=True))
        chosen = [m for m in group.members if m in set(members)]
        state = _state(self.store)
        with state.lock:
            current = state.current.setdefault(group.name, {})
            total = 0
            for m in chosen:
                current[m] = current.get(m, 0) + weights[m]
                total += weights[m]
            best = max(chosen, key=lambda m: current[m])
            current[best] -= total
        return best
