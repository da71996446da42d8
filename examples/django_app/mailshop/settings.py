"""Settings for the mailshop example; everything that differs per machine comes from env.

The mailworker part is ``EMAIL_BACKEND`` and ``MAILWORKER``; the rest is a minimal
Django project on SQLite in a temporary file.
"""

import os
import tempfile
from pathlib import Path

env = os.environ

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = env.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = env.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]

INSTALLED_APPS = [
    "mailworker.contrib.django",  # signals and `manage.py mailworker worker`
    "mailshop.orders",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "mailshop.urls"
WSGI_APPLICATION = "mailshop.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": env.get("MAILSHOP_DB") or str(Path(tempfile.gettempdir()) / "mailshop.sqlite3"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

# --- mail ---------------------------------------------------------------------------
EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"
DEFAULT_FROM_EMAIL = env.get("MAILSHOP_FROM", "Mail Shop <shop@example.com>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
ADMINS = [("Shop Ops", "ops@example.com")]

MAILWORKER = {
    "REDIS_URL": env.get("MAILWORKER_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "KEY_PREFIX": env.get("MAILWORKER_KEY_PREFIX", "mw"),
    # Relay names are what messages route by; the worker needs the same names.
    "RELAYS": {"default": env.get("MAILWORKER_RELAY_DEFAULT", "smtp://127.0.0.1:1025")},
    # Queues, retry policy and other settings from a TOML file, when one is given.
    "CONFIG": env.get("MAILWORKER_CONFIG"),
    # Queue only when the order's transaction commits (the default, shown for clarity).
    "ENQUEUE_ON_COMMIT": True,
}
