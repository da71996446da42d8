"""structlog set-up: JSON in production, console in development, secrets always redacted.

Every log line passes through :func:`redact_secrets`, so a password or an AUTH payload
cannot reach a log line even if a caller binds it by mistake; the rendered line is checked
too, at every depth (nested dicts and lists, dataclasses, bytes, exceptions: see
:func:`_render`). The SMTP layer also never logs AUTH arguments in the first place
(defence in depth).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

try:
    import orjson
except ImportError:  # a dependency; the standard library's json is the fallback
    orjson = None  # type: ignore[assignment]

__all__ = ["add_timestamp", "configure_logging", "fast_info", "get_logger",
           "merge_contextvars", "redact_command", "redact_secrets"]

_SECRET_KEYS = re.compile(
    r"(pass(word)?|pwd|secret|token|credential|auth_payload|api[_-]?key|private_key"
    r"|authorization)", re.I)
# Anchored on the literal "://" (whatever the scheme, however long) and bounded, so linear:
# a reply text full of word characters before a URL made an unbounded version backtrack
# quadratically. The user may hold an unencoded "@" (user names are often mail addresses:
# smtp://alice@example.com:pw@host); the password runs to the *last* "@" before white
# space: it may itself hold "@", ":" or "/" unencoded, and redacting a little too much is
# the safe way to be wrong. A password in the query string (?password=...) too.
_DSN_PASSWORD = re.compile(r"(://[^:/\s]{0,256}:)\S{0,512}@")
_DSN_QUERY = re.compile(r"([?&;](?:pass(?:word)?|pwd|secret|token|api_key|auth)=)[^&;#\s]*",
                        re.I)
_AUTH_CMD = re.compile(r"^(AUTH\s+\S+)(\s+.*)?$", re.I | re.S)
REDACTED = "***"


def redact_command(command: str) -> str:
    """An SMTP command line fit for logging: AUTH arguments are replaced."""
    stripped = command.strip()
    m = _AUTH_CMD.match(stripped)
    if m:
        return m.group(1).upper() + (f" {REDACTED}" if m.group(2) else "")
    if stripped[:4].upper() == "AUTH" and len(stripped) > 4:  # "AUTH=PLAIN <payload>", ...
        return f"AUTH {REDACTED}"
    return stripped


_secret_key_cache: dict[str, bool] = {}


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: blank secret-looking keys, strip passwords out of DSNs.

    It runs on every event (every SMTP reply), so it is written for the common case:
    key names are checked once and cached, and only values that look like URLs are
    searched for a password.
    """
    for key, value in event_dict.items():
        if _secret_key(key):
            event_dict[key] = REDACTED
        elif value.__class__ is str and "://" in value:
            event_dict[key] = _redact_url(value)
    command = event_dict.get("command")
    # lstrip: " AUTH PLAIN <payload>" is as secret (a str without leading white space
    # is returned as is, no copy).
    if isinstance(command, str) and command.lstrip()[:4].upper() == "AUTH":
        event_dict["command"] = redact_command(command)
    return event_dict


def _redact_url(text: str) -> str:
    """*text* (holding a "://") with the password of every URL in it replaced."""
    return _DSN_QUERY.sub(rf"\g<1>{REDACTED}", _DSN_PASSWORD.sub(rf"\g<1>{REDACTED}@", text))


def _secret_key(key: str) -> bool:
    """Whether *key* names a secret; cached (keys are code, but the cache is bounded)."""
    cache = _secret_key_cache
    secret = cache.get(key)
    if secret is None:
        secret = _SECRET_KEYS.search(key) is not None
        if len(cache) < 4096:
            cache[key] = secret
    return secret


def _redact_deep(obj: Any) -> Any:
    """:func:`redact_secrets` at every depth of a parsed JSON document (dicts, lists, str)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if _secret_key(key):
                out[key] = REDACTED
            elif (key == "command" and isinstance(value, str)
                  and value.lstrip()[:4].upper() == "AUTH"):
                out[key] = redact_command(value)
            else:
                out[key] = _redact_deep(value)
        return out
    if isinstance(obj, list):
        return [_redact_deep(v) for v in obj]
    if isinstance(obj, str) and "://" in obj:
        return _redact_url(obj)
    return obj


def _render(event_dict: Any) -> str:
    """The JSON line (without its newline) of an event, for the chain and the lean path.

    :func:`redact_secrets` sees only the event's top level as Python objects: a password
    in a nested dict or list, or in a value JSON renders with ``str()`` (bytes, an
    exception quoting a Redis URL, a str subclass), would pass it. So the rendered line is
    checked too: when it holds a "://" or any nested object or array at all, it is parsed
    back and redacted at every depth (:func:`_redact_deep`), then rendered again; a
    parse-and-render round trip changes nothing else. A flat event without a URL, every
    SMTP reply, costs three C-level scans of the line.
    """
    line = _dumps(event_dict)
    if "://" in line or "[" in line or line.find("{", 1) > 0:  # the same test in _Lean.emit
        line = _dumps(_redact_deep(_loads(line)))
    return line


_second: list[Any] = [-1, ""]


def add_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """ISO 8601 UTC timestamp with microseconds, like structlog's TimeStamper(fmt="iso").

    The date-time part is formatted once per second and reused: on a busy worker this
    runs for every SMTP reply, and strftime per event cost more than the JSON encoding.
    """
    event_dict["timestamp"] = _stamp()
    return event_dict


def _stamp() -> str:
    """:func:`add_timestamp`'s value alone (the lean path sets it without a processor);
    integer microseconds from ``time_ns()``, a third cheaper than splitting a float."""
    us = time.time_ns() // 1000
    sec = us // 1_000_000
    cached = _second
    if cached[0] != sec:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        cached[0] = sec
    return f"{cached[1]}{us % 1_000_000:06d}Z"


def _orjson_dumps(obj: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


def _orjson_line(obj: Any) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_APPEND_NEWLINE).decode()


def _json_line(obj: Any) -> str:
    return json.dumps(obj, default=str) + "\n"


_dumps = _orjson_dumps if orjson is not None else _json_dumps
_dumps_line = _orjson_line if orjson is not None else _json_line
_loads: Any = orjson.loads if orjson is not None else json.loads


class _Lean:
    """The production JSON chain of :func:`configure_logging`, inlined for hot events.

    structlog runs a logger's processors one call each, copies the context, and
    :func:`structlog.contextvars.merge_contextvars` walks a copy of every context variable
    of the thread: about 11 µs per ``smtp.reply`` event on a busy 2-core machine, 4 events
    per message. This writes the same JSON line (same keys, same redaction, same stream
    and file lock) in about half of that, most of the rest being the write system call
    (``benchmarks/bench_replylog.py``). It applies only while structlog is configured exactly as
    :func:`configure_logging` left it; anything else (a console format, ``capture_logs``
    in a test, an application's own ``structlog.configure``) goes through structlog.
    """

    __slots__ = ("config", "flush", "lock", "processors", "write")

    def __init__(self, config: tuple[Any, ...], stream: TextIO) -> None:
        self.config = config
        # A copy: structlog.testing.capture_logs edits the configured list in place.
        self.processors = list(config[0])
        self.write, self.flush = stream.write, stream.flush
        self.lock = _file_lock(stream)

    def emit(self, level: str, event_dict: dict[str, Any]) -> None:
        # The processors of configure_logging, in order: merge_contextvars, add_log_level,
        # add_timestamp, redact_secrets, format_exc_info (no exc_info on these events),
        # then the JSON renderer and WriteLogger.msg.
        setdefault = event_dict.setdefault
        for key, var in _context_vars():
            value = var.get(Ellipsis)
            if value is not Ellipsis:
                setdefault(key, value)
        event_dict["level"] = level
        event_dict["timestamp"] = _stamp()
        # redact_secrets, in cheap passes: secret-looking keys (looked up once per set of
        # keys), the AUTH command, then _render: a password in a URL or anything nested
        # only if the line holds a "://", an object or an array at all.
        keys = tuple(event_dict)
        secret = _secret_keys.get(keys)
        if secret is None:
            secret = tuple(k for k in keys if _SECRET_KEYS.search(k) is not None)
            if len(_secret_keys) < 1024:  # bounded: key sets are code, but be safe
                _secret_keys[keys] = secret
        for key in secret:
            event_dict[key] = REDACTED
        command = event_dict.get("command")
        if isinstance(command, str) and command.lstrip()[:4].upper() == "AUTH":
            event_dict["command"] = redact_command(command)
        line = _dumps_line(event_dict)
        if "://" in line or "[" in line or line.find("{", 1) > 0:  # _render, inlined
            line = _dumps(_redact_deep(_loads(line))) + "\n"
        with self.lock:
            self.write(line)
            self.flush()


_secret_keys: dict[tuple[str, ...], tuple[str, ...]] = {}
_vars_seen: list[Any] = [-1, []]


def _context_vars() -> list[tuple[str, Any]]:
    """(key, ContextVar) of every structlog context variable made so far in the process.

    structlog keeps them in one dict that only grows (one variable per key ever bound);
    reading each with ``get()`` is what ``merge_contextvars`` does through a copy of the
    whole context. The list is rebuilt only when a new key appeared.
    """
    seen = _vars_seen
    if seen[0] != len(_CONTEXT_VARS):
        items = list(_CONTEXT_VARS.items())
        seen[1] = [(name[_PREFIX_LEN:], var) for name, var in items]
        seen[0] = len(items)
    got: list[tuple[str, Any]] = seen[1]
    return got


def merge_contextvars(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog's ``merge_contextvars`` with the lean path's order of keys.

    structlog's walks a copy of the thread's context, whose order is a hash order: the
    lean path reads the same variables from structlog's registry, in the order their keys
    were first bound, and the chain must write the same line (and is cheaper for it).
    """
    for key, var in _context_vars():
        value = var.get(Ellipsis)
        if value is not Ellipsis:
            event_dict.setdefault(key, value)
    return event_dict


_CONTEXT_VARS: dict[str, Any] = getattr(structlog.contextvars, "_CONTEXT_VARS", {})
_PREFIX_LEN = len(getattr(structlog.contextvars, "STRUCTLOG_KEY_PREFIX", "structlog_"))
_EXC_INFO = getattr(structlog.contextvars, "STRUCTLOG_KEY_PREFIX", "structlog_") + "exc_info"


def _file_lock(stream: TextIO) -> Any:
    """The lock structlog's WriteLogger takes for *stream*, so lines never interleave."""
    try:
        from structlog._output import _get_lock_for_file

        return _get_lock_for_file(stream)
    except (ImportError, TypeError):  # a structlog without it: a lock of our own
        return threading.Lock()


def _release_write_locks_in_child() -> None:
    """After a fork, in the child: free the files' write locks a parent thread held.

    A prefork pool forks children while other threads of the parent may be writing a log
    line; the child inherits that lock held by a thread it does not have, and its first
    line (lean path or structlog's WriteLogger, which share the lock) waited forever.
    The child has one thread when this runs, so a held lock is nobody's; a
    ``threading.Lock`` may be released by any thread. Released, not replaced: loggers
    bound before the fork keep a reference to it.
    """
    locks: list[Any] = []
    try:
        from structlog._output import WRITE_LOCKS

        locks.extend(WRITE_LOCKS.values())
    except ImportError:  # pragma: no cover - a structlog without it
        pass
    got = _lean[0]
    if got is not None:
        locks.append(got.lock)
    for lock in locks:
        if lock.locked():
            with contextlib.suppress(RuntimeError):  # released meanwhile
                lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_write_locks_in_child)

_lean: list[_Lean | None] = [None]


def _structlog_config() -> tuple[Any, ...]:
    cfg = structlog.get_config()
    return (cfg["processors"], cfg["wrapper_class"], cfg["logger_factory"])


def lean() -> _Lean | None:
    """The lean JSON path, when structlog is still configured as configure_logging left
    it (checked on every call: tests and applications reconfigure structlog at will)."""
    got = _lean[0]
    if got is None:
        return None
    cfg = getattr(structlog, "_config", None)
    current = getattr(cfg, "_CONFIG", None)
    if current is not None:
        procs = current.default_processors
        same = (procs is got.config[0] and procs == got.processors
                and current.default_wrapper_class is got.config[1]
                and current.logger_factory is got.config[2])
    else:  # pragma: no cover - a structlog without _CONFIG
        same = _structlog_config() == got.config and got.config[0] == got.processors
    return got if same else None


def fast_info(event: str, event_dict: dict[str, Any]) -> bool:
    """Emit *event* at INFO through the lean path; False (nothing written) when it does
    not apply, and the caller logs through structlog as usual. *event_dict* is the
    caller's own and is filled in (event, context variables, level, timestamp)."""
    fast = lean()
    if fast is None or not _info_on[0] or "exc_info" in event_dict:
        return False
    exc_info = _CONTEXT_VARS.get(_EXC_INFO)
    if exc_info is not None and exc_info.get(Ellipsis) is not Ellipsis:
        return False  # format_exc_info's work (a traceback, or the key dropped): the chain
    event_dict["event"] = event
    fast.emit("info", event_dict)
    return True


_info_on = [True]


def _json_renderer() -> Any:
    """orjson when installed (about 5x faster per event), else the standard library."""
    def dumps(obj: Any, **_: Any) -> str:
        return _render(obj)

    return structlog.processors.JSONRenderer(serializer=dumps)


def configure_logging(
    fmt: str | None = None, level: str | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog once for the process.

    *fmt* is ``"json"`` or ``"console"`` (default: ``MAILWORKER_LOG_FORMAT``, else console
    on a terminal and JSON otherwise). *level* defaults to ``MAILWORKER_LOG_LEVEL`` or INFO.
    """
    fmt = fmt or os.environ.get("MAILWORKER_LOG_FORMAT") or (
        "console" if sys.stderr.isatty() else "json"
    )
    level_name = (level or os.environ.get("MAILWORKER_LOG_LEVEL") or "INFO").upper()
    renderer: Any = (
        _json_renderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    level_no = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    out = stream or sys.stderr
    # The lean path reads structlog's context variables from its registry; a structlog
    # without one gets every event through the chain, and structlog's own merge.
    registry = hasattr(structlog.contextvars, "_CONTEXT_VARS")
    processors = [
        merge_contextvars if registry else structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        add_timestamp,
        redact_secrets,
        structlog.processors.format_exc_info,
        renderer,
    ]
    wrapper = structlog.make_filtering_bound_logger(level_no)
    factory = structlog.WriteLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _info_on[0] = level_no <= logging.INFO
    usable = fmt == "json" and registry
    _lean[0] = _Lean((processors, wrapper, factory), out) if usable else None


def get_logger(name: str = "mailworker") -> Any:
    """A structlog logger; the processors above apply to every event it emits."""
    return structlog.get_logger(name)
