"""pytest plugin (registered by the ``pytest11`` entry point): the ``mailworker_outbox``
fixture for an application's own tests.

Any project that installs mailworker gets the fixture; the plugin imports nothing beyond
pytest until a test asks for it, so it costs other test suites nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mailworker.testing.outbox import Outbox

__all__ = ["mailworker_outbox"]


@pytest.fixture
def mailworker_outbox() -> Iterator[Outbox]:
    """Mail sent during the test is delivered in-process into this outbox (no Redis, no
    worker): ``assert mailworker_outbox[0].subject == "Welcome"``. See docs/testing.md."""
    from mailworker.testing.outbox import record_messages

    with record_messages() as outbox:
        yield outbox
