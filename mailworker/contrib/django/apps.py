"""The Django app: ``INSTALLED_APPS += ["mailworker.contrib.django"]``.

Installing it is optional for sending (``EMAIL_BACKEND`` alone works) and needed for:
the ``manage.py mailworker`` command, the system check of ``settings.MAILWORKER``
(``manage.py check``), re-reading ``settings.MAILWORKER`` when tests change it with
``override_settings``, and the Django signals of delivery (connected here, in
``ready()``, never as a side effect of importing the backend).
"""

from __future__ import annotations

from typing import Any

# Django ships no type information (django-stubs is not a dependency).
from django.apps import AppConfig  # type: ignore[import-untyped]


class MailworkerConfig(AppConfig):  # type: ignore[misc]  # Django's classes are untyped
    name = "mailworker.contrib.django"
    label = "mailworker"
    verbose_name = "mailworker"

    def ready(self) -> None:
        # Imported here, Django's idiom: ready() runs once the app registry is complete.
        from django.core import checks  # type: ignore[import-untyped]

        from mailworker.contrib.django.checks import check_mailworker_setting
        from mailworker.contrib.django.signals import connect_hooks

        connect_hooks()
        watch_settings()
        checks.register(check_mailworker_setting)


def _changed(*, setting: str, **_: Any) -> None:
    if setting == "MAILWORKER":
        # Lazy: importing the backend pulls in the mail machinery, needed only once used.
        from mailworker.contrib.django.backend import reset

        reset()


def watch_settings() -> None:
    """Re-read ``settings.MAILWORKER`` after ``override_settings`` changes it."""
    # Lazy: django.test imports the test client, a cost production app loading avoids.
    from django.test.signals import setting_changed  # type: ignore[import-untyped]

    setting_changed.connect(_changed, dispatch_uid="mailworker.settings")
