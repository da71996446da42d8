"""One delivery pass over a batch of message ids: claim, send, decide, save.

This is what a Celery task calls; it knows nothing of Celery. A batch is grouped by relay
and each group goes over one pooled connection with ``send_many``, so a busy connection
costs one round trip per message and the per-task overhead is paid once per batch.
"""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from mailworker import metrics
from mailworker.config import ConfigError, Settings
from mailworker.fleet import Window
from mailworker.fleet import install as install_slots
from mailworker.groups import Groups, failed_member, forget
from mailworker.hooks import Hooks
from mailworker.leases import HeldLeases, heartbeat
from mailworker.logging import fast_info
from mailworker.outcome import (
    Step,
    apply_expiry,
    apply_hold,
    apply_result,
    defer_behind,
    hold_until,
    mark_interrupted,
    pause_until,
    requeue,
)
from mailworker.policy import Action, Decision, Policy, Scope
from mailworker.policy_config import policy_of
from mailworker.record import invalid_reason
from mailworker.relay import Relay
from mailworker.smtp import (
    DeliveryUncertain,
    Envelope,
    NotAttempted,
    PoolManager,
    PoolTimeout,
    SendResult,
)
from mailworker.smtp.errors import BEFORE_MAIL, Failure, Stage, annotate, failure_of
from mailworker.smtp.pool import NoSlot
from mailworker.store import Claim, MessageState, Record, Store, Unreadable

__all__ = ["Deliverer", "PassReport", "invalid_reason"]

Gate = Callable[[int], bool]
"""Asked before each transaction's MAIL FROM (by index): may it start?"""
SendMany = Callable[..., Sequence[SendResult | BaseException]]

log = structlog.get_logger("mailworker.delivery")

# Messages sent per send_many call within a batch (one pooled connection checkout each),
# and saved together: a worker killed mid-batch re-sends at most the chunk it was in.
# Smaller chunks cost a Redis round trip and a pipelined round trip each.
CHUNK = 16

# Transactions marked "sending" in Redis per round trip, just before the first of them
# starts. A worker killed mid-batch flags as possible duplicates only the messages of the
# window it was in (at most this many), for one Redis round trip per window.
MARK_WINDOW = 8

@dataclass
class PassReport:
    """What one pass did, for the task's return value and tests."""

    claimed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    lost_leases: int = 0
    quarantined: int = 0


def _batch_failure(exc: Exception, relay: str) -> BaseException:
    """What a failure that escaped ``send_many`` means for the messages of the chunk.

    The pool raises only when it cannot get a connection (nothing was sent); anything
    else, such as Celery's soft time limit firing mid-batch, may have struck after some
    final dots, so those messages are retried flagged as possible duplicates.
    """
    if isinstance(exc, PoolTimeout):  # this process is busy, not the relay: no relay pause
        return NotAttempted(f"no free connection in this worker's pool: {exc}")
    if failure_of(exc).stage in BEFORE_MAIL:
        return exc
    return annotate(DeliveryUncertain(f"batch interrupted: {type(exc).__name__}: {exc}"),
                    Stage.AFTER_DOT, relay)




@dataclass(frozen=True)
class _RelayEffect:
    """What a chunk did to its relay: paused it (the policy's decision), or not; and the
    feedback for its window and rate ("ok" with the transactions accepted, or "slow")."""

    relay: Relay
    pause: Decision | None
    feedback: str | None = None
    accepted: int = 0


class Deliverer:
    """Claims records, delivers them through the pools, saves outcomes, fires hooks."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        pools: PoolManager,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        policy: Policy | None = None,
    ) -> None:
        """*policy* defaults to the one of ``settings.retry`` (see
        :func:`mailworker.policy_config.policy_of`)."""
        self.settings = settings
        self.policy = policy if policy is not None else policy_of(settings)
        self.store = store
        self.pools = pools
        self.hooks = hooks or Hooks()
        self.clock = clock
        self.rng = rng
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._policies: dict[str, Policy] = {}
        self._effects: list[_RelayEffect] = []
        self._claimed_at = 0.0
        self._report = PassReport()
        self._held = HeldLeases(store, [], settings.lease_seconds, 0.0)
        self._paused_until: tuple[float, str] | None = None
        # "sending" marks made ahead, riding in an earlier round trip: id -> usable
        self._premarked: dict[str, bool] = {}
        self.window = Window(store, self.policy.probe_interval)
        self.groups = Groups(settings, store, clock)
        # Connections only inside the relay's fleet window; one FleetSlots per pools.
        self.slots = install_slots(store, pools, settings.lease_seconds,
                                   self.policy.probe_interval)

    def policy_for(self, queue: str) -> Policy:
        if queue not in self._policies:
            q = self.settings.queues.get(queue)
            base = self.policy
            self._policies[queue] = (
                base.with_limits(max_attempts=q.max_attempts, lifetime=q.lifetime) if q else base
            )
        return self._policies[queue]

    def run(self, ids: Sequence[str], task_id: str | None = None) -> PassReport:
        report = self._report = PassReport()
        if not ids:
            return report
        s = self.settings
        now = self.clock()
        leased_at = time.monotonic()
        token = uuid.uuid4().hex
        claims = self.store.claim_many(
            list(dict.fromkeys(ids)), token, s.lease_seconds,
            watchdog=now + s.lease_seconds + s.stuck_after,
        )
        ready: dict[str, list[Claim]] = defaultdict(list)
        release: list[Claim] = []
        finished_ids: list[str] = []  # final already: a stale wake-up
        saves: list[tuple[Claim, Step]] = []
        poison: list[tuple[str, str, str]] = []
        for mid, claim in claims.items():
            if isinstance(claim, str):
                report.skipped[claim] = report.skipped.get(claim, 0) + 1
                if claim == "wrongtype":
                    log.error("delivery.quarantined", message_id=mid,
                              reason="the record key is not a record (wrong Redis type)",
                              hint="listed in the dead letters: inspect it with redis-cli, "
                                   "then purge it with `mailworker dlq purge`")
                continue
            if isinstance(claim, Unreadable):
                poison.append((mid, token, f"unreadable record: {claim.error}"))
                continue
            rec = claim.record
            bad = invalid_reason(rec)
            if bad is not None:
                poison.append((mid, token, f"invalid record: {bad}"))
                continue
            try:
                if claim.interrupted_at is not None and not rec.state.final:
                    mark_interrupted(rec)  # persisted by whatever this pass saves
                if rec.state.final:
                    finished_ids.append(mid)
                    release.append(claim)
                    report.skipped["final"] = report.skipped.get("final", 0) + 1
                elif (rec.next_attempt_at and rec.next_attempt_at > now + 1.0
                      and not claim.interrupted_at):
                    release.append(claim)  # a stale wake-up for a record not due yet
                    report.skipped["not_due"] = report.skipped.get("not_due", 0) + 1
                elif now >= rec.expires_at:
                    saves.append((claim, apply_expiry(rec, now)))
                else:
                    ready[rec.relay].append(claim)
            except Exception as exc:  # a record no check foresaw: alone, set aside
                poison.append((mid, token, f"invalid record: {type(exc).__name__}: {exc}"))
        self._quarantine(poison, report)
        self.store.forget_inflight(finished_ids)
        self.store.release_many(release)
        self._save(saves)  # expired: dead at once, not after a long pass without a lease
        saves = []
        ready = self._resolve_groups(ready)
        report.claimed = sum(len(v) for v in ready.values())

        self._effects = []
        self._premarked = {}
        self._claimed_at = now
        held = self._held = HeldLeases(self.store, [c for g in ready.values() for c in g],
                                       s.lease_seconds, leased_at)
        heartbeat.register(held)
        try:
            for relay_name, group in ready.items():
                try:
                    saves.extend(self._deliver_group(relay_name, group, task_id, held))
                except Exception:
                    # A bug or a Redis blip mid-group: save nothing for it and keep the
                    # "sending" markers, so the sweeper retries them flagged as possible
                    # duplicates once the leases expire. The other groups are still saved.
                    log.exception("delivery.group_failed", relay=relay_name, count=len(group))
                    held.release([c.record.id for c in group])
        finally:
            heartbeat.unregister(held)

        self._save(saves)
        return report

    def _resolve_groups(self, ready: dict[str, list[Claim]]) -> dict[str, list[Claim]]:
        """Claims sent to a relay group regrouped by the member that carries each one
        this time (mailworker.groups: one cached health read per batch). The record keeps
        the group's name; its attempt is the member's."""
        if not any(self.groups.is_group(name) for name in ready):
            return ready
        health = self.groups.health()
        out: dict[str, list[Claim]] = defaultdict(list)
        for name, claims in ready.items():
            for c in claims:
                avoid = failed_member(c.record.history)
                out[self.groups.pick(name, health, avoid)].append(c)
        return out

    def _save(self, saves: Sequence[tuple[Claim, Step]], premark: Sequence[Claim] = ()
              ) -> None:
        """Commit outcomes, the relays' window and rate feedback, and the "sending" marks
        of *premark* (the next chunk's first window) in one round trip; then the other
        relay effects; then announce the outcomes."""
        if not saves:
            return
        report = self._report
        # Decided: the heartbeat stops renewing them (the commit ends their leases).
        self._held.release([c.record.id for c, _ in saves])
        riders = [self.window.feedback_rider(e.relay, e.feedback, e.accepted)
                  for e in self._effects if e.feedback is not None]
        if premark:
            riders.append(self._held.mark_rider(premark, self._premarked))
        ok = self.store.commit_many(((c, st.score, st.counters) for c, st in saves), riders)
        self._apply_relay_effects(fed=True)
        for (claim, step), saved in zip(saves, ok, strict=True):
            if not saved:
                report.lost_leases += 1
                log.warning("delivery.lease_lost", message_id=claim.record.id,
                            hint="another worker took the message over; it decides")
                continue
            report.states[step.state.value] = report.states.get(step.state.value, 0) + 1
            self._announce(claim.record, step)

    def _quarantine(self, poison: list[tuple[str, str, str]], report: PassReport) -> None:
        """Set unreadable or invalid records aside in the dead letters, as they are."""
        if not poison:
            return
        for (mid, _, reason), done in zip(poison, self.store.quarantine_many(poison),
                                           strict=True):
            if done:
                report.quarantined += 1
                log.error("delivery.quarantined", message_id=mid, reason=reason,
                          hint="kept in the dead letters with its raw bytes: "
                               "inspect with `mailworker dlq show`, then fix or purge it")

    def _deliver_group(
        self, relay_name: str, group: list[Claim], task_id: str | None, held: HeldLeases
    ) -> list[tuple[Claim, Step]]:
        now = self.clock()
        try:
            relay = self.settings.relay(relay_name)
        except ConfigError as exc:
            # The relay vanished from config after the message was queued: hold the mail
            # (an operator fixes config) rather than fail it.
            hold = self.policy.unknown_relay(str(exc))
            return [(c, apply_hold(c.record, now, hold)) for c in group]
        return self._deliver_limited(relay, group, task_id, held)

    def _deliver_limited(
        self, relay: Relay, group: list[Claim], task_id: str | None, held: HeldLeases
    ) -> list[tuple[Claim, Step]]:
        """Deliver under the relay's pause and fleet-wide rate; hold what they do not
        allow yet.

        One Redis round trip per batch reads the relay's pause and asks its token bucket
        (at the learned rate, capped by ``fleet_rate``; nothing is limited while no rate
        is in force), and marks the first window as being sent: what is then held has its
        mark cleared by its commit. The connection limit is the pools'
        (:class:`~mailworker.fleet.FleetSlots`): a new connection opens only in a slot of
        the relay's window, and a kept one keeps it.
        """
        # Envelopes first: a record set aside for its envelope is never marked (a mark
        # kept by the quarantine would flag it after a `dlq retry`, though never sent).
        envelopes: dict[str, Envelope] = {}
        sendable: list[Claim] = []
        for c in group:
            try:
                envelopes[c.record.id] = Envelope(
                    c.record.sender, tuple(r.address for r in c.record.open_recipients),
                    c.raw, message_id=c.record.id)
                sendable.append(c)
            except ValueError as exc:  # stored before today's checks: set aside, alone
                self._quarantine([(c.record.id, c.token, f"invalid record: {exc}")],
                                 self._report)
                held.release([c.record.id])
        group = sendable
        if not group:
            return []
        admission = self.window.admit(relay, len(group), [held.mark_rider(
            group[:MARK_WINDOW], self._premarked)])
        now = self.clock()
        # What is held is saved at once, before any MAIL FROM: the first window's marks
        # rode on this round trip and its commit clears them. Saved at the end of the
        # pass instead, a worker killed while the rest is sent would flag them as
        # possible duplicates although never sent (beyond the one window in flight).
        if admission.paused:
            reason, left = admission.paused
            hold = self.policy.hold(f"relay paused: {reason}", left)
            self._save([(c, apply_hold(c.record, now, hold)) for c in group])
            return []
        granted, wait, rate = admission.granted, admission.wait, admission.rate
        if granted == 0:
            hold = self.policy.fleet_hold(wait=wait, rng=self.rng)
            self._save([(c, apply_hold(c.record, now, hold)) for c in group])
            return []
        rest = group[granted:]
        hold = self.policy.fleet_hold(behind=len(rest), rate=rate, rng=self.rng)
        if rest:
            self._save([(c, apply_hold(c.record, now, hold)) for c in rest])
        return self._send_and_decide(relay, group[:granted], task_id,
                                     self.pools.get(relay).send_many, held, envelopes)

    def _send_and_decide(
        self, relay: Relay, group: list[Claim], task_id: str | None,
        send_many: SendMany, held: HeldLeases, built: dict[str, Envelope],
    ) -> list[tuple[Claim, Step]]:
        """Send *group* (its envelopes *built* by :meth:`_deliver_limited`) in chunks."""
        relay_name = relay.name
        envelopes = [built[c.record.id] for c in group]
        with structlog.contextvars.bound_contextvars(task_id=task_id, relay=relay_name):
            for i in range(0, len(envelopes), CHUNK):
                claims, chunk = group[i:i + CHUNK], envelopes[i:i + CHUNK]
                if i and self._budget_spent():
                    self._save([(c, requeue(c.record, self.clock())) for c in group[i:]])
                    break
                started = self.clock()
                try:
                    results = list(send_many(chunk, gate=self._gate(group, i, held)))
                except NoSlot:
                    # The relay's window is full (other workers hold every slot): wait a
                    # moment, no attempt spent, nothing learned about the relay.
                    now = self.clock()
                    hold = self.policy.fleet_hold(rng=self.rng)
                    self._save([(c, apply_hold(c.record, now, hold)) for c in group[i:]])
                    break
                except Exception as exc:
                    # A connection that could not be had fails the chunk alike (and pauses
                    # the relay once); after an interruption the rest were never started.
                    failure = _batch_failure(exc, relay_name)
                    results = [failure] * len(chunk)
                    if failure is not exc:
                        self._save(self._decide(relay, claims, results, started, task_id))
                        now = self.clock()
                        self._save([(c, requeue(c.record, now)) for c in group[i + CHUNK:]])
                        break
                held.release([c.record.id for c in claims])
                # Saved chunk by chunk: a worker killed mid-batch re-sends at most the
                # chunk it was in, and those are exactly the records it had marked. The
                # next chunk's first window is marked in the same round trip.
                pairs = self._decide(relay, claims, results, started, task_id)
                nxt = group[i + CHUNK:i + CHUNK + MARK_WINDOW]
                self._save(pairs, premark=nxt if self._paused_until is None
                           and not self._budget_spent() else ())
                paused = self._paused_until
                if paused is not None:  # host-level trouble: the rest waits with the relay
                    until, reason = paused
                    now = self.clock()
                    self._save([(c, hold_until(c.record, now, until, reason))
                                for c in group[i + CHUNK:]])
                    break
        return []

    def _decide(self, relay: Relay, group: list[Claim],
                results: Sequence[SendResult | BaseException], started: float,
                task_id: str | None) -> list[tuple[Claim, Step]]:
        """Fold one chunk's results into its records; note relay-level effects."""
        relay_name = relay.name
        finished = self.clock()
        out: list[tuple[Claim, Step]] = []
        pause: Decision | None = None
        self._paused_until = None
        conn_failed, slow, accepted = self._signals(results)
        cohort: bool | None = None
        if conn_failed:
            failures, cohort = self._connection_failed(relay, results)
        else:
            failures = 1
        for claim, result in zip(group, results, strict=True):
            if isinstance(result, NotAttempted):
                # Behind a message that broke the connection; nothing of it was sent.
                out.append((claim, requeue(claim.record, finished)))
                continue
            try:
                step = apply_result(
                    claim.record, result, policy=self.policy_for(claim.record.queue),
                    now=finished, started_at=started, relay=relay_name,
                    relay_failures=failures, cohort_failed=cohort, task_id=task_id,
                    worker=self.worker,
                    interrupted=claim.interrupted_at is not None, rng=self.rng,
                )
            except Exception as exc:
                # A record no check foresaw: set it aside alone (its outcome is in the
                # reason), and save the rest of the chunk as usual.
                sent = (", ".join(r.recipient for r in result.accepted)
                        if isinstance(result, SendResult) else type(result).__name__)
                self._held.release([claim.record.id])
                self._quarantine([(claim.record.id, claim.token,
                                   f"invalid record: {type(exc).__name__}: {exc} "
                                   f"(this attempt: accepted for {sent or 'nobody'})")],
                                 self._report)
                continue
            d = step.relay_decision
            if d is not None and (pause is None or d.relay_pause > pause.relay_pause):
                pause = d
            out.append((claim, step))
        feedback = "slow" if slow else "ok" if accepted else None
        if pause is not None:
            # Host-level trouble: the relay waits as the policy said, and so does the rest
            # of this relay's mail, instead of burning every queued message's attempts.
            self._effects.append(_RelayEffect(relay, pause, feedback, accepted))
            until = pause_until(finished, pause)
            self._paused_until = (until, f"relay paused: {pause.reason}")
            out = [(claim, defer_behind(claim.record, step, until)) for claim, step in out]
        elif feedback is not None:
            self._effects.append(_RelayEffect(relay, None, feedback, accepted))
        return out

    def _signals(self, results: Sequence[SendResult | BaseException]
                 ) -> tuple[bool, bool, int]:
        """What a chunk says about its relay: a connection attempt failed at host level
        (a relay-scope retry rule: 421, refused, reset); a reply asked to slow down; and
        how many transactions were accepted. Refusals are matched against the base
        policy's rules (a queue's own limits change no rule)."""
        conn_failed = slow = False
        accepted = 0
        for r in results:
            if isinstance(r, SendResult):
                accepted += bool(r.accepted)
                slow = slow or any(
                    self.policy.rule_for(Failure.reply(rr.code, rr.text, rr.stage, None,
                                                       rr.enhanced_code)).action
                    is Action.SLOW_DOWN for rr in r.recipients if not rr.accepted)
            elif not isinstance(r, NotAttempted):
                rule = self.policy.rule_for(failure_of(r))
                slow = slow or rule.action is Action.SLOW_DOWN
                conn_failed = conn_failed or (rule.scope is Scope.RELAY
                                              and rule.action is Action.RETRY)
        return conn_failed, slow, accepted

    def _connection_failed(self, relay: Relay, results: Sequence[SendResult | BaseException]
                           ) -> tuple[int, bool | None]:
        """Negative feedback for the relay's window, before deciding: (the streak of failed
        connection attempts, whether it is a whole failed cohort). Without Redis the
        policy falls back on the relay backoff (cohort None)."""
        try:
            fb = self.window.feedback(relay, "fail")
            return max(1, fb.streak), fb.cohort_failed
        except Exception as exc:
            log.warning("relay.bookkeeping_failed", error=f"{type(exc).__name__}: {exc}")
            return 1, None

    def _budget_spent(self) -> bool:
        # The threads pool enforces no task time limit, so a batch keeps its own: no new
        # transaction starts once most of it is spent (leases are not the bound: the
        # heartbeat keeps them for as long as the batch runs).
        # The bound is 80% of Celery's hard limit, which the broker's visibility timeout
        # caps too (see broker.celery_config).
        s = self.settings
        limit = min(s.task_time_limit, s.visibility_timeout * 0.9)
        return self.clock() - self._claimed_at > limit * 0.8

    def _gate(self, group: list[Claim], offset: int, held: HeldLeases) -> Gate:
        """Called by the SMTP layer before each MAIL FROM: may this message start?

        Not when the batch's time budget is spent, nor when its lease is lost or not
        known to be ours for a while yet. Before each window of ``MARK_WINDOW``
        messages, one round trip renews their leases and marks them as being sent.
        """
        marked: dict[int, bool] = {}
        premarked = self._premarked

        def gate(i: int) -> bool:
            j = offset + i
            if self._budget_spent():
                return False
            if j not in marked:
                window = group[j:j + MARK_WINDOW]
                ids = [c.record.id for c in window]
                if all(mid in premarked for mid in ids):  # marked in an earlier round trip
                    ok = [premarked.pop(mid) for mid in ids]
                else:
                    ok = held.mark(window)
                marked.update(zip(range(j, j + len(window)), ok, strict=True))
            return marked[j] and held.usable(group[j].record.id)

        return gate

    def _apply_relay_effects(self, fed: bool = False) -> None:
        """Relay pauses and failure counters, after the outcomes are safely saved (and the
        window and rate feedback, unless it rode with the commit: *fed*)."""
        for effect in self._effects:
            try:
                decision = effect.pause
                if effect.feedback is not None and not fed:
                    self.window.feedback(effect.relay, effect.feedback, effect.accepted)
                if decision is None:
                    continue
                name = effect.relay.name
                if decision.action is not Action.PAUSE_RELAY:  # host trouble, not config
                    self.store.relay_failed(name)
                self.store.pause_relay(name, decision.relay_pause, decision.reason)
                forget(self.store)  # relay groups read the members' health afresh
                log.error("relay.paused", relay=name,
                          seconds=round(decision.relay_pause, 1), reason=decision.reason,
                          rule=decision.rule)
            except Exception as exc:  # best effort: the outcomes are already saved
                log.warning("relay.bookkeeping_failed", error=f"{type(exc).__name__}: {exc}")
        self._effects = []

    def _announce(self, record: Record, step: Step) -> None:
        metrics.saved(record, step, self.clock())  # a no-op unless --metrics-port
        if step.state is MessageState.DELIVERED:
            # One event per message: the lean JSON path when logging is configured so.
            if not fast_info("delivery.delivered", {"message_id": record.id,
                                                    "possible_duplicate":
                                                        record.possible_duplicate}):
                log.info("delivery.delivered", message_id=record.id,
                         possible_duplicate=record.possible_duplicate)
            self.hooks.fire("delivered", record)
        elif step.state is MessageState.DEAD:
            log.warning("delivery.dead_lettered", message_id=record.id, reason=record.dead_reason)
            self.hooks.fire("failed", record)
            self.hooks.fire("dead_lettered", record)
        elif step.state is MessageState.DEFERRED:
            log.info("delivery.deferred", message_id=record.id,
                     next_attempt_at=record.next_attempt_at, last_error=record.last_error)
