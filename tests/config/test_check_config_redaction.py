"""``check-config`` prints the settings without the secrets in them."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest

from mlgate.service.cli import redact_url


def check_config(**env: str) -> dict[str, object]:
    """What ``mlgate check-config`` prints with only ``env`` set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_") and k != "REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "mlgate", "check-config"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    shown: dict[str, object] = msgspec.json.decode(result.stdout)
    return shown


def test_check_config_hides_the_redis_password() -> None:
    shown = check_config(MLGATE_REDIS_URL="redis://:hunter2@cache.internal:6379/0")
    assert shown["redis_url"] == "redis://:***@cache.internal:6379/0"


def test_check_config_hides_the_password_of_every_cluster_seed() -> None:
    shown = check_config(
        MLGATE_REDIS_MODE="cluster",
        MLGATE_REDIS_URL="redis://10.0.0.1:6379,redis://admin:hunter2@10.0.0.2:6379",
    )
    assert shown["redis_url"] == "redis://10.0.0.1:6379,redis://admin:***@10.0.0.2:6379"


def test_check_config_hides_the_password_of_a_unix_socket_url() -> None:
    shown = check_config(REDIS_URL="unix:///run/redis.sock?db=0&password=hunter2")
    assert shown["redis_url"] == "unix:///run/redis.sock?db=0&password=***"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://alice:hunter2@cache", "redis://alice:***@cache"),
        ("redis://hunter2@cache", "redis://***@cache"),
        ("rediss://cache:6379/0?password=hunter2&db=1", "rediss://cache:6379/0?password=***&db=1"),
        ("redis://[::1:hunter2@cache", "***"),
        ("redis://:A@h1:7000,redis://:B@h2:7001", "redis://:***@h1:7000,redis://:***@h2:7001"),
        ("redis://h1:7000, rediss://u:B@h2:7001", "redis://h1:7000, rediss://u:***@h2:7001"),
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
        ("unix://alice:hunter2@/run/redis.sock?db=0", "unix://alice:***@/run/redis.sock?db=0"),
        ("redis://cache?pass%77ord=hunter2", "redis://cache?pass%77ord=***"),
        ("redis://cache/0?db=0;password=hunter2", "redis://cache/0?db=0;password=***"),
        ("redis://:hun,ter2@cache", "redis://:***@cache"),
        ("redis://:hun/ter2@cache/0", "redis://:***@cache/0"),
        ("redis://:hun#ter2@cache", "redis://:***@cache"),
        ("redis://cache?password=hun@ter2", "redis://cache?password=***"),
        ("alice:hunter2@broker:9092", "alice:***@broker:9092"),
    ],
    ids=[
        "password", "user-and-password", "token-as-user", "query-password", "unparseable",
        "every-seed", "seed-after-a-space", "unix-socket-query", "unix-socket-user-info",
        "encoded-query-name", "semicolon-query", "comma-in-password", "slash-in-password",
        "hash-in-password", "at-in-query-password", "no-scheme",
    ],
)
def test_a_url_password_is_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    "value",
    [
        "redis://cache:6379/0",
        "redis://10.0.0.1:6379,redis://10.0.0.2:6379",
        "unix:///run/redis.sock?db=0",
        "broker1:9092,broker2:9092",
        "models",
        "0.0.0.0",
    ],
)
def test_a_value_without_credentials_is_printed_as_is(value: str) -> None:
    assert redact_url(value) == value
