"""``check-config`` prints the settings without the secrets in them."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest

from mlgate.service.cli import redact_url


def test_check_config_hides_the_redis_password() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_") and k != "REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "mlgate", "check-config"],
        env={**clean, "MLGATE_REDIS_URL": "redis://:hunter2@cache.internal:6379/0"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert msgspec.json.decode(result.stdout)["redis_url"] == "redis://:***@cache.internal:6379/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://alice:hunter2@cache", "redis://alice:***@cache"),
        ("redis://hunter2@cache", "redis://***@cache"),
        ("rediss://cache:6379/0?password=hunter2&db=1", "rediss://cache:6379/0?password=***&db=1"),
        ("redis://[::1:hunter2@cache", "***"),
    ],
    ids=["password", "user-and-password", "token-as-user", "query-password", "unparseable"],
)
def test_a_url_password_is_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("value", ["redis://cache:6379/0", "broker1:9092,broker2:9092", "models", "0.0.0.0"])
def test_a_value_without_credentials_is_printed_as_is(value: str) -> None:
    assert redact_url(value) == value
