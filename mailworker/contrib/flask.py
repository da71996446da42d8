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
  neither library is a dependency. Flask-Mail's argument names and ``MAIL_*`` keys are
  read too (:mod:`mailworker.contrib.flask_mail_compat`).
* ``init_app`` registers ``flask mailworker ...``: the ``mailworker`` command with the
  runtime configured from ``app.config``, so a worker needs no second copy of the
  config in ``MAILWORKER_*`` variables.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import TYPE_CHECKING, Any

import click
from flask import Flask, current_app, has_app_context
from flask.cli import with_appcontext

from mailworker import api
from mailworker.contrib import (
    build_settings,
    django_style_item,
    ensure_runtime,
    is_django_style,
    options_key,
)
from mailworker.contrib.flask_mail_compat import mail_relay, message_kwargs, send_kwargs, sender

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
    return str(sender(value))


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
    if options or config.get("MAIL_SERVER"):
        key = options_key({**options, "flask-mail": _mail_key(config)})
        with _cache_lock:
            settings = _settings_cache.get(key)
            if settings is None:
                settings = _with_mail_relay(build_settings(options, where="app.config"),
                                            config, defaults["default_relay"])
                _settings_cache[key] = settings
    if settings is not None:
        # Checked here so that a typo fails at start-up; the error lists the known names.
        if defaults["default_queue"]:
            settings.queue(defaults["default_queue"])
        if defaults["default_relay"]:
            settings.target(defaults["default_relay"])  # a relay or a relay group
    return _AppState(settings, sender, defaults["default_queue"], defaults["default_relay"])


_MAIL_KEYS = ("MAIL_SERVER", "MAIL_PORT", "MAIL_USE_TLS", "MAIL_USE_SSL", "MAIL_USERNAME",
              "MAIL_PASSWORD")


def _mail_key(config: Mapping[str, Any]) -> str:
    # Part of the settings cache key; hashed so that the password is not kept as text.
    import hashlib

    values = repr([config.get(k) for k in _MAIL_KEYS]).encode()
    return hashlib.sha256(values).hexdigest()


def _with_mail_relay(settings: Settings, config: Mapping[str, Any],
                     default_relay: str | None) -> Settings:
    """Flask-Mail's ``MAIL_*`` keys as the default relay, when no other config names it."""
    from mailworker.config import check_settings

    name = default_relay or settings.default_relay
    if name in settings.relays or name in settings.groups:
        return settings  # MAILWORKER_RELAY_*, MAILWORKER_RELAYS, the environment or file win
    relay = mail_relay(config, name, os.environ)
    if relay is None:
        return settings
    return check_settings(settings.with_(relays={**settings.relays, name: relay}))


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
        """Read and check ``app``'s ``MAILWORKER_*`` config; register the extension and
        the ``flask mailworker`` command."""
        state = _read_config(app.config)
        self._states[app] = state
        app.extensions["mailworker"] = self
        # Flask-Mail's Message() reads its default sender from app.extensions["mail"]
        # when none is given; apps that dropped Mail(app) keep working.
        app.extensions.setdefault("mail", _FlaskMailDefaults(state.sender))
        app.cli.add_command(mailworker_command)

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
            item = {**message_kwargs(message), **kwargs}
            if not item.get("sender"):
                item["sender"] = state.sender
        else:
            raise TypeError("send_message() takes an email.message.Message, a Django or "
                            "Flask-Mailman EmailMessage or a Flask-Mail Message, "
                            f"not {type(message).__name__}")
        return self._defaults({k: v for k, v in item.items() if v is not None}, state)

    # -- API -----------------------------------------------------------------------------

    def send(self, message: Any = None, /, **kwargs: Any) -> str:
        """:func:`mailworker.send` with this app's default sender, queue and relay.

        Flask-Mail's names work too (``recipients=``, ``body=``, ``extra_headers=``,
        ``(name, address)`` tuples, its ``Attachment`` objects), and ``mw.send(msg)``
        with a message object is :meth:`send_message`.
        """
        if message is not None:
            return self.send_message(message, **kwargs)
        return self.send_many([kwargs])[0]

    def send_message(self, message: Any = None, **kwargs: Any) -> str:
        """Queue a ready-made message; keyword arguments as :func:`mailworker.send_message`.

        Flask-Mail's own idiom, ``send_message(subject=..., recipients=..., body=...)``
        (its ``Message`` arguments, the subject possibly first and positional), is
        :meth:`send` with those arguments, so a drop-in swap of ``mail`` keeps working.
        """
        if message is None or isinstance(message, str):
            if message is not None:
                if "subject" in kwargs:
                    raise TypeError("send_message() got the subject twice (positional and "
                                    "subject=); pass one")
                kwargs["subject"] = message
            return self.send_many([kwargs])[0]
        state = self._state()
        return api.send_many([self._item(message, state, **kwargs)])[0]

    def send_many(self, messages: Iterable[Mapping[str, Any] | Any]) -> list[str]:
        """:func:`mailworker.send_many`: all valid or none queued. Items are ``send()``
        keyword mappings or any message object :meth:`send_message` accepts."""
        state = self._state()
        items = []
        for message in messages:
            if isinstance(message, Mapping):
                # {"message": EmailMessage, "recipients": [...]} is send_message()'s form,
                # whose recipients= is the envelope; anything else is send()'s keywords.
                args = message if "message" in message else send_kwargs(message)
                item = {k: v for k, v in args.items() if v is not None}
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


class _FlaskMailDefaults:
    """Stands in for Flask-Mail's state in ``app.extensions["mail"]`` (its default sender)."""

    def __init__(self, default_sender: str | None) -> None:
        self.default_sender = default_sender


@click.command("mailworker", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@with_appcontext
def mailworker_command(argv: tuple[str, ...]) -> None:
    """Run a mailworker command (worker, status, dlq, stats...) with this app's config.

    ``flask mailworker worker`` is ``mailworker worker`` with the runtime configured from
    ``app.config``, so Redis, relays and queues are written once, in the app.
    """
    from mailworker.cli.main import main

    ext = current_app.extensions.get("mailworker")
    if isinstance(ext, MailWorker):
        ext._state()  # configures the process runtime from this app's config
    code = main(list(argv) or ["--help"])
    if code:
        sys.exit(code)
