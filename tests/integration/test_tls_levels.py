"""Issue 9, opportunistic TLS end to end, with a real `mailworker worker` and real Redis.

One STARTTLS test server whose certificate comes from a CA nobody trusts (the worker is
not given the test CA), two relays pointing at it:

* ``smtp://`` (``tls=may``): before, the worker paused this relay on the certificate and
  delivered nothing. Now its mail goes, encrypted (the server records ``tls`` per message).
* ``smtp+starttls://`` with credentials (``tls=verify``): nothing is delivered, AUTH is
  never sent, the relay is paused and its mail stays queued.
* ``smtp://`` with credentials: the same, since AUTH needs a verified certificate unless
  ``allow_unverified_auth=true`` (an active attacker could take the password).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

import mailworker
from mailworker.config import load_settings
from mailworker.runtime import configure
from mailworker.testing import SMTPTestServer, wait_until
from tests.conftest import WorkerProcess
from tests.integration.conftest import Env

pytestmark = pytest.mark.integration


def paused_relays(worker: WorkerProcess) -> set[str]:
    return {json.loads(line).get("relay") for line in worker.log.read_text().splitlines()
            if '"relay.paused"' in line}


def test_smtp_is_opportunistic_and_smtp_starttls_verifies(
        mw: Env, start_worker: Callable[..., WorkerProcess]) -> None:
    with SMTPTestServer(tls="starttls", auth={"alice": "secret"}) as server:
        address = f"{server.host}:{server.port}"
        env = dict(mw.env,
                   MAILWORKER_RELAY_OPPORTUNISTIC=f"smtp://{address}?timeout=5",
                   MAILWORKER_RELAY_STRICT=f"smtp+starttls://alice:secret@{address}?timeout=5",
                   MAILWORKER_RELAY_MAYAUTH=f"smtp://alice:secret@{address}?timeout=5")
        configure(load_settings(environ=env))  # the producer must know the relays too
        worker = start_worker("-c", "2", env=env)

        strict = [mailworker.send(to=f"s{i}@example.com", subject=f"s{i}", text="x",
                                  relay=relay) for i in range(2) for relay in ("strict", "mayauth")]
        sent = [mailworker.send(to=f"o{i}@example.com", subject=f"o{i}", text="x",
                                relay="opportunistic") for i in range(5)]

        assert {r.state.value for r in mw.final(sent)} == {"delivered"}
        got = server.wait_for_messages(5)
        assert all(m.tls for m in got)  # encrypted, though the certificate is not trusted
        assert sorted(r for m in got for r in m.recipients) == [
            f"o{i}@example.com" for i in range(5)]

        wait_until(lambda: {"strict", "mayauth"} <= paused_relays(worker), 20,
                   message="both relays with credentials to be paused (worker log)")
        assert "UnverifiedAuthRefused" in worker.log.read_text()  # mayauth's reason
        for rec in mw.store.get_many(strict):
            assert rec is not None and not rec.state.final  # kept queued, not dead
        verbs = {line.split(" ", 1)[0].upper() for _, line in server.commands}
        assert "AUTH" not in verbs and "STARTTLS" in verbs
        assert len(server.messages) == 5  # nothing from the relays with credentials
