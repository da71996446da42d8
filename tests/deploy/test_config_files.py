"""The example config files parse and say what their comments claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailworker.celery_app import celery_config
from mailworker.config import ConfigError, Settings, load_settings
from mailworker.policy import Action, Scope
from mailworker.policy_config import policy_of
from mailworker.smtp.errors import Failure, Stage

CONFIG = Path(__file__).resolve().parents[2] / "config"
PROD_ENV = {"MAILWORKER_SMTP_PASSWORD": "primary-secret",
            "MAILWORKER_BULK_SMTP_PASSWORD": "bulk-secret"}


def load(name: str, env: dict[str, str] | None = None) -> Settings:
    return load_settings(CONFIG / name, environ=env or {})


def test_development_config() -> None:
    s = load("development.toml")
    relay = s.relay()
    # The aiosmtpd sink named in the file's header: plain SMTP on 127.0.0.1:1025.
    assert (relay.host, relay.port, relay.security) == ("127.0.0.1", 1025, "starttls-optional")
    assert relay.username is None and relay.password is None
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.key_prefix == "mwdev"
    assert s.default_sender == "dev@localhost"
    assert s.retention == 86400 and s.stuck_after == 30
    assert policy_of(s).backoff.initial == 5 and policy_of(s).backoff.maximum == 60
    for q in ("transactional", "bulk"):
        assert s.queue(q).lifetime == 3600 and s.queue(q).max_attempts == 10


def test_production_config() -> None:
    s = load("production.toml", PROD_ENV)
    primary, bulk = s.relay(), s.relay("bulk")
    assert primary.name == "primary"
    assert primary.security == "starttls" and primary.port == 587
    assert primary.password == "primary-secret" and primary.username == "mailer"
    assert "primary-secret" not in repr(primary)
    assert primary.verify is True and primary.max_connections == 5
    assert bulk.security == "tls" and bulk.port == 465 and bulk.password == "bulk-secret"
    # Bulk mail may wait longer than transactional mail.
    assert s.queue("bulk").lifetime == 72 * 3600
    assert s.queue("transactional").lifetime == 24 * 3600
    assert s.default_queue == "transactional"
    assert s.max_message_size == 20_000_000 and s.retention == 14 * 86400


def test_production_time_limits_are_ordered() -> None:
    s = load("production.toml", PROD_ENV)
    conf = celery_config(s)
    # The comment: task time limit < lease < visibility timeout, effective limit 4 minutes.
    assert conf["task_time_limit"] == 240
    assert conf["task_time_limit"] < s.visibility_timeout
    assert conf["broker_transport_options"]["visibility_timeout"] == 3600
    assert conf["task_acks_late"] is True and conf["worker_prefetch_multiplier"] == 1


def test_production_greylisting_rule() -> None:
    policy = policy_of(load("production.toml", PROD_ENV))
    assert policy.rules[0].name == "greylisted", "user rules go ahead of the defaults"
    decision = policy.decide(Failure.reply(450, "4.7.1 greylisted", Stage.RCPT))
    assert (decision.rule, decision.action, decision.scope) == (
        "greylisted", Action.RETRY, Scope.RECIPIENT)
    assert decision.counts_as_attempt
    # Not greylisting: falls through to the default rules.
    assert policy.decide(Failure.reply(452, "4.2.2 full", Stage.RCPT)).rule == "rcpt-4xx"


def test_production_needs_its_passwords() -> None:
    # The comment: a missing password stops the worker at start, naming the variable.
    with pytest.raises(ConfigError, match="MAILWORKER_SMTP_PASSWORD"):
        load("production.toml", {"MAILWORKER_BULK_SMTP_PASSWORD": "x"})


def test_environment_overrides_the_file() -> None:
    env = {**PROD_ENV, "MAILWORKER_REDIS_URL": "redis://:pw@redis.internal:6379/2"}
    assert load("production.toml", env).redis_url == "redis://:pw@redis.internal:6379/2"
