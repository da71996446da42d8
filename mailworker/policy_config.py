"""The ``[retry]`` config table, read into a :class:`~mailworker.policy.Policy`.

Kept out of :mod:`mailworker.config` so that config stays the bottom layer: settings hold
the ``[retry]`` table as written (``Settings.retry``), and this module, a layer up, turns
it into the policy, checking every key, rule and duration with an error that names it and
says what is allowed. :func:`policy_of` caches the result per settings value; the runtime
builds it when a process starts, so a worker that starts is a worker whose policy parsed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mailworker.backoff import Backoff, parse_duration
from mailworker.config import MAX_DURATION, ConfigError, Settings
from mailworker.errors import shown
from mailworker.policy import (
    DEFAULT_RULES,
    EXCEPTION_ALIASES,
    EXCEPTIONS,
    RULE_ACTIONS,
    RULE_KEYS,
    Action,
    Policy,
    Rule,
    Scope,
)
from mailworker.smtp.errors import Stage

__all__ = ["RETRY_KEYS", "policy_from_table", "policy_of"]

RETRY_KEYS = ("max_attempts", "lifetime", "max_uncertain", "config_pause", "probe_interval",
              "slow_down_wait", "max_slow_downs", "backoff", "relay_backoff", "rules")
"""Keys of the ``[retry]`` table (documented in config/README.md, "Retry policy")."""


def policy_from_table(table: Mapping[str, Any]) -> Policy:
    """Build from the ``[retry]`` config table; user rules go ahead of the defaults.

    Raises ``ValueError`` naming the bad key or rule, the field, and what is allowed.
    """
    _check_keys("retry", table, RETRY_KEYS)
    kwargs: dict[str, Any] = {}
    for key in ("max_attempts", "max_uncertain", "max_slow_downs"):
        if key in table:
            kwargs[key] = table[key]
    for key in ("lifetime", "config_pause", "probe_interval", "slow_down_wait"):
        if key in table:
            try:
                kwargs[key] = parse_duration(table[key])
            except ValueError as exc:
                raise ValueError(f"retry.{key}: {exc}") from None
    for key in ("backoff", "relay_backoff"):
        if key in table:
            kwargs[key] = Backoff.from_config(table[key], f"retry.{key}")
    rows = table.get("rules", [])
    if not isinstance(rows, list):
        raise ValueError("retry.rules must be a list of tables ([[retry.rules]])")
    rules = [_rule_from_config(f"retry.rules[{i}]", row) for i, row in enumerate(rows)]
    try:
        return Policy(rules=(*rules, *DEFAULT_RULES), **kwargs)
    except ValueError as exc:
        raise ValueError(f"retry.{exc}") from None


_cache: dict[int, tuple[Mapping[str, Any], Policy]] = {}
_lock = threading.Lock()


def policy_of(settings: Settings) -> Policy:
    """The policy of *settings*' ``[retry]`` table, built once per table.

    Raises :class:`~mailworker.config.ConfigError` naming the bad key, rule or duration.
    """
    table = settings.retry
    hit = _cache.get(id(table))
    if hit is not None and hit[0] is table:
        return hit[1]
    try:
        policy = policy_from_table(table)
    except ValueError as exc:
        raise ConfigError(f"config file: [retry]: {exc}") from None
    for where, seconds in (("[retry] lifetime", policy.lifetime),
                           ("[retry] config_pause", policy.config_pause),
                           ("[retry] backoff.maximum", policy.backoff.maximum),
                           ("[retry] relay_backoff.maximum", policy.relay_backoff.maximum)):
        # The policy checks finiteness; a lifetime of 1e300 s would still overflow dates.
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_DURATION):
            raise ConfigError(f"{where}={shown(seconds)} is not a duration above zero and at "
                              "most 10 years")
    with _lock:
        if len(_cache) > 64:  # settings are few; tests build many
            _cache.clear()
        _cache[id(table)] = (table, policy)  # the table is kept, so its id is not reused
    return policy


def _check_keys(where: str, table: Any, allowed: Sequence[str]) -> None:
    if not isinstance(table, Mapping):
        raise ValueError(f"{where} must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _rule_from_config(index: str, row: Any) -> Rule:
    _check_keys(index, row, RULE_KEYS)
    name = row.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: name is required (text naming the rule in logs)")
    where = f"{index}: rule {name!r}"

    def texts(key: str, value: Any) -> list[str]:
        items = value if isinstance(value, list) else [value]
        kinds = str | int if key == "codes" else str  # TOML users write codes = 450
        if not items or any(isinstance(v, bool) or not isinstance(v, kinds) for v in items):
            raise ValueError(f"{where}: {key} must be text or a list of text, got {value!r}")
        return [str(v) for v in items]

    def one_of(key: str, value: str, allowed: Iterable[str]) -> str:
        options = list(allowed)
        if value not in options:
            raise ValueError(f"{where}: {key} {value!r} is not known; use one of: "
                             + ", ".join(options))
        return value

    kwargs: dict[str, Any] = {"name": name}
    for key, value in row.items():
        if value is None or key == "name":
            continue
        if key == "exception":
            names = [n.removeprefix("smtplib.") if n.startswith("smtplib.SMTP") else n
                     for n in texts(key, value)]
            kwargs[key] = tuple(EXCEPTIONS[EXCEPTION_ALIASES.get(n) or one_of(key, n, EXCEPTIONS)]
                                for n in names)
        elif key in ("codes", "enhanced"):
            kwargs[key] = ",".join(texts(key, value))
        elif key == "stages":
            kwargs[key] = frozenset(Stage(one_of("stage", s.lower().replace("_", "-"), Stage))
                                    for s in texts(key, value))
        elif key == "action":
            kwargs[key] = Action(one_of(key, str(value).lower(), RULE_ACTIONS))
        elif key == "scope":
            kwargs[key] = Scope(one_of(key, str(value).lower(), Scope))
        elif not isinstance(value, bool if key == "possible_duplicate" else str):
            want = "true or false" if key == "possible_duplicate" else "text"
            raise ValueError(f"{where}: {key} must be {want}, got {value!r}")
        else:
            kwargs[key] = value
    try:
        return Rule(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{index}: {exc}") from None
