"""``python manage.py mailworker worker|status|dlq|stats ...``: the mailworker CLI inside Django.

The same commands as ``mailworker ...``, with ``settings.MAILWORKER`` applied and Django
set up, so a worker started this way sends the Django signals of
:mod:`mailworker.contrib.django.signals` and their receivers may use the ORM.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from celery import signals

# Django ships no type information (django-stubs is not a dependency).
from django.core.management.base import BaseCommand  # type: ignore[import-untyped]
from django.db import close_old_connections  # type: ignore[import-untyped]

from mailworker.cli.main import main
from mailworker.contrib.django.backend import configure_runtime

__all__ = ["Command"]


class Command(BaseCommand):  # type: ignore[misc]  # Django's classes are untyped
    help = "Run a mailworker command (worker, status, dlq, stats, check...) with Django's settings."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("argv", nargs=argparse.REMAINDER,
                            help="mailworker arguments, e.g. worker -Q transactional")

    def handle(self, *args: Any, **options: Any) -> None:
        configure_runtime()  # signals are connected by the app's ready(), already run
        _close_db_connections_around_tasks()
        code = main(options["argv"] or ["--help"])
        if code:
            sys.exit(code)


def _close_db_connections_around_tasks() -> None:
    # Signal receivers run in long-lived worker threads that never see a request, so
    # Django never recycles their database connections: do it per task, as Celery's own
    # Django support does, so a database restart or CONN_MAX_AGE is honoured.
    def close(**_: Any) -> None:
        close_old_connections()

    signals.task_prerun.connect(close, weak=False, dispatch_uid="mailworker.django.prerun")
    signals.task_postrun.connect(close, weak=False, dispatch_uid="mailworker.django.postrun")
