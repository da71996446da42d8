"""Settings are finite and in range however they are built, and never print secrets."""

from __future__ import annotations

import dataclasses
import math

import pytest

from mailworker.config import ConfigError, Settings, load_settings, redact_url
from mailworker.contrib import build_settings
from mailworker.policy_config import policy_of

DURATIONS = [f.name for f in dataclasses.fields(Settings) if f.type == "float"]
BAD_DURATIONS = ["nan", "inf", "-inf", "1e300", "-5", "0"]


def test_every_float_setting_is_covered() -> None:
    assert {"retention", "lease_seconds", "stuck_after", "tick_interval", "task_time_limit",
            "visibility_timeout", "redis_connect_timeout", "redis_socket_timeout"} <= set(DURATIONS)


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_s2_03_config_durations_finite_and_in_range(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"setting {name}="):
        load_settings(environ={f"MAILWORKER_{name.upper()}": value})
    with pytest.raises(ConfigError, match=f"setting {name}="):
        Settings(**{name: float(value)})


@pytest.mark.parametrize("name", DURATIONS)
def test_s2_03_config_durations_in_a_file(name: str, tmp_path: object) -> None:
    from pathlib import Path

    cfg = Path(str(tmp_path)) / "c.toml"
    cfg.write_text(f"{name} = inf\n")
    with pytest.raises(ConfigError, match=name):
        load_settings(cfg, environ={})


@pytest.mark.parametrize(("table", "where"), [
    ('[retry]\nlifetime = "99999999d"\n', "[retry] lifetime"),
    ('[retry]\nbackoff = { initial = "1s", maximum = "99999999d" }\n', "backoff.maximum"),
    ('[queues.bulk]\nlifetime = "99999999d"\n', "lifetime"),
    ("[retry]\nlifetime = nan\n", "lifetime"),
    ("[retry]\nbackoff = { factor = inf }\n", "factor"),
])
def test_s2_03_retry_and_queue_durations_in_range(table: str, where: str,
                                                  tmp_path: object) -> None:
    from pathlib import Path

    cfg = Path(str(tmp_path)) / "c.toml"
    cfg.write_text(table)
    # The [retry] table is read a layer above config, when a process builds its runtime.
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        policy_of(load_settings(cfg, environ={}))


@pytest.mark.parametrize(("name", "value"), [
    ("max_message_size", "0"), ("max_message_size", str(2**40)), ("max_recipients", "0"),
    ("max_recipients", "1e3"), ("batch_size", "1.5"), ("redis_retries", "-1"),
    ("redis_retries", "99"),
])
def test_counts_in_range(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"setting {name}="):
        load_settings(environ={f"MAILWORKER_{name.upper()}": value})


def test_new_settings_from_the_environment() -> None:
    s = load_settings(environ={"MAILWORKER_REDIS_CONNECT_TIMEOUT": "0.5",
                               "MAILWORKER_REDIS_SOCKET_TIMEOUT": "3s",
                               "MAILWORKER_REDIS_RETRIES": "0",
                               "MAILWORKER_MAX_RECIPIENTS": "200"})
    assert (s.redis_connect_timeout, s.redis_socket_timeout, s.redis_retries,
            s.max_recipients) == (0.5, 3.0, 0, 200)
    d = Settings()
    assert d.redis_connect_timeout <= 2 and d.redis_socket_timeout <= 2 and d.redis_retries >= 1
    assert all(math.isfinite(getattr(d, n)) for n in DURATIONS)


def test_framework_settings_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="MAILWORKER: setting redis_socket_timeout="):
        build_settings({"redis_socket_timeout": float("nan")}, where="MAILWORKER", environ={})


# --- S2-12: the Redis password in reprs -------------------------------------------------------

@pytest.mark.parametrize("password", ["R3dis-PW-q1", "Pa@ssTail9@Word", "Sl/ash@Secret9",
                                      "Co:lonPW7"])
def test_s2_12_settings_repr_hides_the_redis_password(password: str) -> None:
    s = Settings(redis_url=f"redis://mw:{password}@127.0.0.1:6391/2",
                 broker_url=f"redis://:{password}@127.0.0.1:6391/3")
    text = repr(s)
    # Older redactors stopped at the first '@' (or '/') and showed the rest.
    for fragment in (password, *password.replace("/", "@").split("@")):
        assert fragment not in text
    assert "redis://mw:***@127.0.0.1:6391/2" in text and "redis://:***@127.0.0.1:6391/3" in text
    assert s.redis_url.endswith("@127.0.0.1:6391/2")  # the value itself is untouched


def test_redact_url() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("rediss://u:p@h:1/0?ssl_cert_reqs=none") == "rediss://u:***@h:1/0?ssl_cert_reqs=none"
    assert redact_url("redis://secret@h/0") == "redis://***@h/0"
    assert redact_url(None) is None


def test_a_bad_redis_url_in_an_error_is_redacted() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(redis_url="redis://u:hunter2@h/0", broker_url="")
    assert "hunter2" not in str(info.value)


def test_review_f15_redis_and_broker_urls_are_checked_at_load() -> None:
    with pytest.raises(ConfigError, match=r"redis_url='http://x' is not a Redis URL"):
        load_settings(None, {"MAILWORKER_REDIS_URL": "http://x"})
    with pytest.raises(ConfigError, match="redis_url=") as info:
        load_settings(None, {"MAILWORKER_REDIS_URL": "cache:6379:s3cret"})
    assert "rediss://" in str(info.value)
    with pytest.raises(ConfigError, match="broker_url='localhost' is not a broker URL"):
        load_settings(None, {"MAILWORKER_BROKER_URL": "localhost"})
    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/0", "unix:///run/redis.sock"):
        assert load_settings(None, {"MAILWORKER_REDIS_URL": url}).redis_url == url
    assert load_settings(None, {"MAILWORKER_BROKER_URL": "amqp://u@h//"}).broker_url
