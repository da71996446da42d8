"""The user docs for installing and the framework integrations say what works.

Install lines name the extras that pyproject.toml defines; the Django settings example
imports with no environment variable set; every relative link and anchor in these pages
leads somewhere.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT

PAGES = ["README.md", "docs/django.md", "docs/flask.md", "docs/migrating.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = (ROOT / path).read_text()
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page: str) -> None:
    base = (ROOT / page).parent
    for target in LINK.findall((ROOT / page).read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else ROOT / page
        assert file.exists(), f"{page}: link to missing {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(str(file.relative_to(ROOT))), f"{page}: no #{anchor}"


def test_install_lines_name_real_extras() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    for page, needed in (("README.md", {"django", "flask", "demo"}), ("docs/django.md", {"django"}),
                         ("docs/flask.md", {"flask"})):
        named = set(re.findall(r'pip install "mailworker\[([a-z,]+)\]"', (ROOT / page).read_text()))
        named = {e for group in named for e in group.split(",")}
        assert needed <= named, (page, named)
        assert named <= extras, (page, named - extras)


def test_django_settings_example_imports_without_environment() -> None:
    text = (ROOT / "docs/django.md").read_text()
    snippet = text.split("# settings.py\n", 1)[1].split("```", 1)[0]
    snippet = snippet.replace("    ...,\n", "")
    env = {"PATH": "/usr/bin:/bin"}  # no MAILWORKER_* variable at all
    p = subprocess.run([sys.executable, "-c", snippet + "\nprint(sorted(MAILWORKER))"],
                       env=env, capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "['REDIS_URL', 'RELAYS']"


def test_migration_tables_cover_the_old_settings() -> None:
    text = (ROOT / "docs/migrating.md").read_text()
    celery_email = text.split("## From django-celery-email", 1)[1].split("## From Flask-Mail")[0]
    flask_mail = text.split("## From Flask-Mail", 1)[1]
    for name in ("djcelery_email.backends.CeleryEmailBackend", "CELERY_EMAIL_BACKEND",
                 "CELERY_EMAIL_TASK_CONFIG", "CELERY_EMAIL_CHUNK_SIZE", "EMAIL_HOST",
                 "EMAIL_USE_TLS", "EMAIL_USE_SSL"):
        assert name in celery_email, name
    for name in ("MAIL_SERVER", "MAIL_PORT", "MAIL_USE_TLS", "MAIL_USE_SSL", "MAIL_USERNAME",
                 "MAIL_PASSWORD", "MAIL_DEFAULT_SENDER", "mail.send(msg)", "record_messages"):
        assert name in flask_mail, name
    # Each section is a table of old -> new.
    assert celery_email.count("\n| `") >= 10 and flask_mail.count("\n| `") >= 10
