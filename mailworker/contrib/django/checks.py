"""System checks for ``settings.MAILWORKER``: ``manage.py check`` (and ``runserver``,
``migrate``, ``test``) report a bad setting at start-up instead of at the first email.

Each problem is its own ``Error`` with an id to silence or search for:

===================  ==================================================================
``mailworker.E001``  ``MAILWORKER`` is not a dict
``mailworker.E002``  unknown key(s) (a typo such as ``REDIS_URI``)
``mailworker.E003``  a relay in ``RELAYS`` is malformed (scheme, host, port, options, or
                     a ``password_env`` variable that is not set)
``mailworker.E004``  ``DEFAULT_QUEUE`` names no configured queue
``mailworker.E005``  ``DEFAULT_RELAY`` names no configured relay
``mailworker.E006``  any other bad value (a duration, the ``CONFIG`` file, a cross-check)
``mailworker.E007``  ``DATABASE`` names no database in ``DATABASES``
``mailworker.E008``  ``ENQUEUE_ON_COMMIT`` is not ``True`` or ``False``
===================  ==================================================================

The checks build the settings exactly as the backend will (same code, same environment),
but cache nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from django.conf import settings  # type: ignore[import-untyped]
from django.core import checks  # type: ignore[import-untyped]

__all__ = ["check_mailworker_setting"]

_DOCS = "see docs/django.md, 'Settings: MAILWORKER', and config/README.md"
_BACKEND_KEYS = ("ENQUEUE_ON_COMMIT", "DATABASE")
_DEFAULTS = ("DEFAULT_QUEUE", "DEFAULT_RELAY")


def _error(number: int, msg: str, hint: str) -> Any:
    return checks.Error(f"settings.MAILWORKER: {msg}", hint=hint, id=f"mailworker.E{number:03d}")


def check_mailworker_setting(app_configs: Any = None, **_: Any) -> list[Any]:
    """Django system check: every problem with ``settings.MAILWORKER`` (empty: none)."""
    from mailworker.config import ConfigError, relay_from_spec
    from mailworker.contrib import build_settings, option_names
    from mailworker.relay import InvalidRelayError

    conf = getattr(settings, "MAILWORKER", None)
    if conf is None:
        return []
    if not isinstance(conf, Mapping):
        return [_error(1, f"must be a dict, not {type(conf).__name__}",
                       "e.g. MAILWORKER = {'REDIS_URL': 'redis://localhost:6379/0', "
                       "'RELAYS': {'default': 'smtp://localhost:25'}}")]
    errors = [*_backend_key_errors(conf)]
    options = {str(k).lower(): v for k, v in conf.items() if k not in _BACKEND_KEYS}
    if not options:
        return errors  # the runtime is left to the MAILWORKER_* environment, as in the backend
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        known = sorted({n.upper() for n in option_names()} | set(_BACKEND_KEYS))
        errors.append(_error(2, f"unknown key(s) {', '.join(k.upper() for k in unknown)}",
                             f"keys are upper case; known: {', '.join(known)}"))
    relays = options.get("relays") or {}
    good_relays = {}
    if not isinstance(relays, Mapping):
        errors.append(_error(3, "RELAYS must be a dict of relay name to DSN",
                             "e.g. 'RELAYS': {'default': 'smtp+starttls://smtp.example.com:587'}"))
        relays = {}
    for name, spec in relays.items():
        if not isinstance(spec, (str, Mapping)):
            errors.append(_error(3, f"RELAYS[{name!r}] must be a DSN or a dict with 'dsn' and "
                                    f"relay options, not {type(spec).__name__}",
                                 "e.g. 'RELAYS': {'default': 'smtp+starttls://smtp.example.com"
                                 ":587'}; see config/README.md, 'Relays'"))
            continue
        try:
            relay_from_spec(str(name), spec, os.environ)
        except (InvalidRelayError, ConfigError, TypeError, ValueError) as exc:
            errors.append(_error(3, f"RELAYS[{name!r}]: {exc}",
                                 "a relay is a DSN such as smtp+starttls://user@smtp.example.com"
                                 ":587?password_env=SMTP_PASSWORD, or {'dsn': ..., option: "
                                 "value}; see config/README.md, 'Relays'"))
        else:
            good_relays[name] = spec
    if errors:
        return errors  # the build below would only repeat these
    base = {k: v for k, v in options.items() if k.upper() not in _DEFAULTS}
    base["relays"] = good_relays
    try:
        built = build_settings(base, where="settings.MAILWORKER")
    except ConfigError as exc:
        return [_error(6, str(exc).removeprefix("settings.MAILWORKER: "), _DOCS)]
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # A value of a shape no check foresaw: still an Error naming it, never a traceback.
        return [_error(6, f"a value has the wrong type or shape ({type(exc).__name__}: "
                          f"{exc})", _DOCS)]
    queue, relay = options.get("default_queue"), options.get("default_relay")
    if queue and str(queue) not in built.queues:
        errors.append(_error(4, f"DEFAULT_QUEUE {queue!r} is not a configured queue",
                             f"known queues: {', '.join(sorted(built.queues))}; add it with "
                             f"'QUEUES': {{{str(queue)!r}: {{'lifetime': '24h'}}}}"))
    if relay and str(relay) not in {*built.relays, *built.groups}:
        errors.append(_error(5, f"DEFAULT_RELAY {relay!r} is not a configured relay",
                             f"known relays: {', '.join(sorted(built.relays)) or 'none'}; add it "
                             f"with 'RELAYS': {{{str(relay)!r}: 'smtp://host:25'}}"))
    return errors


def _backend_key_errors(conf: Mapping[str, Any]) -> list[Any]:
    errors = []
    on_commit = conf.get("ENQUEUE_ON_COMMIT", True)
    if not isinstance(on_commit, bool):
        errors.append(_error(8, f"ENQUEUE_ON_COMMIT must be True or False, not {on_commit!r}",
                             "True (the default) queues mail when the transaction commits"))
    alias = conf.get("DATABASE")
    if alias is not None and alias not in getattr(settings, "DATABASES", {}):
        errors.append(_error(7, f"DATABASE {alias!r} is not in settings.DATABASES",
                             f"use one of: {', '.join(getattr(settings, 'DATABASES', {}))}"))
    return errors
