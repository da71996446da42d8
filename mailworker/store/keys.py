"""The store's whole Redis schema: every key family, its type, the module that owns it
and how long it lives.

This is the one place a key name is built. Everything else asks :class:`Keys` (the Lua
scripts get their keys as ``KEYS``, built here), so a new family has to be added to
:data:`FAMILIES` first, and docs/architecture.md lists the same table (a test compares
them). Keys share a configurable prefix (``key_prefix``, default ``mw``), so several
deployments can share one Redis database.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FAMILIES", "RECORD_FIELDS", "Family", "Keys"]


@dataclass(frozen=True)
class Family:
    """One key family: ``<prefix>:<pattern>`` with its Redis type, owner and lifetime."""

    pattern: str   # after the prefix: "m:<id>", "inflight"
    type: str      # Redis type: hash, string, zset
    owner: str     # the module (or script) that writes it
    ttl: str       # how long it lives
    about: str     # what it holds

    @property
    def name(self) -> str:
        """The family's first segment ("m", "lease", "scheduler")."""
        return self.pattern.split(":", 1)[0]


#: Fields of the record hash ``m:<id>``.
RECORD_FIELDS = {
    "doc": "the Record as JSON (mailworker.record)",
    "raw": "the MIME bytes, as sent (emptied once delivered)",
    "zraw": "instead of raw: the MIME bytes compressed with zlib (large bodies; "
            "mailworker.store.body)",
    "route": '"<queue> <relay>", read without parsing the document',
    "sending": '"<token> <time>" while a lease holder sends it (mark.lua)',
    "poison": "why the record was quarantined (unreadable or invalid)",
}

_LIVE = "none while live; `retention` once delivered, `dead_retention` once dead"
FAMILIES: tuple[Family, ...] = (
    Family("m:<id>", "hash", "store (enqueue, commit, quarantine scripts)", _LIVE,
           "the message record: " + ", ".join(RECORD_FIELDS)),
    Family("lease:<id>", "string", "store (claim, renew, mark, release scripts); leases",
           "`lease_seconds`, renewed by the heartbeat",
           "the lease holder's token: only it talks SMTP for <id>"),
    Family("inflight", "zset", "store (enqueue, claim, commit, promote, sweep scripts)",
           "none", "id -> watchdog time: queued or being sent; the sweeper looks past it"),
    Family("deferred", "zset", "store (enqueue, commit, promote scripts)", "none",
           "id -> next attempt time; the scheduler promotes what is due"),
    Family("dead", "zset", "store (commit, quarantine, purge scripts)",
           "none; entries older than `dead_retention` are pruned",
           "id -> dead-lettered time: the dead letters"),
    Family("sweeps", "hash", "store (sweep script; cleared by commit, quarantine, purge)",
           "none; a field lives until its record commits",
           "id -> times swept (backs off the sweeper)"),
    Family("idem:<key>", "string", "store (enqueue script)", "lifetime + `retention`",
           "an app's idempotency key -> the first message's id"),
    Family("stats:<relay>", "hash", "store (commit script)", "none",
           "counters per relay: delivered, failed, dead, deferred, attempts, ..."),
    Family("pause:<relay>", "string", "store.relays (delivery decides)", "the pause's length",
           "why the relay is paused (auth, TLS, a failed cohort of connections); every worker "
           "holds its mail"),
    Family("relayfail:<relay>", "string", "store.relays (delivery decides)",
           "1 hour after the last failure", "consecutive host-level failures of the relay"),
    Family("slots:<relay>", "zset", "store.relays (window, feedback scripts)",
           "1 hour after the last use; each slot expires on its own",
           "connection slot token -> expiry: the connections open to the relay, fleet-wide"),
    Family("window:<relay>", "hash", "store.relays (window, feedback, ratelimit scripts)",
           "1 hour after the last feedback",
           "size, streak, rate, ...: the adaptive concurrency window and learned rate"),
    Family("bucket:<relay>", "hash", "store.relays (ratelimit script)",
           "1 hour after the last use",
           "tokens, ts: the fleet-wide rate limit's token bucket"),
    Family("scheduler:lock", "string", "store (lock script); scheduler",
           "5 x `tick_interval`, renewed by its holder", "which scheduler may tick"),
)


class Keys:
    """Key names for one prefix. Cheap to build; holds no connection."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "mw") -> None:
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        """``<prefix>:<part>:<part>...``; prefer the named builders below."""
        return ":".join((self.prefix, *parts))

    # -- per message --
    def record(self, mid: str) -> str:
        return self.key("m", mid)

    def lease(self, mid: str) -> str:
        return self.key("lease", mid)

    def idem(self, idempotency_key: str) -> str:
        return self.key("idem", idempotency_key)

    # -- sets --
    @property
    def inflight(self) -> str:
        return self.key("inflight")

    @property
    def deferred(self) -> str:
        return self.key("deferred")

    @property
    def dead(self) -> str:
        return self.key("dead")

    @property
    def sweeps(self) -> str:
        return self.key("sweeps")

    @property
    def scheduler_lock(self) -> str:
        return self.key("scheduler", "lock")

    # -- per relay --
    def stats(self, relay: str) -> str:
        return self.key("stats", relay)

    def pause(self, relay: str) -> str:
        return self.key("pause", relay)

    def relay_failures(self, relay: str) -> str:
        return self.key("relayfail", relay)

    def slots(self, relay: str) -> str:
        return self.key("slots", relay)

    def window(self, relay: str) -> str:
        return self.key("window", relay)

    def bucket(self, relay: str) -> str:
        return self.key("bucket", relay)

    def head(self, family: str) -> str:
        """The text before the variable part of a family's keys (``mw:stats:``)."""
        return self.key(family, "")

    def scan_pattern(self, family: str) -> str:
        """A SCAN ``MATCH`` pattern for every key of *family*; the prefix is literal text,
        so glob characters in it are escaped."""
        return "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.head(family)) + "*"

    def everything(self) -> str:
        """A SCAN ``MATCH`` pattern for every key of this prefix (the demo cleans up)."""
        return "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.prefix) + ":*"
