"""The Redis store: records, leases, the deferred and in-flight sets, dead letters, counters.

Every transition that touches more than one key runs as a Lua script, so a crash between
two writes cannot leave a record half-moved. Batch operations go through one pipeline:
one round trip for many messages. Key names come from :mod:`mailworker.store.keys`
(the whole schema, with types and lifetimes); relay state (pauses, failure counts, fleet
limits) is :class:`mailworker.store.relays.RelayState`, reached as ``store.relays``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from mailworker.record import MessageState, Record
from mailworker.store.body import body_of, compact_json, pack
from mailworker.store.keys import Keys
from mailworker.store.relays import RelayState
from mailworker.store.scripts import Call, Rider, Scripts
from mailworker.store.scripts import to_str as _str

__all__ = ["DEAD_RETENTION", "Claim", "Store", "Unreadable"]

#: Records saved per commit.lua run (a delivery chunk is 16; a dlq retry may be many).
_COMMIT_PART = 100

#: Default lifetime of a dead letter (seconds): 30 days (setting ``dead_retention``).
DEAD_RETENTION = 30 * 86400


@dataclass
class Claim:
    """A record this worker holds the lease on.

    ``interrupted_at`` is set when an earlier holder started sending and never saved an
    outcome (killed mid-send): whatever it sent is unknown, so this attempt may duplicate.
    """

    record: Record
    raw: bytes
    token: str
    interrupted_at: float | None = None
    #: It was in the in-flight set when claimed, so in neither ``deferred`` nor ``dead``
    #: (only the lease holder moves it there): its commit does not look there.
    in_flight: bool = False


@dataclass
class Unreadable:
    """A record this worker holds the lease on whose stored document cannot be parsed
    (corrupt, or written by a newer version): set aside, never a reason to fail others."""

    id: str
    token: str
    error: str


class Store:
    """Message records in Redis. Thread-safe (redis-py pools connections).

    *retention* is how long a delivered record is kept (seconds), *dead_retention* how
    long a dead letter is (0 keeps them until purged).
    """

    def __init__(
        self, client: redis.Redis, prefix: str = "mw", retention: float = 7 * 86400,
        dead_retention: float = DEAD_RETENTION,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.retention = int(retention)
        self.dead_retention = int(dead_retention)
        self.keys = Keys(prefix)
        self.scripts = Scripts(client)
        self.relays = RelayState(client, self.keys, self.scripts)

    def _run(self, calls: Sequence[Call]) -> list[Any]:
        return self.scripts.run(calls)

    # -- keys (compatibility: prefer self.keys) ------------------------------------------
    def key(self, *parts: str) -> str:
        return self.keys.key(*parts)

    @property
    def inflight_key(self) -> str:
        return self.keys.inflight

    @property
    def deferred_key(self) -> str:
        return self.keys.deferred

    @property
    def dead_key(self) -> str:
        return self.keys.dead

    # -- enqueue ------------------------------------------------------------------------
    def enqueue_many(
        self, items: Sequence[tuple[Record, bytes]], watchdog: float
    ) -> list[str]:
        """Write new records in one round trip, all or none; return each one's id.

        A record whose idempotency key was seen before is not written; the id of the
        first message with that key is returned in its place. The batch is one script
        call, so a Redis that refuses writes (``maxmemory``, a replica, a restart)
        refuses the whole batch and nothing half-written survives.
        """
        if not items:
            return []
        k = self.keys
        keys: list[str] = []
        args: list[Any] = []
        now = time.time()
        packed: dict[int, tuple[str, bytes]] = {}  # the parts of a split message share bytes
        for record, raw in items:
            due = record.send_at if record.send_at and record.send_at > now else None
            rec_key = k.record(record.id)
            idem = k.idem(record.idempotency_key) if record.idempotency_key else rec_key
            keys += [rec_key, k.deferred if due else k.inflight, idem]
            idem_ttl = max(0.0, record.expires_at - now) + self.retention
            field, body = packed.get(id(raw)) or packed.setdefault(id(raw), pack(raw))
            args += [record.id, compact_json(record), field, body, due or watchdog,
                     f"{record.queue} {record.relay}", int(min(idem_ttl, 2**31))]
        return [_str(v) for v in self.scripts.call("enqueue", keys, args)]

    # -- leases -------------------------------------------------------------------------
    def claim_many(
        self, ids: Sequence[str], token: str, lease_seconds: float, watchdog: float
    ) -> dict[str, Claim | Unreadable | str]:
        """Take leases on *ids*; each maps to a :class:`Claim`, an :class:`Unreadable`
        (leased, but its document cannot be parsed) or "missing"/"locked"."""
        k = self.keys
        out: dict[str, Claim | Unreadable | str] = {}
        if not ids:
            return out
        # One script call per 500 ids (a batch is 50), all in one round trip: a script
        # run per record cost Redis more than the claims themselves.
        # Each record is one argument, its id: the script builds its keys from the heads.
        script, now, ms = self.scripts["claim"], time.time(), int(lease_seconds * 1000)
        heads = [k.head("m"), k.head("lease")]
        calls: list[Call] = [
            (script, [k.inflight, k.dead], [token, ms, watchdog, now, *heads, *part])
            for part in (ids[i:i + 500] for i in range(0, len(ids), 500))]
        flat = [v for result in self._run(calls) for v in result]
        rows = [flat[i:i + 6] for i in range(0, len(flat), 6)]
        for mid, (raw_status, doc, raw, zraw, sending, placed) in zip(ids, rows, strict=True):
            status = _str(raw_status)
            if status != "ok":
                out[mid] = status
                continue
            try:
                interrupted = float(_str(sending).rsplit(" ", 1)[-1]) if sending else None
                record = Record.from_json(doc)
                if record.id != mid:  # every key the holder builds comes from record.id
                    raise ValueError(f"the document's id {record.id!r} is not its key's")
                body = body_of(raw, zraw)
            except Exception as exc:  # one bad record must never fail its batch-mates
                out[mid] = Unreadable(mid, token, f"{type(exc).__name__}: {exc}"[:500])
                continue
            if not body:  # none, or the empty raw a delivered record keeps (commit.lua)
                if record.state is not MessageState.DELIVERED:  # never send an empty message
                    out[mid] = Unreadable(mid, token, "the record has no message bytes (raw)")
                    continue
                body = b""  # delivered: its body was dropped (commit.lua); nothing to send
            out[mid] = Claim(record, body, token, interrupted, placed == 1)
        return out

    def quarantine_many(self, items: Sequence[tuple[str, str, str]]) -> list[bool]:
        """Dead-letter unreadable or invalid records as they are: (id, token, reason).

        The stored document and raw bytes stay untouched for the operator; the reason
        goes beside them. Only the lease holder can do this. They expire like any dead
        letter, after ``dead_retention``.
        """
        now, k, script = time.time(), self.keys, self.scripts["quarantine"]
        return [bool(v) for v in self._run([
            (script, [k.record(mid), k.lease(mid), k.inflight, k.deferred, k.dead, k.sweeps],
             [token, mid, reason, now, self.dead_retention])
            for mid, token, reason in items])]

    def quarantined(self, ids: Sequence[str]) -> list[bool]:
        """Which of *ids* are set aside (quarantined), one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.hexists(self.keys.record(mid), "poison")
        return [bool(v) for v in pipe.execute()]

    def readmit_many(self, ids: Sequence[str], watchdog: float) -> list[bool]:
        """Put quarantined records back in flight (see readmit.lua); False for the others."""
        k, script = self.keys, self.scripts["readmit"]
        return [bool(v) for v in self._run([
            (script, [k.record(mid), k.inflight, k.dead], [mid, watchdog]) for mid in ids])]

    def commit_many(
        self, items: Iterable[tuple[Claim, float, dict[str, int]]],
        riders: Sequence[Rider] = (),
    ) -> list[bool]:
        """Save each claimed record in its new state; place it by *score*.

        Returns False for a record whose lease was lost (it took longer than the lease):
        its outcome is not written, and the record's new owner decides. A delivered
        record expires after ``retention``, a dead one after ``dead_retention``; any
        other state (a dead letter retried) lives until it finishes. A delivered record
        keeps its document (status, history) but not its body: nothing sends or retries
        it again, and the body was most of its memory (a dead letter keeps it, for
        ``dlq retry`` and ``dlq show --raw``).

        *riders* (fleet feedback, the next window's "sending" marks) go in the same round
        trip, after the commits.
        """
        k, script, todo = self.keys, self.scripts["commit"], list(items)
        calls: list[Call] = []
        for part in (todo[i:i + _COMMIT_PART] for i in range(0, len(todo), _COMMIT_PART)):
            keys: list[Any] = [k.inflight, k.deferred, k.dead, k.sweeps]
            args: list[Any] = [self.retention, self.dead_retention, k.head("m"),
                               k.head("lease")]
            stats: dict[str, int] = {}  # relay -> its stats hash's index in KEYS (from 1)
            for claim, score, counters in part:
                rec = claim.record
                if rec.relay not in stats:
                    keys.append(k.stats(rec.relay))
                    stats[rec.relay] = len(keys)
                # Eight arguments a record (each costs the client about 1 us to send).
                args += [claim.token, rec.id, compact_json(rec), rec.state.value, score,
                         stats[rec.relay], "".join(f"{name}\n{v}\n" for name, v in
                                                   counters.items() if "\n" not in name),
                         1 if claim.in_flight else 0]
            calls.append((script, keys, args))
        # One script run per chunk (not one per record): the commit is most of Redis's
        # work per message, and a script run has a cost of its own.
        return [bool(v) for result in self.scripts.run_with(calls, riders) for v in result]

    def renew_many(self, claims: Sequence[Claim], lease_seconds: float) -> list[bool]:
        """Extend our leases, one script call per token; False for each one lost."""
        return self._per_token(claims, lease_seconds, "")

    def mark_sending(self, claims: Sequence[Claim], lease_seconds: float) -> list[bool]:
        """Renew the leases of a window of transactions about to start and mark the
        records as being sent (see mark.lua); False for each one whose lease is lost.
        One script call for the window, not one per record."""
        return self._per_token(claims, lease_seconds, time.time())

    def _per_token(self, claims: Sequence[Claim], lease_seconds: float,
                   now: float | str) -> list[bool]:
        """mark.lua once per lease token (one round trip in all): renew, and mark as being
        sent unless *now* is ""."""
        calls, decode = self.mark_calls(claims, lease_seconds, now)
        return decode(self._run(calls))

    def mark_calls(self, claims: Sequence[Claim], lease_seconds: float, now: float | str
                   ) -> tuple[list[Call], Callable[[list[Any]], list[bool]]]:
        """The mark.lua calls (one per lease token) for *claims*, and how to read their
        results as one bool per claim (so they can ride in another round trip)."""
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(claims):
            groups.setdefault(c.token, []).append(i)
        k, script, ms = self.keys, self.scripts["mark"], int(lease_seconds * 1000)
        heads = [k.head("m"), k.head("lease")]
        calls: list[Call] = [
            (script, [], [token, ms, now, *heads, *(claims[i].record.id for i in idx)])
            for token, idx in groups.items()]

        def decode(results: list[Any]) -> list[bool]:
            out = [False] * len(claims)
            for idx, done in zip(groups.values(), results, strict=True):
                for i, v in zip(idx, done, strict=True):
                    out[i] = int(v) == 1
            return out

        return calls, decode

    def release_many(self, claims: Sequence[Claim]) -> None:
        """Give up leases without writing (e.g. the records were not due)."""
        k, script = self.keys, self.scripts["release"]
        self._run([(script, [k.record(c.record.id), k.lease(c.record.id)], [c.token])
                   for c in claims])

    def forget_inflight(self, ids: Sequence[str]) -> None:
        if ids:
            self.redis.zrem(self.keys.inflight, *ids)

    # -- scheduler ------------------------------------------------------------------------
    def promote_due(self, now: float, limit: int, watchdog: float) -> list[str]:
        ids = self.scripts.call("promote", [self.keys.deferred, self.keys.inflight],
                                [now, limit, watchdog])
        return [_str(i) for i in ids]

    def sweep(self, now: float, limit: int, stuck_after: float) -> list[str]:
        """In-flight ids past their watchdog with no live lease (see sweep.lua)."""
        ids = self.scripts.call("sweep", [self.keys.inflight, self.keys.sweeps],
                                [now, limit, stuck_after, self.keys.lease("")])
        return [_str(i) for i in ids]

    def hold_scheduler_lock(self, holder: str, seconds: float) -> bool:
        """Take or extend the scheduler lock for *holder* (see lock.lua): True while it is
        *holder*'s. It lapses *seconds* after the last renewal, so a dead scheduler's
        lock passes to another one."""
        ms = max(1000, int(seconds * 1000))
        return bool(self.scripts.call("lock", [self.keys.scheduler_lock], [holder, ms]))

    # -- reads ----------------------------------------------------------------------------
    def get(self, mid: str) -> Record | None:
        return self.get_many([mid])[0]

    def get_many(self, ids: Sequence[str]) -> list[Record | None]:
        """Records by id (None when gone). A record that cannot be parsed comes back as
        a stand-in: dead, with the reason, so status and the dead-letter tools show it."""
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.hmget(self.keys.record(mid), "doc", "poison", "route")
        out: list[Record | None] = []
        for mid, got in zip(ids, pipe.execute(raise_on_error=False), strict=True):
            fields = (  # WRONGTYPE: the key holds something that is not a record hash
                [None, f"unreadable record: the key is not a record ({got})", None]
                if isinstance(got, redis.ResponseError) else got)
            out.append(_load(mid, *fields))
        return out

    def routes(self, ids: Sequence[str]) -> list[tuple[str, str] | None]:
        """(queue, relay) per id, None for a record that is gone; one round trip, no JSON.

        A record that exists with no readable route (hand-edited, another version) gets
        ``("", "")``: the scheduler still wakes it, on the default queue, so that a worker
        can deliver it or set it aside; it is never dropped from every set.
        """
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.hget(self.keys.record(mid), "route")
            pipe.exists(self.keys.record(mid))
        values = pipe.execute(raise_on_error=False)  # WRONGTYPE for one key: that key only
        out: list[tuple[str, str] | None] = []
        for route, exists in zip(values[::2], values[1::2], strict=True):
            if not exists:
                out.append(None)
                continue
            v = None if isinstance(route, Exception) else route
            text = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v or "")
            queue, _, relay = text.partition(" ")
            out.append((queue, relay) if queue.isprintable() and queue else ("", ""))
        return out

    def raw(self, mid: str) -> bytes | None:
        """The message's MIME bytes as accepted (uncompressed); None when none are stored
        (gone, or delivered: a delivered record keeps its document, not its body), or
        when the body cannot be read (damaged, or stored twice: see ``body_of``): such a
        record is set aside as unreadable (its reason says why), and
        ``mailworker dlq show`` must still show it."""
        raw, zraw = self.redis.hmget(self.keys.record(mid), "raw", "zraw")
        try:
            body = body_of(raw, zraw)
        except (zlib.error, ValueError):
            return None
        return body or None  # a delivered record keeps an empty raw (commit.lua)

    def document(self, mid: str) -> str | None:
        """The record's stored JSON document as text (undecodable bytes replaced), for an
        operator inspecting a record that could not be read (``mailworker dlq show``)."""
        try:
            v = self.redis.hget(self.keys.record(mid), "doc")
        except redis.ResponseError:  # WRONGTYPE: the key is not a record hash
            return None
        if v is None:
            return None
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)

    def record_ids(self) -> list[str]:
        """Every record's id, by SCAN (for tests and tools, not the delivery path)."""
        head = self.keys.head("m")
        return sorted(_str(k)[len(head):] for k in
                      self.redis.scan_iter(match=self.keys.scan_pattern("m"), count=1000))

    def dead_ids(self, page: int = 5000) -> list[str]:
        """Every dead-letter id, oldest first (read in pages)."""
        out: list[str] = []
        while True:
            chunk = self.redis.zrange(self.keys.dead, len(out), len(out) + page - 1)
            out += [_str(i) for i in chunk]
            if len(chunk) < page:
                return out

    def purge(self, ids: Sequence[str]) -> int:
        """Delete dead letters for good; a record retried meanwhile is left alone."""
        k, script = self.keys, self.scripts["purge"]
        done = self._run([(script, [k.dead, k.record(mid), k.sweeps], [mid]) for mid in ids])
        return sum(int(v) for v in done)

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.keys.inflight)
        pipe.zcard(self.keys.deferred)
        pipe.zcard(self.keys.dead)
        inflight, deferred, dead = pipe.execute()
        return {"in_flight": int(inflight), "deferred": int(deferred), "dead": int(dead)}

    # -- relay state: delegates to self.relays (RelayState) --------------------------------
    def relay_stats(self) -> dict[str, dict[str, int]]:
        return self.relays.counters()

    def relay_states(self) -> dict[str, dict[str, Any]]:
        """Every relay Redis knows of, with counters and any pause (``mailworker stats``)."""
        return self.relays.states()

    def pause_relay(self, relay: str, seconds: float, reason: str) -> None:
        """Hold all mail for *relay* for *seconds* (fleet-wide: every worker sees it)."""
        self.relays.pause(relay, seconds, reason)

    def relay_pause(self, relay: str) -> tuple[str, float] | None:
        """(reason, seconds left) when the relay is paused."""
        return self.relays.paused(relay)

    def resume_relay(self, relay: str) -> None:
        self.relays.resume(relay)

    def relay_failed(self, relay: str) -> int:
        """Count a host-level failure; returns consecutive failures (resets after 1 h quiet)."""
        return self.relays.failed(relay)

    def relay_failures(self, relay: str) -> int:
        """The relay's consecutive failures so far, for the retry policy's relay pause."""
        return self.relays.failures(relay)

    def relay_succeeded(self, relay: str) -> None:
        self.relays.succeeded(relay)

    # -- health ---------------------------------------------------------------------------
    def persistence_warning(self) -> str | None:
        """A warning when Redis would lose accepted mail on restart (AOF off)."""
        try:
            conf = self.redis.config_get("appendonly")
        except redis.ResponseError:
            return None  # CONFIG is disabled (managed Redis); cannot tell.
        if _str(conf.get("appendonly", "no")) != "yes":
            return (
                "Redis persistence is off (appendonly no): a Redis restart loses queued mail. "
                "Run Redis with --appendonly yes (see README, 'Redis persistence')."
            )
        return None


def _load(mid: str, doc: Any, poison: Any, route: Any) -> Record | None:
    if doc is None and poison is None:
        return None
    try:
        if doc is not None and poison is None:
            return Record.from_json(doc)
        error = _str(poison) if poison is not None else "no document"
    except Exception as exc:
        error = f"unreadable record: {type(exc).__name__}: {exc}"[:500]
    queue, _, relay = _str(route).partition(" ") if route is not None else ("", "", "")
    return Record(id=mid, queue=queue or "?", relay=relay or "?", sender="", recipients=[],
                  created_at=0.0, expires_at=0.0, size=0, state=MessageState.DEAD,
                  dead_reason=error, last_error=error)

