"""The reply log: every SMTP reply is logged as one ``smtp.reply`` event.

No reply can escape the log: smtplib's own commands (EHLO, STARTTLS, AUTH, NOOP, QUIT)
are read by :class:`mailworker.smtp.wire.ReplyWire`'s ``getreply()``, which logs here;
the pipelined session logs each reply it reads.

A busy worker reads thousands of replies a minute, so this sits on the hot path. Each
connection binds its logger once (relay name and connection id), decides once whether
INFO is enabled at all, and builds each event dict only when it will be emitted.

Events go through ``structlog.get_logger("mailworker.smtp")`` so whatever the caller bound
with ``structlog.contextvars`` (message id, attempt, task id) is merged into every event by
the ``merge_contextvars`` processor of :func:`mailworker.logging.configure_logging`.

AUTH arguments never reach this module unredacted: the connection passes AUTH commands
already redacted, and :meth:`ReplyLog.reply` redacts any command starting with ``AUTH``
again (defence in depth; the check costs one slice per reply).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import structlog

from mailworker.logging import redact_command
from mailworker.smtp.errors import enhanced_code_of, failure_of

__all__ = ["LOGGER_NAME", "ReplyLog"]

LOGGER_NAME = "mailworker.smtp"


def _info_enabled(logger: Any) -> bool:
    """Whether INFO events would be emitted; filtering loggers answer without a call chain."""
    check = getattr(logger, "is_enabled_for", None)
    if check is None:
        return True
    try:
        return bool(check(logging.INFO))
    except Exception:  # a custom wrapper with another signature: log rather than guess
        return True


class ReplyLog:
    """Per-connection emitter of ``smtp.reply``, ``smtp.connect`` and ``smtp.close`` events."""

    __slots__ = ("_log", "_logs", "_relay", "enabled")

    #: Called with (relay, command, code) for every reply, logged or not; installed by
    #: :func:`mailworker.metrics.enable` so this layer imports nothing of Prometheus.
    on_reply: ClassVar[Callable[[str, str, int], None] | None] = None

    def __init__(self, relay: str, conn_id: str, logger: Any | None = None) -> None:
        base = logger if logger is not None else structlog.get_logger(LOGGER_NAME)
        self._log = base.bind(relay=relay, conn_id=conn_id)
        self._relay = relay
        self._logs = _info_enabled(self._log)
        # Callers skip reply() when this is False: with a hook it must still be called.
        self.enabled = self._logs or ReplyLog.on_reply is not None

    def reply(
        self,
        command: str,
        code: int,
        text: str,
        started: float,
        now: float,
        *,
        message_id: str | None = None,
        recipient: str | None = None,
    ) -> None:
        """Log one reply (its text already decoded); *started* is when the command group it
        answers was written."""
        hook = ReplyLog.on_reply
        if hook is not None:
            hook(self._relay, command, code)
        if not self._logs:
            return
        if command[:4].upper() == "AUTH":
            command = redact_command(command)
        event: dict[str, Any] = {
            "command": command,
            "code": code,
            "enhanced_code": enhanced_code_of(text),
            "text": text,
            "latency_ms": round((now - started) * 1000.0, 3),
        }
        if message_id is not None:
            event["message_id"] = message_id
        if recipient is not None:
            event["recipient"] = recipient
        self._log.info("smtp.reply", **event)

    def connect(self, **facts: Any) -> None:
        """``smtp.connect``: the session is ready (after greeting, EHLO, TLS and AUTH)."""
        if self._logs:
            self._log.info("smtp.connect", **facts)

    def close(self, **facts: Any) -> None:
        """``smtp.close``: the socket is gone, with why and how much it carried."""
        if self._logs:
            self._log.info("smtp.close", **facts)

    def failure(self, event: str, exc: BaseException, **facts: Any) -> None:
        """A connection-level failure, logged at WARNING with the stage it happened at."""
        self._log.warning(
            event,
            error=type(exc).__name__,
            detail=str(exc)[:300],
            stage=failure_of(exc).stage,
            **facts,
        )
