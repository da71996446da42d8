"""Provider limits without collapse: real `mailworker worker` processes against the test
server's provider personas (a connection cap, a rate cap, an outage), nothing configured
but the relay's DSN. Timings are scaled down through the [retry] table (probe_interval)."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import mailworker
from mailworker.store import MessageState
from mailworker.testing import Persona, wait_until
from tests.conftest import WorkerProcess
from tests.integration.conftest import Env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBE = 1.5  # probe_interval, scaled down from 30 s


def _retry_option(mw_env: dict[str, str], key: str, value: str) -> None:
    """Set a key of the test config's [retry] table (its last table)."""
    cfg = Path(mw_env["MAILWORKER_CONFIG"])
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith(f"{key} =")]
    cfg.write_text("\n".join([*lines, f"{key} = {value}"]) + "\n")


def _send(n: int, tag: str = "") -> list[str]:
    ids: list[str] = []
    for i in range(0, n, 50):
        ids += mailworker.send_many([{"to": f"u{tag}{j}@example.com", "text": "x"}
                                     for j in range(i, min(n, i + 50))])
    return ids


def _watch_pauses(mw: Env, ids: list[str], timeout: float,
                  arrivals: list[tuple[float, int]] | None = None) -> tuple[list[str], float]:
    """Wait until *ids* are final, sampling the relay's pause (and, into *arrivals*, the
    messages the server has); (pauses seen, seconds)."""
    t0 = time.monotonic()
    seen: list[str] = []

    def done() -> bool:
        paused = mw.store.relay_pause("default")
        if paused and paused[0] not in seen:
            seen.append(paused[0])
        if arrivals is not None:
            arrivals.append((time.monotonic(), len(mw.server.messages)))
        counts = mw.store.counts()
        return counts["in_flight"] + counts["deferred"] == 0

    wait_until(done, timeout, interval=0.05, message="every message to be final")
    return seen, time.monotonic() - t0


def test_connection_cap_2_with_nothing_configured(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    mw.server.set_persona(Persona(max_connections=2))
    start_worker("-c", "4")
    start_worker("-c", "4")
    t0 = time.monotonic()
    ids = _send(400)
    pauses, took = _watch_pauses(mw, ids, 120)
    recs = mw.final(ids, timeout=10)
    assert {r.state for r in recs} == {MessageState.DELIVERED}
    assert all(r.attempts == 0 for r in recs)  # a connection cap costs no attempt
    assert max(Counter(m.message_id for m in mw.server.messages).values()) == 1  # once each
    assert pauses == []  # never paused
    late = [t for t, kind in mw.server.refusal_events if kind == "connection_cap" and t > t0 + 1]
    print(f"\n400 messages in {took:.1f}s, {mw.server.connections_opened} connections, "
          f"{mw.server.refusals['connection_cap']} refused by the cap "
          f"({len(late)} after the first second)")
    assert len(late) <= 5  # the window stops at the cap (one probe per REGROW_AFTER)


def test_rate_cap_100_per_second_adapts_without_spending_attempts(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    mw.server.set_persona(Persona(rate=100))  # beyond it: 451 4.7.1 at MAIL
    start_worker("-c", "4")
    start_worker("-c", "4")
    n = 500
    ids = _send(n)
    arrivals: list[tuple[float, int]] = []
    _, took = _watch_pauses(mw, ids, 120, arrivals)
    recs = mw.final(ids, timeout=10)
    assert {r.state for r in recs} == {MessageState.DELIVERED}  # no dead letter
    assert all(r.attempts == 0 for r in recs)  # throttle replies spend no attempt
    assert max(mw.server.deliveries().values()) == 1
    # Once adapted: the pace from the first quarter of the mail to the last message.
    start = next(t for t, k in arrivals if k >= n // 4)
    end = next(t for t, k in arrivals if k >= n)
    pace = (n - n // 4) / (end - start)
    print(f"\n{n} messages in {took:.1f}s; {pace:.0f} msg/s once adapted; "
          f"{mw.server.refusals['rate_cap']} throttle replies")
    assert mw.server.refusals["rate_cap"] > 0  # it was pushed back, and adapted


def test_a_relay_down_is_probed_once_per_interval_and_resumes(
        mw: Env, mw_env: dict[str, str], start_worker: Callable[..., WorkerProcess]) -> None:
    down_for = 6.0  # scaled down from 30 s
    _retry_option(mw_env, "probe_interval", f'"{PROBE:g}s"')
    start_worker("-c", "4")
    start_worker("-c", "4")
    warm = _send(100, "warm")
    assert {r.state for r in mw.final(warm, timeout=60)} == {MessageState.DELIVERED}

    mw.server.down("421")  # open connections get 421 and close; new ones are greeted 421
    t_down = time.monotonic()
    ids = _send(200)
    time.sleep(down_for)  # the outage itself (the scenario's clock, not a wait for work)
    mw.server.up()
    t_up = time.monotonic()
    wait_until(lambda: len(mw.server.messages) > 100, PROBE + 10, interval=0.02,
               message="delivery to resume")
    resumed = time.monotonic() - t_up
    recs = mw.final(ids, timeout=60)
    assert {r.state for r in recs} == {MessageState.DELIVERED}  # nothing lost
    assert all(r.attempts == 0 for r in recs)  # an outage costs no attempt
    assert max(mw.server.deliveries().values()) == 1

    tried = sorted(t - t_down for t, kind in mw.server.refusal_events
                   if kind == "down" and t_down <= t <= t_up)
    # The first failed cohort (the connections open or opening when it went down) is
    # over within a second; after it, the fleet probes once per probe interval.
    probes = [t for t in tried if t > 1.0]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    print(f"\ndown {down_for:g}s: {len(tried)} connections tried, {len(probes)} after the "
          f"first second, gaps {[round(g, 2) for g in gaps]}; resumed {resumed:.2f}s after up")
    assert len(probes) <= down_for / PROBE + 1
    assert all(g >= PROBE * 0.9 for g in gaps)
    assert resumed <= PROBE + 2.0  # within one probe interval (plus a scheduler tick)
