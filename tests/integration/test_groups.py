"""A failover relay group with a real worker and two SMTP test servers: the first member
goes down, mail flows to the second; it comes back, mail flows to it again; nothing is
lost or sent twice. (Round robin and the choice itself: tests/unit/test_groups.py.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import mailworker
from mailworker.config import load_settings
from mailworker.runtime import configure, reset_runtime
from mailworker.store import MessageState
from mailworker.testing import SMTPTestServer
from tests.conftest import WorkerProcess, wait_until

pytestmark = [pytest.mark.integration]


def test_failover_group_first_member_down_then_up(
        mw_env: dict[str, str], start_worker: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    with SMTPTestServer() as first, SMTPTestServer() as second:
        cfg = Path(mw_env["MAILWORKER_CONFIG"])
        cfg.write_text(cfg.read_text() + '[relays.main]\ngroup = "failover"\n'
                       'members = ["first", "second"]\n')
        mw_env.update(MAILWORKER_RELAY_FIRST=first.dsn(), MAILWORKER_RELAY_SECOND=second.dsn(),
                      MAILWORKER_DEFAULT_RELAY="main")
        rt = configure(load_settings(environ=mw_env))
        try:
            start_worker()

            def delivered(ids: list[str]) -> Callable[[], bool]:
                def check() -> bool:
                    recs = rt.store.get_many(ids)
                    return all(r is not None and r.state is MessageState.DELIVERED
                               for r in recs)
                return check

            def batch(tag: str, n: int = 5) -> list[str]:
                return [mailworker.send(to=f"{tag}{i}@example.com", subject=tag, text="hi")
                        for i in range(n)]

            before = batch("before")
            wait_until(delivered(before), 30, message="mail delivered by the first member")
            assert len(first.messages) == 5 and len(second.messages) == 0

            first.down("421")
            during = batch("during", 10)
            wait_until(delivered(during), 30, message="mail moved to the second member")
            assert len(second.messages) == 10
            rec = rt.store.get(during[0])
            assert rec is not None and rec.relay == "main" and rec.history[-1].relay == "second"

            first.up()
            after: list[str] = []

            def back_on_first() -> bool:
                # The first member is probed once per probe interval (1 s here); until a
                # probe works, new mail still goes to the second.
                after.extend(batch("after", 1))
                return bool(first.messages[5:])

            wait_until(back_on_first, 30, interval=0.5, message="mail back on the first member")
            wait_until(delivered(after), 30, message="the last messages delivered")
            rec = rt.store.get(after[-1])
            assert rec is not None and rec.history[-1].relay == "first"

            total: Counter[tuple[str | None, str]] = Counter()
            for server in (first, second):
                total.update(server.deliveries())
            assert sum(total.values()) == len(before) + len(during) + len(after)
            assert max(total.values()) == 1  # nothing lost, nothing sent twice
        finally:
            rt.pools.close_all()
            reset_runtime()
