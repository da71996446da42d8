"""``mailworker dlq show`` of a record set aside as unreadable shows what is stored: the
document (cleaned for the terminal), the message size and headers, and ``--raw FILE``
writes the bytes out (review finding F20). A real CLI subprocess on a real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from mailworker.record import RecipientState, Record
from mailworker.store import Store
from tests.conftest import ROOT

RAW = b"From: shop@example.com\r\nTo: bob@example.com\r\nSubject: important\r\n\r\nthe body\r\n"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailworker.cli.main", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def quarantined(env: dict[str, str]) -> str:
    """A record whose document a worker could not read, set aside as the worker does."""
    store = Store(redis.Redis.from_url(env["MAILWORKER_REDIS_URL"]),
                  prefix=env["MAILWORKER_KEY_PREFIX"])
    now = time.time()
    rec = Record(id=uuid.uuid4().hex, queue="transactional", relay="default",
                 sender="shop@example.com", recipients=[RecipientState("bob@example.com")],
                 created_at=now, expires_at=now + 3600, size=len(RAW))
    store.enqueue_many([(rec, RAW)], watchdog=now + 60)
    # Cut short (not JSON any more), with a terminal escape in it.
    store.redis.hset(store.keys.record(rec.id), "doc", rec.to_json()[:-1] + "\x1b[31m")
    token = uuid.uuid4().hex
    claimed = store.claim_many([rec.id], token, 30, now + 60)
    assert rec.id in claimed
    assert store.quarantine_many([(rec.id, token, "unreadable record: not JSON")]) == [True]
    return rec.id


def test_review_f20_dlq_show_of_a_quarantined_record_shows_what_is_stored(
        mw_env: dict[str, str], tmp_path: Path) -> None:
    mid = quarantined(mw_env)
    shown = cli(mw_env, "dlq", "show", mid)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "unreadable record" in out and "stored document" in out
    assert "bob@example.com" in out and "shop@example.com" in out  # whom it was for
    assert "\x1b" not in out  # cleaned for the terminal
    assert f"{len(RAW)} bytes stored" in out and "Subject: important" in out
    assert "the body" not in out  # headers only

    as_json = json.loads(cli(mw_env, "dlq", "show", "--json", mid).stdout)
    assert as_json["raw_size"] == len(RAW)
    assert as_json["stored_document"].startswith(f'{{"id": "{mid}"') or \
        as_json["stored_document"].startswith(f'{{"id":"{mid}"')

    target = tmp_path / "message.eml"
    assert cli(mw_env, "dlq", "show", mid, "--raw", str(target)).returncode == 0
    assert target.read_bytes() == RAW
    again = cli(mw_env, "dlq", "show", mid, "--raw", str(target))  # never overwrites
    assert again.returncode == 2 and "exists" in again.stderr
    assert "Traceback" not in again.stderr
