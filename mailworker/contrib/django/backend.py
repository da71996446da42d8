"""Django email backend: validate in the request, queue when the transaction commits.

``EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"`` makes ``send_mail``,
``send_mass_mail``, ``mail_admins`` and ``EmailMessage.send()`` hand mail to mailworker.
Each message is checked inside the request (a bad address raises there, or is logged
and skipped with ``fail_silently``), but written to Redis only in
``transaction.on_commit``: mail about an order the database then rolled back is never
sent. Outside an atomic block Django runs on-commit callbacks at once.

Settings live in one ``MAILWORKER`` dict; see ``docs/django.md``.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import structlog

# Django ships no type information (django-stubs is not a dependency): its names are Any.
from django.conf import settings as django_settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.mail.backends.base import BaseEmailBackend  # type: ignore[import-untyped]
from django.db import transaction  # type: ignore[import-untyped]

from mailworker import api
from mailworker.config import Settings
from mailworker.contrib import build_settings, django_style_item, ensure_runtime

__all__ = ["BACKEND_KEYS", "EmailBackend", "backend_options", "configure_runtime", "reset"]

log = structlog.get_logger("mailworker.contrib.django")

#: ``MAILWORKER`` keys read by the backend itself; every other key is a runtime setting.
BACKEND_KEYS = {"ENQUEUE_ON_COMMIT": True, "DATABASE": None}

class _Cache:
    """``settings.MAILWORKER`` as Settings, built once (a holder, so no ``global``)."""

    lock = threading.Lock()
    built = False
    settings: Settings | None = None


def _mailworker_setting() -> Mapping[str, Any]:
    value = getattr(django_settings, "MAILWORKER", None) or {}
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured("settings.MAILWORKER must be a dict, e.g. "
                                   "{'REDIS_URL': 'redis://localhost:6379/0'}")
    return value


def backend_options() -> dict[str, Any]:
    """``ENQUEUE_ON_COMMIT`` and ``DATABASE`` from ``settings.MAILWORKER``, with defaults."""
    conf = _mailworker_setting()
    return {key.lower(): conf.get(key, default) for key, default in BACKEND_KEYS.items()}


def configured_settings() -> Settings | None:
    """The runtime :class:`Settings` ``settings.MAILWORKER`` describes (None: it sets none).

    Built once and cached until Django's ``setting_changed`` says ``MAILWORKER`` changed.
    """
    with _Cache.lock:
        if not _Cache.built:
            conf = _mailworker_setting()
            options = {k.lower(): v for k, v in conf.items() if k not in BACKEND_KEYS}
            try:
                built = build_settings(options, where="settings.MAILWORKER") if options else None
            except ValueError as exc:
                raise ImproperlyConfigured(str(exc)) from None
            _Cache.settings, _Cache.built = built, True
        return _Cache.settings


def configure_runtime() -> None:
    """Configure the mailworker runtime from ``settings.MAILWORKER`` (once; cheap after).

    The backend calls it on every send. Call it yourself before using
    :func:`mailworker.status` or :func:`mailworker.send` directly in a process that may
    not have sent through the backend yet. With no runtime keys in ``MAILWORKER`` the
    runtime is left alone: it comes from the ``MAILWORKER_*`` environment, or from an
    explicit :func:`mailworker.configure`.
    """
    settings = configured_settings()
    if settings is not None:
        ensure_runtime(settings)


def reset(**_: Any) -> None:
    """Forget cached settings (connected to Django's ``setting_changed`` for MAILWORKER)."""
    with _Cache.lock:
        _Cache.settings, _Cache.built = None, False


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]  # Django's classes are untyped
    """Queue Django email with mailworker; ``send_messages`` returns how many were accepted.

    Keyword arguments (also accepted by ``django.core.mail.get_connection``):
    ``enqueue_on_commit`` and ``using`` override ``MAILWORKER["ENQUEUE_ON_COMMIT"]`` and
    ``MAILWORKER["DATABASE"]`` for this connection.
    """

    def __init__(self, fail_silently: bool = False, *, enqueue_on_commit: bool | None = None,
                 using: str | None = None, **kwargs: Any) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)
        opts = backend_options()
        self.enqueue_on_commit = bool(opts["enqueue_on_commit"] if enqueue_on_commit is None
                                      else enqueue_on_commit)
        self.using = using or opts["database"]

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        """Validate every message now; queue the valid ones now or on commit.

        Without ``fail_silently`` one invalid message raises and none of the batch is
        queued (as :func:`mailworker.send_many`). With it, invalid ones are logged and
        skipped and the rest are queued. Messages with no recipients are skipped, as
        Django's SMTP backend does.

        ``mailworker_id`` is set on each message: the id it is queued under, or ``None``
        when it was not queued (skipped, rejected, or the queue was unavailable). Inside a
        transaction it is the id the message will be queued under on commit, so the app
        can store it in the same transaction; if that rolls back, nothing is queued.
        """
        messages = list(email_messages)
        if not messages:
            return 0
        configure_runtime()
        accepted: list[tuple[Any, api.Prepared]] = []
        for index, msg in enumerate(messages):
            msg.mailworker_id = None
            if not msg.recipients():
                continue
            try:
                (prepared,) = api.prepare_many([django_style_item(msg)])
            except ValueError as exc:  # InvalidMessageError, ConfigError (unknown relay/queue)
                if not self.fail_silently:
                    if len(messages) > 1:
                        exc.add_note(f"(message {index} of {len(messages)}; none was queued)")
                    raise
                log.warning("django.message_rejected", error=str(exc), index=index,
                            subject=str(getattr(msg, "subject", ""))[:200])
                continue
            accepted.append((msg, prepared))
        if not accepted:
            return 0
        if self.enqueue_on_commit and transaction.get_connection(self.using).in_atomic_block:
            for msg, prepared in accepted:
                msg.mailworker_id = prepared[0].id
            transaction.on_commit(functools.partial(self._enqueue, accepted), using=self.using)
            return len(accepted)
        # Outside an atomic block on_commit would run at once anyway; calling directly
        # lets the count say whether the queue took the mail.
        return len(accepted) if self._enqueue(accepted) else 0

    def _enqueue(self, accepted: list[tuple[Any, api.Prepared]]) -> bool:
        try:
            ids = api.enqueue_prepared([prepared for _, prepared in accepted])
        except (OSError, redis.RedisError) as exc:
            # mailworker.QueueUnavailable is an OSError, as smtplib's errors are: the same
            # except clause (and fail_silently) covers both backends. Nothing was queued,
            # unless Redis's answer was lost (QueueUncertain): then the ids are kept, for
            # mailworker.status() to tell.
            maybe_queued = bool(getattr(exc, "maybe_queued", False))
            for msg, prepared in accepted:
                msg.mailworker_id = prepared[0].id if maybe_queued else None
            if not self.fail_silently:
                raise
            log.error("django.enqueue_failed", error=f"{type(exc).__name__}: {exc}",
                      count=len(accepted), maybe_queued=maybe_queued)
            return False
        # An idempotency key seen before maps to the first message's id.
        for (msg, _), mid in zip(accepted, ids, strict=True):
            msg.mailworker_id = mid
        return True
