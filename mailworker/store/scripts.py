"""Loading the store's Lua scripts and running many calls in one round trip.

Each ``*.lua`` file beside this module is one atomic transition; its header says which
keys and arguments it takes and what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis

__all__ = ["Call", "Rider", "Scripts", "text"]

Call = tuple[Any, list[Any], list[Any]]
"""One script call: (registered Script, keys, args)."""

Rider = tuple[list[Call], Callable[[list[Any]], None]]
"""Script calls that ride in another operation's round trip (a commit's), with what to do
with their results once Redis has answered (nothing is done if the round trip fails)."""


def text(name: str) -> str:
    """The source of ``mailworker/store/<name>.lua``."""
    return resources.files("mailworker.store").joinpath(f"{name}.lua").read_text()


class Scripts:
    """The registered scripts of one Redis client, and :meth:`run` to call them."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._registered: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._registered:
            self._registered[name] = self.redis.register_script(text(name))
        return self._registered[name]

    def run(self, calls: Sequence[Call], keep_errors: bool = False) -> list[Any]:
        """Run script calls in one round trip (EVALSHA), loading a script only when Redis
        lacks it (after a restart or failover). A call's error is raised (after all ran),
        or with *keep_errors* left in its place among the results.

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
                elif isinstance(value, Exception) and not keep_errors:
                    raise value
                else:
                    results[i] = value
            if not missing:
                break
            for script in {calls[i][0].sha: calls[i][0] for i in missing}.values():
                script.sha = self.redis.script_load(script.script)
            todo = missing
        return results

    def run_with(self, calls: Sequence[Call], riders: Sequence[Rider]) -> list[Any]:
        """:meth:`run` *calls* and the riders' calls after them, in one round trip; hand
        each rider its results; return the results of *calls*.

        A rider's failure is its own: a rider whose call failed is handed nothing (as if
        its round trip had failed: the gate marks a window itself, feedback is lost), and
        the calls it rode on stand. An error of *calls* is raised (riders handed nothing).
        """
        if not riders:
            return self.run(calls)
        extra = [c for rider_calls, _ in riders for c in rider_calls]
        results = self.run([*calls, *extra], keep_errors=True)
        for value in results[:len(calls)]:
            if isinstance(value, Exception):
                raise value
        at = len(calls)
        for rider_calls, done in riders:
            got = results[at:at + len(rider_calls)]
            if not any(isinstance(v, Exception) for v in got):
                done(got)
            at += len(rider_calls)
        return results[:len(calls)]

    def call(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        """One call of one script."""
        return self.run([(self[name], keys, args)])[0]


def to_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
