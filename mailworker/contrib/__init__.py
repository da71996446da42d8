"""Framework integrations (``mailworker.contrib.django``, ``mailworker.contrib.flask``).

What both share lives here: turning a framework's settings mapping into
:class:`~mailworker.config.Settings`, configuring the process runtime from it once, and
reading Django-style message objects (Django's ``EmailMessage``, Flask-Mailman's).

Precedence, lowest first: built-in defaults, the TOML file (``CONFIG``), ``MAILWORKER_*``
environment variables, then the framework's settings. The framework wins because it is
where the app author wrote the value for *this* app; the environment still fills in
whatever the app leaves out, so workers and web processes can share one set of variables.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailworker.config import Settings

# mailworker modules are imported inside the functions below: Django imports this package
# while loading INSTALLED_APPS, and mailworker.config alone pulls in the SMTP layer.

__all__ = [
    "ROUTING_ATTRIBUTES",
    "build_settings",
    "django_style_item",
    "ensure_runtime",
    "is_django_style",
    "option_names",
    "options_key",
    "routing_kwargs",
]

#: Keys a settings mapping may hold besides the scalar ``Settings`` fields.
_STRUCTURED = ("config", "relays", "queues")
_NOT_SCALAR = {"relays", "queues", "retry"}
#: Scalars applied after relays and queues are merged, so they may name new ones.
_LATE = ("default_queue", "default_relay")


def _scalar_names() -> tuple[str, ...]:
    from mailworker.config import Settings

    return tuple(f.name for f in fields(Settings) if f.name not in _NOT_SCALAR)


def option_names() -> tuple[str, ...]:
    """Every option a framework settings mapping may hold (lower case), for error hints."""
    return (*_STRUCTURED, *_scalar_names())


def build_settings(
    options: Mapping[str, Any], *, where: str, environ: Mapping[str, str] | None = None
) -> Settings:
    """:class:`Settings` from lower-case option names (``redis_url``, ``relays``, ...).

    ``relays`` maps a relay name to a DSN, or to a mapping with ``dsn`` and relay options;
    ``queues`` maps a queue name to ``{"lifetime": "24h", "max_attempts": 20}``; ``config``
    names a TOML file. Values are checked as strictly as the environment's; a bad one
    raises :class:`~mailworker.config.ConfigError` prefixed with *where* (the setting's
    name in the framework), so the message points at the line to fix.
    """
    from mailworker.config import (
        ConfigError,
        check_settings,
        load_settings,
        queue_from_spec,
        relay_from_spec,
    )
    from mailworker.relay import InvalidRelayError

    scalars = _scalar_names()
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        known = ", ".join(n.upper() for n in option_names())
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(k.upper() for k in unknown)}; "
                          f"known: {known}")
    for name, example in (("relays", "{'default': 'smtp+starttls://smtp.example.com:587'}"),
                          ("queues", "{'transactional': {'lifetime': '24h'}}")):
        value = options.get(name)
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {name.upper()} must be a dict of {name[:-1]} name to "
                              f"its {'DSN' if name == 'relays' else 'options'}, not "
                              f"{type(value).__name__}; e.g. {example}")
    for name, spec in (options.get("relays") or {}).items():
        if not isinstance(spec, (str, Mapping)):
            raise ConfigError(f"{where}: RELAYS[{name!r}] must be a DSN such as "
                              "'smtp+starttls://smtp.example.com:587' or a dict with 'dsn' and "
                              f"relay options, not {type(spec).__name__}")
    for name, spec in (options.get("queues") or {}).items():
        if spec is not None and not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: QUEUES[{name!r}] must be a dict of queue options "
                              "such as {'lifetime': '24h', 'max_attempts': 20}, not "
                              f"{type(spec).__name__}")
    env = dict(os.environ if environ is None else environ)
    # Scalars go through the environment path of load_settings, so they are coerced and
    # checked by exactly the code that checks MAILWORKER_* variables.
    for name in scalars:
        value = options.get(name)
        if value is not None and name not in _LATE:
            env[f"MAILWORKER_{name.upper()}"] = str(value)
    try:
        settings = load_settings(options.get("config") or None, env)
        relays = dict(settings.relays)
        for name, spec in (options.get("relays") or {}).items():
            relays[name] = relay_from_spec(name, spec, env)
        queues = dict(settings.queues)
        for name, spec in (options.get("queues") or {}).items():
            queues[name] = queue_from_spec(name, spec or {})
        late = {k: str(options[k]) for k in _LATE if options.get(k) is not None}
        settings = check_settings(settings.with_(relays=relays, queues=queues, **late))
    except (ConfigError, InvalidRelayError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return settings


def options_key(options: Mapping[str, Any]) -> str:
    """A stable key for a settings mapping, so equal configurations share one Settings."""
    return json.dumps(options, sort_keys=True, default=repr)


_lock = threading.Lock()


def ensure_runtime(settings: Settings) -> None:
    """Make *settings* the process runtime's, configuring it only when they changed.

    The runtime is process-wide (one Redis client, one set of SMTP pools), so this is
    cheap when called on every send: an identity check, and a rebuild only when another
    configuration (another Flask app, ``override_settings``) was used in between.
    """
    from mailworker.runtime import configure, current

    with _lock:
        rt = current()
        if rt is None or rt.settings is not settings:
            configure(settings)


#: ``mailworker_<name>`` attributes on a message object that route it (see the docs).
ROUTING_ATTRIBUTES = ("relay", "queue", "idempotency_key", "send_at", "expires_at", "metadata")


def is_django_style(obj: object) -> bool:
    """True for Django's ``EmailMessage`` and look-alikes (Flask-Mailman)."""
    return callable(getattr(obj, "message", None)) and callable(getattr(obj, "recipients", None))


def django_style_item(msg: Any) -> dict[str, Any]:
    """A :func:`mailworker.api.prepare_many` item for a Django-style message.

    The envelope is the message's own (``from_email``, ``recipients()``: To + Cc + Bcc),
    as Django's SMTP backend uses; ``mailworker_relay`` etc. attributes route it.
    """
    item: dict[str, Any] = {
        "message": msg.message(),
        "sender": msg.from_email or None,
        "recipients": list(msg.recipients()),
    }
    return item | routing_kwargs(msg)


def routing_kwargs(msg: Any) -> dict[str, Any]:
    """``relay=``, ``queue=`` ... from a message's ``mailworker_<name>`` attributes."""
    return {name: value for name in ROUTING_ATTRIBUTES
            if (value := getattr(msg, f"mailworker_{name}", None)) is not None}
