"""The Redis store: records, leases, the deferred and in-flight sets, dead letters, counters.

Every transition that touches more than one key runs as a Lua script, so a crash between
two writes cannot leave a record half-moved. Batch operations go through one pipeline:
one round trip for many messages.

Keys (``P`` is the configurable prefix)::

    P:m:<id>         hash: doc (JSON Record), raw (MIME bytes)
    P:lease:<id>     lease token, with a TTL; only its holder talks SMTP for <id>
    P:inflight       zset id -> watchdog time: queued or sending; the sweeper looks past it
    P:deferred       zset id -> next attempt time
    P:dead           zset id -> dead-lettered time
    P:idem:<key>     idempotency key -> id
    P:stats:<relay>  hash of counters (delivered, failed, dead, deferred, attempts)
    P:pause:<relay>  relay paused (auth, TLS, host backoff) until the key expires
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from mailworker.record import MessageState, Record

__all__ = ["Claim", "Store", "Unreadable"]

_Call = tuple[Any, list[Any], list[Any]]  # (registered Script, keys, args)


def _script(name: str) -> str:
    return resources.files("mailworker.store").joinpath(f"{name}.lua").read_text()


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


@dataclass
class Unreadable:
    """A record this worker holds the lease on whose stored document cannot be parsed
    (corrupt, or written by a newer version): set aside, never a reason to fail others."""

    id: str
    token: str
    error: str


class Store:
    """Message records in Redis. Thread-safe (redis-py pools connections)."""

    def __init__(
        self, client: redis.Redis, prefix: str = "mw", retention: float = 7 * 86400
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.retention = int(retention)
        self._enqueue = client.register_script(_script("enqueue"))
        self._claim = client.register_script(_script("claim"))
        self._commit = client.register_script(_script("commit"))
        self._promote = client.register_script(_script("promote"))
        self._sweep = client.register_script(_script("sweep"))
        self._release = client.register_script(_script("release"))
        self._fleet = client.register_script(_script("fleet"))
        self._renew = client.register_script(_script("renew"))
        self._purge = client.register_script(_script("purge"))
        self._mark = client.register_script(_script("mark"))
        self._quarantine = client.register_script(_script("quarantine"))

    def _run(self, calls: Sequence[_Call]) -> list[Any]:
        """Run script calls in one round trip (EVALSHA), loading a script only when Redis
        lacks it (after a restart or failover).

        redis-py's pipelined scripts send SCRIPT EXISTS before every execute: a second
        round trip on the enqueue path, which this avoids.
        """
        if not calls:
            return []
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for i in todo:
                script, keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            missing: list[int] = []
            for i, value in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(value, redis.exceptions.NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(value, Exception):
                    raise value
                else:
                    results[i] = value
            if not missing:
                break
            for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
                script.sha = self.redis.script_load(script.script)
            todo = missing
        return results

    # -- keys ---------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def inflight_key(self) -> str:
        return self.key("inflight")

    @property
    def deferred_key(self) -> str:
        return self.key("deferred")

    @property
    def dead_key(self) -> str:
        return self.key("dead")

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
        keys: list[str] = []
        args: list[Any] = []
        now = time.time()
        for record, raw in items:
            due = record.send_at if record.send_at and record.send_at > now else None
            rec_key = self.key("m", record.id)
            idem = self.key("idem", record.idempotency_key) if record.idempotency_key else rec_key
            keys += [rec_key, self.deferred_key if due else self.inflight_key, idem]
            args += [record.id, record.to_json(), raw, due or watchdog,
                     f"{record.queue} {record.relay}"]
        args.append(self.retention)
        return [_str(v) for v in self._run([(self._enqueue, keys, args)])[0]]

    # -- leases -------------------------------------------------------------------------
    def claim_many(
        self, ids: Sequence[str], token: str, lease_seconds: float, watchdog: float
    ) -> dict[str, Claim | Unreadable | str]:
        """Take leases on *ids*; each maps to a :class:`Claim`, an :class:`Unreadable`
        (leased, but its document cannot be parsed) or "missing"/"locked"."""
        calls: list[_Call] = [
            (self._claim, [self.key("m", mid), self.key("lease", mid), self.inflight_key],
             [token, int(lease_seconds * 1000), watchdog, mid])
            for mid in ids
        ]
        out: dict[str, Claim | Unreadable | str] = {}
        for mid, (raw_status, doc, raw, sending) in zip(ids, self._run(calls), strict=True):
            status = _str(raw_status)
            if status != "ok":
                out[mid] = status
                continue
            try:
                interrupted = float(_str(sending).rsplit(" ", 1)[-1]) if sending else None
                record = Record.from_json(doc)
            except Exception as exc:  # one bad record must never fail its batch-mates
                out[mid] = Unreadable(mid, token, f"{type(exc).__name__}: {exc}"[:500])
                continue
            out[mid] = Claim(record, bytes(raw) if raw is not None else b"", token, interrupted)
        return out

    def quarantine_many(self, items: Sequence[tuple[str, str, str]]) -> list[bool]:
        """Dead-letter unreadable or invalid records as they are: (id, token, reason).

        The stored document and raw bytes stay untouched for the operator; the reason
        goes beside them. Only the lease holder can do this.
        """
        now = time.time()
        return [bool(v) for v in self._run([
            (self._quarantine,
             [self.key("m", mid), self.key("lease", mid), self.inflight_key,
              self.deferred_key, self.dead_key, self.key("sweeps")],
             [token, mid, reason, now])
            for mid, token, reason in items])]

    def commit_many(
        self, items: Iterable[tuple[Claim, float, dict[str, int]]]
    ) -> list[bool]:
        """Save each claimed record in its new state; place it by *score*.

        Returns False for a record whose lease was lost (it took longer than the lease):
        its outcome is not written, and the record's new owner decides.
        """
        calls: list[_Call] = []
        for claim, score, counters in items:
            rec = claim.record
            flat: list[Any] = []
            for k, v in counters.items():
                flat += [k, v]
            calls.append((
                self._commit,
                [self.key("m", rec.id), self.key("lease", rec.id), self.inflight_key,
                 self.deferred_key, self.dead_key, self.key("stats", rec.relay),
                 self.key("sweeps")],
                [claim.token, rec.id, rec.to_json(), rec.state.value, score, self.retention,
                 *flat],
            ))
        return [bool(v) for v in self._run(calls)]

    def renew_many(self, claims: Sequence[Claim], lease_seconds: float) -> list[bool]:
        """Extend our leases, one round trip; False for each one lost (do not send it)."""
        ms = int(lease_seconds * 1000)
        done = self._run([(self._renew, [self.key("lease", c.record.id)], [c.token, ms])
                          for c in claims])
        return [int(v) == 1 for v in done]

    def mark_sending(self, claims: Sequence[Claim], lease_seconds: float) -> list[bool]:
        """Renew the leases of a window of transactions about to start and mark the
        records as being sent (see mark.lua); False for each one whose lease is lost."""
        ms, now = int(lease_seconds * 1000), time.time()
        done = self._run([(self._mark, [self.key("m", c.record.id), self.key("lease", c.record.id)],
                           [c.token, ms, now]) for c in claims])
        return [int(v) == 1 for v in done]

    def release_many(self, claims: Sequence[Claim]) -> None:
        """Give up leases without writing (e.g. the records were not due)."""
        self._run([(self._release, [self.key("m", c.record.id), self.key("lease", c.record.id)],
                    [c.token]) for c in claims])

    def forget_inflight(self, ids: Sequence[str]) -> None:
        if ids:
            self.redis.zrem(self.inflight_key, *ids)

    # -- scheduler ------------------------------------------------------------------------
    def promote_due(self, now: float, limit: int, watchdog: float) -> list[str]:
        ids = self._promote(keys=[self.deferred_key, self.inflight_key],
                            args=[now, limit, watchdog])
        return [_str(i) for i in ids]

    def sweep(self, now: float, limit: int, stuck_after: float) -> list[str]:
        """In-flight ids past their watchdog with no live lease (see sweep.lua)."""
        ids = self._sweep(keys=[self.inflight_key, self.key("sweeps")],
                          args=[now, limit, stuck_after, self.key("lease", "")])
        return [_str(i) for i in ids]

    # -- reads ----------------------------------------------------------------------------
    def get(self, mid: str) -> Record | None:
        return self.get_many([mid])[0]

    def get_many(self, ids: Sequence[str]) -> list[Record | None]:
        """Records by id (None when gone). A record that cannot be parsed comes back as
        a stand-in: dead, with the reason, so status and the dead-letter tools show it."""
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.hmget(self.key("m", mid), "doc", "poison", "route")
        return [_load(mid, *fields) for mid, fields in zip(ids, pipe.execute(), strict=True)]

    def routes(self, ids: Sequence[str]) -> list[tuple[str, str] | None]:
        """(queue, relay) per id, None for a record that is gone; one round trip, no JSON."""
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.hget(self.key("m", mid), "route")
        out: list[tuple[str, str] | None] = []
        for v in pipe.execute():
            queue, _, relay = _str(v).partition(" ") if v is not None else ("", "", "")
            out.append((queue, relay) if queue else None)
        return out

    def raw(self, mid: str) -> bytes | None:
        v = self.redis.hget(self.key("m", mid), "raw")
        if v is None:
            return None
        return v if isinstance(v, bytes) else str(v).encode()

    def dead_ids(self, page: int = 5000) -> list[str]:
        """Every dead-letter id, oldest first (read in pages)."""
        out: list[str] = []
        while True:
            chunk = self.redis.zrange(self.dead_key, len(out), len(out) + page - 1)
            out += [_str(i) for i in chunk]
            if len(chunk) < page:
                return out

    def purge(self, ids: Sequence[str]) -> int:
        """Delete dead letters for good; a record retried meanwhile is left alone."""
        done = self._run([(self._purge, [self.dead_key, self.key("m", mid), self.key("sweeps")],
                           [mid]) for mid in ids])
        return sum(int(v) for v in done)

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.inflight_key)
        pipe.zcard(self.deferred_key)
        pipe.zcard(self.dead_key)
        inflight, deferred, dead = pipe.execute()
        return {"in_flight": int(inflight), "deferred": int(deferred), "dead": int(dead)}

    def relay_stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key in self.redis.scan_iter(match=self.key("stats", "*"), count=1000):
            name = _str(key).rsplit(":", 1)[-1]
            out[name] = {_str(k): int(v) for k, v in self.redis.hgetall(key).items()}
        return out

    # -- relay pauses -----------------------------------------------------------------------
    def pause_relay(self, relay: str, seconds: float, reason: str) -> None:
        """Hold all mail for *relay* for *seconds* (fleet-wide: every worker sees it)."""
        self.redis.set(self.key("pause", relay), reason, px=max(1, int(seconds * 1000)))

    def relay_pause(self, relay: str) -> tuple[str, float] | None:
        """(reason, seconds left) when the relay is paused."""
        pipe = self.redis.pipeline(transaction=False)
        key = self.key("pause", relay)
        pipe.get(key)
        pipe.pttl(key)
        reason, ttl = pipe.execute()
        if reason is None or ttl is None or ttl < 0:
            return None
        return _str(reason), ttl / 1000.0

    def resume_relay(self, relay: str) -> None:
        self.redis.delete(self.key("pause", relay))

    def relay_failed(self, relay: str) -> int:
        """Count a host-level failure; returns consecutive failures (resets after 1 h quiet)."""
        key = self.key("relayfail", relay)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 3600)
        return int(pipe.execute()[0])

    def relay_succeeded(self, relay: str) -> None:
        self.redis.delete(self.key("relayfail", relay))

    # -- fleet-wide limits ---------------------------------------------------------------
    def fleet_acquire(self, relay: str, token: str, *, max_connections: int | None,
                      rate: float | None, wanted: int, hold_seconds: float) -> tuple[int, float]:
        """Ask for a connection slot and up to *wanted* messages of rate budget.

        Returns (messages granted, seconds to wait when none were). The slot is held
        until :meth:`fleet_release` or *hold_seconds* (a dead worker's slot expires).
        """
        burst = max(1.0, rate or 0.0)
        granted, wait = self._run([(
            self._fleet, [self.key("slots", relay), self.key("bucket", relay)],
            [token, time.time(), hold_seconds, max_connections or 0, rate or 0, burst, wanted],
        )])[0]
        return int(granted), float(_str(wait))

    def fleet_release(self, relay: str, token: str) -> None:
        self.redis.zrem(self.key("slots", relay), token)

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

    # -- relay state listing (CLI stats) --
    def relay_states(self) -> dict[str, dict[str, Any]]:
        """Every relay Redis knows of, with its counters and any pause.

        ``{relay: {"counters": {...}, "paused": {"reason": str, "seconds_left": float} | None}}``,
        found by SCAN over the ``stats`` and ``pause`` key families, so an operator sees
        relays that only the workers (not the calling shell) have configured. Read in one
        pipeline after the scans; for the CLI, not the delivery path.
        """
        families = {"stats": self.key("stats", ""), "pause": self.key("pause", "")}
        names: dict[str, set[str]] = {family: set() for family in families}
        for family, head in families.items():
            # The prefix is literal text in the MATCH pattern: escape glob characters.
            pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in head) + "*"
            for key in self.redis.scan_iter(match=pattern, count=1000):
                names[family].add(_str(key)[len(head):])
        relays = sorted(names["stats"] | names["pause"])
        pipe = self.redis.pipeline(transaction=False)
        for name in relays:
            pipe.hgetall(families["stats"] + name)
            pipe.get(families["pause"] + name)
            pipe.pttl(families["pause"] + name)
        replies = pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(relays):
            counters, reason, ttl = replies[3 * i:3 * i + 3]
            paused = None
            if reason is not None and ttl is not None and int(ttl) > 0:
                paused = {"reason": _str(reason), "seconds_left": int(ttl) / 1000.0}
            out[name] = {"counters": {_str(k): int(v) for k, v in (counters or {}).items()},
                         "paused": paused}
        return out


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


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
