"""The reply log: every SMTP reply is logged as one ``smtp.reply`` event.

No reply can escape the log: smtplib's own commands (EHLO, STARTTLS, AUTH, NOOP, QUIT)
are read by :class:`mailworker.smtp.wire.ReplyWire`'s ``getreply()``, which logs here;
the pipelined session logs each reply it reads.

A busy worker reads thousands of replies a second, so this sits on the hot path. Each
connection binds its logger once (relay name and connection id), decides once whether
INFO is enabled at all, and builds each event dict only when it will be emitted. With
the production configuration (:func:`mailworker.logging.configure_logging`, JSON) an
event skips structlog's generic processor chain for the same chain inlined
(:func:`mailworker.logging.fast_info`: same keys, redaction and stream, about half
the cost; ``benchmarks/bench_replylog.py`` measures it); any other configuration, and a
*logger* passed in, get the event through structlog as before.

Events go through ``structlog.get_logger("mailworker.smtp")`` so whatever the caller bound
with ``structlog.contextvars`` (message id, attempt, task id) is merged into every event by
the ``merge_contextvars`` processor of :func:`mailworker.logging.configure_logging`.

AUTH arguments never reach this module unredacted: the connection passes AUTH commands
already redacted, and :meth:`ReplyLog.reply` redacts any command starting with ``AUTH``
again (defence in depth; the check costs one slice per reply), before the metrics hook
sees it. A server may echo the payload back ("535 5.7.8 bad credentials <base64>"): the
texts of replies in the AUTH dialogue (not the server's 334 challenges) lose base64-looking
runs, and :meth:`ReplyLog.hide` removes given strings from every reply text and failure
detail of the connection.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import structlog

from mailworker.logging import REDACTED, fast_info, redact_command
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


# A base64 run a server may echo from the AUTH dialogue (a PLAIN payload, a LOGIN answer):
# 8 or more characters of the alphabet with at least one digit, "+", "/" or "=", so that
# words ("Authentication") stay.
_BASE64ISH = re.compile(r"(?<![\w+/=])(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{8,}={0,2}(?![\w+/=])")

_enhanced: dict[str, str | None] = {}

_unrecorded_said: set[str] = set()


def _unrecorded(what: str, exc: BaseException) -> None:
    """Say once per process (on stderr: the log itself may be what is broken) that replies
    went unrecorded, and go on delivering."""
    if what in _unrecorded_said:
        return
    _unrecorded_said.add(what)
    stream = sys.__stderr__
    with contextlib.suppress(Exception):  # nowhere left to say it
        if stream is not None:
            stream.write(f"mailworker: {what} failed ({type(exc).__name__}: "
                         f"{str(exc)[:200]}); delivery goes on, replies may be missing "
                         "from it. Said once per process.\n")


def _enhanced_code(text: str) -> str | None:
    """:func:`enhanced_code_of`, remembered by the first 16 characters of the text.

    Servers repeat a handful of reply texts ("2.1.0 Ok", "2.1.5 Ok"), and the code is
    decided by at most the first 11 characters of a text that does not start with
    white space (a code of 1+1+3+1+3 characters and the character after it).
    """
    key = text[:16]
    try:
        return _enhanced[key]
    except KeyError:
        code = enhanced_code_of(text)
        if key[:1].strip():
            if len(_enhanced) >= 512:  # bounded: texts with ids in front would grow it
                _enhanced.clear()
            _enhanced[key] = code
        return code


class ReplyLog:
    """Per-connection emitter of ``smtp.reply``, ``smtp.connect`` and ``smtp.close`` events."""

    __slots__ = ("_conn_id", "_hide", "_lean", "_log", "_logs", "_relay")

    #: Called with (relay, command, code) for every reply, logged or not; installed by
    #: :func:`mailworker.metrics.enable` so this layer imports nothing of Prometheus.
    on_reply: ClassVar[Callable[[str, str, int], None] | None] = None

    def __init__(self, relay: str, conn_id: str, logger: Any | None = None) -> None:
        base = logger if logger is not None else structlog.get_logger(LOGGER_NAME)
        self._log = base.bind(relay=relay, conn_id=conn_id)
        self._relay = relay
        self._conn_id = conn_id
        # The lean path renders what structlog would: only for structlog's own logger.
        self._lean = logger is None
        self._logs = _info_enabled(self._log)
        self._hide: tuple[str, ...] = ()

    def hide(self, *secrets: str) -> None:
        """Never log these strings (the connection's password and the AUTH payloads it
        sends) in a reply text or failure detail: a server may echo them back
        ("535 5.7.8 bad credentials <payload>"). Longest first, empty ones ignored."""
        self._hide = tuple(sorted({*self._hide, *(s for s in secrets if s)}, key=len,
                                  reverse=True))

    def scrub_auth_reply(self, text: str) -> str:
        """A reply text from the AUTH dialogue without what it may echo of the credentials:
        the hidden strings and base64-looking runs. For texts that leave this module (an
        ``SMTPAuthenticationError`` is stored in the record and logged by delivery)."""
        return self._scrub(_BASE64ISH.sub(REDACTED, text))

    def _scrub(self, text: str) -> str:
        for secret in self._hide:
            text = text.replace(secret, REDACTED)
        return text

    @property
    def enabled(self) -> bool:
        """Whether :meth:`reply` has anything to do; callers skip it when False. Asked per
        reply, not decided once: the metrics hook may be installed after this log was
        made (its replies went uncounted while logging was off)."""
        return self._logs or ReplyLog.on_reply is not None

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
        auth = command.lstrip()[:4].upper() == "AUTH"
        if auth:  # before the hook too: it gets the command as the log shows it
            command = redact_command(command)
        hook = ReplyLog.on_reply
        if hook is not None:
            try:
                hook(self._relay, command, code)
            except Exception as exc:  # metrics must never decide a delivery
                _unrecorded("the reply metrics hook", exc)
        if not self._logs:
            return
        try:
            self._emit(command, code, text, started, now, auth, message_id, recipient)
        except Exception as exc:
            # A log that cannot be written (a closed stream, a full disk, a value the
            # renderer refuses) must not fail the SMTP session: the reply was read and
            # decides its message; failing here would make answered messages uncertain.
            _unrecorded("the reply log", exc)

    def _emit(self, command: str, code: int, text: str, started: float, now: float,
              auth: bool, message_id: str | None, recipient: str | None) -> None:
        if auth and code != 334:  # a challenge is the server's own text; the rest may echo
            text = _BASE64ISH.sub(REDACTED, text)
        if self._hide:
            text = self._scrub(text)
        # The bound context first, as structlog orders a bound logger's event (passing it
        # again to the bound logger below changes nothing).
        event: dict[str, Any] = {
            "relay": self._relay,
            "conn_id": self._conn_id,
            "command": command,
            "code": code,
            "enhanced_code": _enhanced_code(text),
            "text": text,
            "latency_ms": round((now - started) * 1000.0, 3),
        }
        if message_id is not None:
            event["message_id"] = message_id
        if recipient is not None:
            event["recipient"] = recipient
        if not (self._lean and fast_info("smtp.reply", event)):
            self._log.info("smtp.reply", **event)

    def connect(self, **facts: Any) -> None:
        """``smtp.connect``: the session is ready (after greeting, EHLO, TLS and AUTH)."""
        if self._logs:
            self._info("smtp.connect", facts)

    def close(self, **facts: Any) -> None:
        """``smtp.close``: the socket is gone, with why and how much it carried."""
        if self._logs:
            self._info("smtp.close", facts)

    def _info(self, event: str, facts: dict[str, Any]) -> None:
        try:
            self._log.info(event, **facts)
        except Exception as exc:  # as in reply(): a broken log never fails the session
            _unrecorded("the connection log", exc)

    def failure(self, event: str, exc: BaseException, **facts: Any) -> None:
        """A connection-level failure, logged at WARNING with the stage it happened at."""
        detail = self._scrub(str(exc))
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            detail = _BASE64ISH.sub(REDACTED, detail)
        try:
            self._log.warning(
                event,
                error=type(exc).__name__,
                detail=detail[:300],
                stage=failure_of(exc).stage,
                **facts,
            )
        except Exception as log_exc:  # the failure itself is raised by the caller
            _unrecorded("the connection log", log_exc)
