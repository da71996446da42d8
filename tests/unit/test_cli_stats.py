"""``Store.relay_states()``, what ``mailworker stats`` reads: every relay Redis knows of."""

from __future__ import annotations

import fakeredis
import pytest

from mailworker.store import Store


@pytest.mark.parametrize("prefix", ["mw", "mw*", "m[w]"])  # glob characters are literal
def test_relay_states_lists_counters_and_pauses(prefix: str) -> None:
    client = fakeredis.FakeRedis()
    store = Store(client, prefix=prefix)
    # Another deployment on the same Redis, whose keys a glob read into "mw*" would match.
    other = Store(client, prefix="mw-other")
    client.hincrby(store.key("stats", "main"), "delivered", 5)
    client.hincrby(store.key("stats", "main"), "failed", 1)
    client.hincrby(other.key("stats", "theirs"), "delivered", 9)
    store.pause_relay("main", 90, "535 5.7.8 auth failed")
    store.pause_relay("paused:only", 30, "certificate not trusted")
    states = store.relay_states()
    assert set(states) == {"main", "paused:only"}
    assert states["main"]["counters"] == {"delivered": 5, "failed": 1}
    assert states["main"]["paused"]["reason"] == "535 5.7.8 auth failed"
    assert 80 < states["main"]["paused"]["seconds_left"] <= 90
    assert states["paused:only"] == {"counters": {}, "paused": {
        "reason": "certificate not trusted", "seconds_left": states["paused:only"]["paused"][
            "seconds_left"]}, "window": None, "slots_in_use": 0, "rate": None}
    store.resume_relay("main")
    assert store.relay_states()["main"]["paused"] is None
    assert Store(fakeredis.FakeRedis(), prefix=prefix).relay_states() == {}
