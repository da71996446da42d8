"""A recipient-domain rule splits one message into two transactions on two relays, with
a real worker and two SMTP test servers; `mailworker status` shows each recipient's
relay."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import mailworker
from mailworker.config import load_settings
from mailworker.runtime import configure, reset_runtime
from mailworker.store import MessageState
from mailworker.testing import SMTPTestServer
from tests.conftest import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.integration]


def test_recipient_domain_rule_splits_over_two_relays(
        mw_env: dict[str, str], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    with SMTPTestServer() as main_relay, SMTPTestServer() as org_relay:
        cfg = Path(mw_env["MAILWORKER_CONFIG"])
        cfg.write_text(cfg.read_text() + '[[routes]]\nrecipient_domain = "example.org"\n'
                       'relay = "orgs"\n')
        mw_env.update(MAILWORKER_RELAY_DEFAULT=main_relay.dsn(),
                      MAILWORKER_RELAY_ORGS=org_relay.dsn())
        rt = configure(load_settings(environ=mw_env))
        try:
            mid = mailworker.send(to=["a@example.com", "b@example.org"],
                                  cc=["c@example.org"], subject="hello", text="one message")
            start_worker()
            first = rt.store.get(mid)
            assert first is not None and len(first.parts) == 2

            def final() -> bool:
                recs = rt.store.get_many(first.parts)
                return all(r is not None and r.state is MessageState.DELIVERED for r in recs)

            wait_until(final, 30, message="both parts delivered")
            # One transaction per relay, each with only its own recipients, same bytes.
            assert [sorted(m.recipients) for m in main_relay.messages] == [["a@example.com"]]
            assert [sorted(m.recipients) for m in org_relay.messages] == [
                ["b@example.org", "c@example.org"]]
            assert main_relay.messages[0].data == org_relay.messages[0].data
            st = mailworker.status(mid)
            assert st is not None
            assert sorted((r["address"], r["relay"], r["state"])
                          for p in st["parts"] for r in p["recipients"]) == [
                ("a@example.com", "default", "delivered"),
                ("b@example.org", "orgs", "delivered"),
                ("c@example.org", "orgs", "delivered")]
            out = subprocess.run([sys.executable, "-m", "mailworker.cli.main", "status", mid],
                                 env=mw_env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=60, check=True).stdout
            lines = {line.split()[0]: line.split()[1:3] for line in out.splitlines()
                     if line.split() and "@" in line.split()[0]}
            assert lines["b@example.org"] == ["orgs", "delivered"]
            assert lines["c@example.org"] == ["orgs", "delivered"]
            assert "split by routing rules into 2 parts" in out
        finally:
            rt.pools.close_all()
            reset_runtime()
