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

from mailworker.store.record import Record

__all__ = ["Claim", "Store"]

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
        """Write new records in one round trip; return each one's id.

        A record whose idempotency key was seen before is not written; the id of the
        first message with that key is returned in its place.
        """
        calls: list[_Call] = []
        for record, raw in items:
            due = record.send_at if record.send_at and record.send_at > time.time() else None
            zset = self.deferred_key if due else self.inflight_key
            idem = self.key("idem", record.idempotency_key) if record.idempotency_key else ""
            calls.append((self._enqueue, [self.key("m", record.id), zset, idem],
                          [record.id, record.to_json(), raw, due or watchdog, self.retention,
                           f"{record.queue} {record.relay}"]))
        return [_str(v) for v in self._run(calls)]

    # -- leases -------------------------------------------------------------------------
    def claim_many(
        self, ids: Sequence[str], token: str, lease_seconds: float, watchdog: float
    ) -> dict[str, Claim | str]:
        """Take leases on *ids*; each maps to a :class:`Claim` or "missing"/"locked"."""
        now = time.time()
        calls: list[_Call] = [
            (self._claim, [self.key("m", mid), self.key("lease", mid), self.inflight_key],
             [token, int(lease_seconds * 1000), watchdog, mid, now])
            for mid in ids
        ]
        out: dict[str, Claim | str] = {}
        for mid, (raw_status, doc, raw, sending) in zip(ids, self._run(calls), strict=True):
            status = _str(raw_status)
            if status != "ok":
                out[mid] = status
                continue
            interrupted = float(_str(sending).rsplit(" ", 1)[-1]) if sending else None
            out[mid] = Claim(Record.from_json(doc), bytes(raw), token, interrupted)
        return out

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

    def renew_many(self, claims: Sequence[Claim], lease_seconds: float) -> bool:
        """Extend our leases; False if any was lost (stop sending: someone else may)."""
        ms = int(lease_seconds * 1000)
        done = self._run([(self._renew, [self.key("lease", c.record.id)], [c.token, ms])
                          for c in claims])
        return all(int(v) == 1 for v in done)

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
        doc = self.redis.hget(self.key("m", mid), "doc")
        return Record.from_json(doc) if doc else None

    def get_many(self, ids: Sequence[str]) -> list[Record | None]:
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.hget(self.key("m", mid), "doc")
        return [Record.from_json(d) if d else None for d in pipe.execute()]

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


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
