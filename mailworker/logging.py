"""structlog set-up: JSON in production, console in development, secrets always redacted.

Every log line passes through :func:`redact_secrets`, so a password or an AUTH payload
cannot reach a log line even if a caller binds it by mistake. The SMTP layer also never
logs AUTH arguments in the first place (defence in depth).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["add_timestamp", "configure_logging", "get_logger", "redact_command",
           "redact_secrets"]

_SECRET_KEYS = re.compile(r"(pass(word)?|secret|token|credential|auth_payload|api_key)", re.I)
# Bounded quantifiers and a start-of-scheme look-behind keep this linear: a reply text
# full of word characters before a URL made the unbounded version backtrack quadratically.
# The password runs to the *last* "@" before white space: it may itself hold "@", ":" or
# "/" unencoded, and redacting a little too much is the safe way to be wrong.
_DSN_PASSWORD = re.compile(r"(?<![\w+.-])([A-Za-z][\w+.-]{0,31}://[^:/@\s]{0,256}:)\S{0,256}@")
_AUTH_CMD = re.compile(r"^(AUTH\s+\S+)(\s+.*)?$", re.I | re.S)
REDACTED = "***"


def redact_command(command: str) -> str:
    """An SMTP command line fit for logging: AUTH arguments are replaced."""
    m = _AUTH_CMD.match(command.strip())
    if m:
        return m.group(1).upper() + (f" {REDACTED}" if m.group(2) else "")
    return command.strip()


_secret_key_cache: dict[str, bool] = {}


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: blank secret-looking keys, strip passwords out of DSNs.

    It runs on every event (every SMTP reply), so it is written for the common case:
    key names are checked once and cached, and only values that look like URLs are
    searched for a password.
    """
    cache = _secret_key_cache
    for key, value in event_dict.items():
        secret = cache.get(key)
        if secret is None:
            secret = _SECRET_KEYS.search(key) is not None
            if len(cache) < 4096:  # bounded: keys are code, but be safe
                cache[key] = secret
        if secret:
            event_dict[key] = REDACTED
        elif value.__class__ is str and "://" in value:
            event_dict[key] = _DSN_PASSWORD.sub(rf"\g<1>{REDACTED}@", value)
    command = event_dict.get("command")
    if isinstance(command, str) and command[:4].upper() == "AUTH":
        event_dict["command"] = redact_command(command)
    return event_dict


_second: list[Any] = [-1, ""]


def add_timestamp(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """ISO 8601 UTC timestamp with microseconds, like structlog's TimeStamper(fmt="iso").

    The date-time part is formatted once per second and reused: on a busy worker this
    runs for every SMTP reply, and strftime per event cost more than the JSON encoding.
    """
    now = time.time()
    sec = int(now)
    cached = _second
    if cached[0] != sec:
        cached[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        cached[0] = sec
    event_dict["timestamp"] = f"{cached[1]}.{int((now - sec) * 1_000_000):06d}Z"
    return event_dict


def _json_renderer() -> Any:
    """orjson when installed (about 5x faster per event), else the standard library."""
    try:
        import orjson
    except ImportError:
        return structlog.processors.JSONRenderer()

    def dumps(obj: Any, **_: Any) -> str:
        return orjson.dumps(obj, default=str).decode()

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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_timestamp,
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "mailworker") -> Any:
    """A structlog logger; the processors above apply to every event it emits."""
    return structlog.get_logger(name)
