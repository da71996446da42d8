"""The exception hierarchy apps catch, and short error texts."""

from __future__ import annotations

import pickle

import pytest

import mailworker
from mailworker.errors import MailworkerError, QueueFull, QueueUnavailable, shown


def test_exported_from_the_package() -> None:
    assert mailworker.MailworkerError is MailworkerError
    assert mailworker.QueueUnavailable is QueueUnavailable
    assert mailworker.QueueFull is QueueFull
    for name in ("MailworkerError", "QueueUnavailable", "QueueFull"):
        assert name in mailworker.__all__


def test_hierarchy_keeps_the_standard_bases() -> None:
    assert issubclass(QueueUnavailable, OSError) and issubclass(QueueUnavailable, MailworkerError)
    assert issubclass(QueueFull, QueueUnavailable)
    for cls in (mailworker.InvalidMessageError, mailworker.ConfigError):
        assert issubclass(cls, MailworkerError) and issubclass(cls, ValueError)


def test_except_oserror_catches_a_queue_failure() -> None:
    """Code written for Django's SMTP backend (``except (SMTPException, OSError)``)."""
    with pytest.raises(OSError, match="nothing was queued"):
        raise QueueFull("Redis is out of memory; nothing was queued")


@pytest.mark.parametrize("exc", [QueueUnavailable("down"), QueueFull("full"),
                                 mailworker.InvalidMessageError("to", "bad"),
                                 mailworker.ConfigError("bad setting")])
def test_errors_pickle(exc: Exception) -> None:
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc) and str(again) == str(exc)


def test_shown_cuts_big_values_before_repr() -> None:
    assert shown("abc") == "'abc'"
    big = shown(b"%PDF" + bytes(29_000))
    assert len(big) < 100 and "29,004 bytes" in big
    assert len(shown(list(range(10_000)))) == 80


def test_invalid_message_error_reason_is_capped() -> None:
    err = mailworker.InvalidMessageError("x", "y" * 10_000)
    assert len(str(err)) <= 510 and str(err).endswith("(truncated)")
