"""Django integration: an email backend, final-state signals and a worker command.

.. code-block:: python

    EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"
    INSTALLED_APPS = [..., "mailworker.contrib.django"]   # for signals and manage.py mailworker
    MAILWORKER = {"REDIS_URL": "redis://localhost:6379/0",
                  "RELAYS": {"default": "smtp+starttls://smtp.example.com:587"}}

See ``docs/django.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EmailBackend", "configure_runtime"]

if TYPE_CHECKING:
    from mailworker.contrib.django.backend import EmailBackend, configure_runtime


def __getattr__(name: str) -> Any:
    # Lazy, so that listing the app in INSTALLED_APPS does not import the mail machinery
    # before Django's settings are ready.
    if name in __all__:
        from mailworker.contrib.django import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'mailworker.contrib.django' has no attribute {name!r}")
