"""Flask extension: ``MailWorker(app)`` or ``mw.init_app(app)`` in an app factory.

Configuration comes from ``app.config`` (``MAILWORKER_REDIS_URL``, ``MAILWORKER_RELAYS``
or ``MAILWORKER_RELAY_<NAME>``, ``MAILWORKER_DEFAULT_SENDER`` falling back to Flask-Mail's
``MAIL_DEFAULT_SENDER``, ...; see ``docs/flask.md``) and is checked in ``init_app``, so a
bad value stops the app at start-up rather than at its first email.

Decisions:

* The sending defaults (sender, queue, relay) are per app and passed with each message.
  Connection settings (Redis, key prefix, relays, queues) belong to the process-wide
  runtime: apps with equal ones share it; an app with different ones reconfigures it
  when it sends (fine for tests and factories; one process serving two apps with
  different Redis servers concurrently is not supported).
* An app whose config has no connection keys leaves the runtime alone: it then comes
  from the ``MAILWORKER_*`` environment or an explicit :func:`mailworker.configure`.
* ``send_message`` takes an ``email.message.Message``, a Django-style message with
  ``message()`` and ``recipients()`` (Flask-Mailman), or a Flask-Mail-style ``Message``
  (``subject``, ``recipients``, ``body``, ``html``, ``attachments``...), duck-typed, so
  neither library is a dependency.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from email.utils import formataddr
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app, has_app_context

from mailworker import api
from mailworker.contrib import (
    build_settings,
    django_style_item,
    ensure_runtime,
    is_django_style,
    options_key,
    routing_kwargs,
)
from mailworker.message import Attachment, InvalidMessageError

if TYPE_CHECKING:
    from mailworker.config import Settings

__all__ = ["MailWorker"]

_PREFIX = "MAILWORKER_"
_RELAY_PREFIX = "MAILWORKER_RELAY_"
#: Per-app sending defaults, passed with each message instead of set on the runtime.
_DEFAULTS = ("default_sender", "default_queue", "default_relay")

_cache_lock = threading.Lock()
_settings_cache: dict[str, Settings] = {}


@dataclass(frozen=True)
class _AppState:
    """What ``init_app`` read from one app's config."""

    settings: Settings | None  # None: the app leaves the runtime to the environment
    sender: str | None
    queue: str | None
    relay: str | None


def _sender_text(value: Any) -> str | None:
    """An address as text; Flask-Mail also allows ``(name, address)``."""
    if value is None or value == "":
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return formataddr((str(value[0]), str(value[1])))
    return str(value)


def _read_config(config: Mapping[str, Any]) -> _AppState:
    options: dict[str, Any] = {}
    relays: dict[str, Any] = {}
    for key, value in config.items():
        if not key.startswith(_PREFIX) or value is None:
            continue
        if key.startswith(_RELAY_PREFIX) and key != "MAILWORKER_RELAYS":
            relays[key.removeprefix(_RELAY_PREFIX).lower()] = value
        else:
            options[key.removeprefix(_PREFIX).lower()] = value
    if relays:
        options["relays"] = {**relays, **(options.get("relays") or {})}
    defaults = {name: options.pop(name, None) for name in _DEFAULTS}
    sender = _sender_text(defaults["default_sender"] or config.get("MAIL_DEFAULT_SENDER"))
    settings: Settings | None = None
    if options:
        key = options_key(options)
        with _cache_lock:
            settings = _settings_cache.get(key)
            if settings is None:
                settings = build_settings(options, where="app.config")
                _settings_cache[key] = settings
    if settings is not None:
        # Checked here so that a typo fails at start-up; the error lists the known names.
        if defaults["default_queue"]:
            settings.queue(defaults["default_queue"])
        if defaults["default_relay"]:
            settings.relay(defaults["default_relay"])
    return _AppState(settings, sender, defaults["default_queue"], defaults["default_relay"])


class MailWorker:
    """The extension object; ``app.extensions["mailworker"]`` is the same object.

    Every method needs an app context (a request, a CLI command, ``app.app_context()``),
    except when the extension was created as ``MailWorker(app)`` for a single app.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.app = app
        # Per-app state lives here, not on the app, so app.extensions keeps one entry.
        self._states: weakref.WeakKeyDictionary[Flask, _AppState] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and check ``app``'s ``MAILWORKER_*`` config; register the extension."""
        self._states[app] = _read_config(app.config)
        app.extensions["mailworker"] = self

    # -- state ---------------------------------------------------------------------------

    def _state(self) -> _AppState:
        if has_app_context():
            # The proxy is not a weakref key; the app object behind it is.
            app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        elif self.app is not None:
            app = self.app
        else:
            raise RuntimeError("mailworker: no Flask app context; call this inside a request or "
                               "`with app.app_context():`")
        state = self._states.get(app)
        if state is None:
            raise RuntimeError(f"mailworker: app {app.name!r} was not set up with this "
                               "extension; call mw.init_app(app)")
        if state.settings is not None:
            ensure_runtime(state.settings)
        return state

    def _defaults(self, item: dict[str, Any], state: _AppState) -> dict[str, Any]:
        if state.queue and not item.get("queue"):
            item["queue"] = state.queue
        if state.relay and not item.get("relay"):
            item["relay"] = state.relay
        return item

    def _item(self, message: Any, state: _AppState, **kwargs: Any) -> dict[str, Any]:
        """A :func:`mailworker.api.prepare_many` item for any supported message object.

        Explicit keyword arguments win over the message's own values and attributes.
        """
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if isinstance(message, Message):
            item = {"message": message, **kwargs}
        elif is_django_style(message):
            item = {**django_style_item(message), **kwargs}
        elif hasattr(message, "recipients") and hasattr(message, "subject"):
            if "recipients" in kwargs:
                raise TypeError("recipients= applies to MIME messages; set the Flask-Mail "
                                "message's recipients, cc and bcc instead")
            item = {**_flask_mail_kwargs(message), **kwargs}
            if not item.get("sender"):
                item["sender"] = state.sender
        else:
            raise TypeError("send_message() takes an email.message.Message, a Django or "
                            "Flask-Mailman EmailMessage or a Flask-Mail Message, "
                            f"not {type(message).__name__}")
        return self._defaults({k: v for k, v in item.items() if v is not None}, state)

    # -- API -----------------------------------------------------------------------------

    def send(self, **kwargs: Any) -> str:
        """:func:`mailworker.send` with this app's default sender, queue and relay."""
        return self.send_many([kwargs])[0]

    def send_message(self, message: Any, **kwargs: Any) -> str:
        """Queue a ready-made message; keyword arguments as :func:`mailworker.send_message`."""
        state = self._state()
        return api.send_many([self._item(message, state, **kwargs)])[0]

    def send_many(self, messages: Iterable[Mapping[str, Any] | Any]) -> list[str]:
        """:func:`mailworker.send_many`: all valid or none queued. Items are ``send()``
        keyword mappings or any message object :meth:`send_message` accepts."""
        state = self._state()
        items = []
        for message in messages:
            if isinstance(message, Mapping):
                item = {k: v for k, v in message.items() if v is not None}
                if "message" not in item and not item.get("sender"):
                    item["sender"] = state.sender
                items.append(self._defaults(item, state))
            else:
                items.append(self._item(message, state))
        return api.send_many(items)

    def status(self, message_id: str) -> dict[str, Any] | None:
        """:func:`mailworker.status` against this app's store."""
        self._state()
        return api.status(message_id)


def _flask_mail_kwargs(msg: Any) -> dict[str, Any]:
    """``send()`` keyword arguments from a Flask-Mail-style ``Message``."""
    def addresses(name: str) -> list[str | None]:
        value = getattr(msg, name, None) or []
        return [_sender_text(a) for a in ([value] if isinstance(value, str) else value)]

    attachments = getattr(msg, "attachments", None) or []
    kwargs: dict[str, Any] = {
        "to": addresses("recipients"),
        "cc": addresses("cc"),
        "bcc": addresses("bcc"),
        "reply_to": addresses("reply_to") or None,
        "subject": getattr(msg, "subject", None) or "",
        "text": getattr(msg, "body", None),
        "html": getattr(msg, "html", None),
        "sender": _sender_text(getattr(msg, "sender", None)),
        "headers": dict(getattr(msg, "extra_headers", None) or {}) or None,
        "attachments": [_attachment(a, i) for i, a in enumerate(attachments)],
    }
    return kwargs | routing_kwargs(msg)


def _attachment(att: Any, index: int) -> Attachment:
    """A Flask-Mail ``Attachment`` (filename, data, content_type, disposition, headers)."""
    headers = dict(getattr(att, "headers", None) or {})
    content_id = None
    for name, value in headers.items():
        if name.lower() != "content-id":
            raise InvalidMessageError(f"attachments[{index}].headers[{name}]",
                                      "only Content-ID is supported on attachments")
        content_id = str(value)
    disposition = (getattr(att, "disposition", None) or "attachment").lower()
    return Attachment(
        filename=getattr(att, "filename", None) or f"attachment-{index}",
        content=getattr(att, "data", b""),
        mimetype=getattr(att, "content_type", None),
        inline=disposition == "inline",
        content_id=content_id,
    )
