"""``mlgate keys``: create prints a key once, list and revoke, keys in Redis,
and the dev key ``serve --dev`` makes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlgate.service.cli.keys import ensure_dev_key
from mlgate.service.protection.api_keys import KeyFile, keys_path
from mlgate.service.state import KEY_STORE
from tests.service_process import REPO
from tests.support import ManagedProcess

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
def keys_cli(tmp_path: Path):
    """Run ``mlgate keys ARGS`` against a keys file of the test's own."""
    keys_file = tmp_path / "keys.json"

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MLGATE_")}
        environment.pop("REDIS_URL", None)
        environment.update(MLGATE_KEYS_FILE=str(keys_file), **env)
        return subprocess.run(
            [sys.executable, "-m", "mlgate", "keys", *args],
            cwd=REPO, env=environment, capture_output=True, text=True, timeout=30,
        )

    run.keys_file = keys_file  # type: ignore[attr-defined]
    return run


def test_create_prints_only_the_key_and_stores_only_its_hash(keys_cli) -> None:
    done = keys_cli("create", "--tenant", "acme", "--scopes", "ingest,predict")
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("mlg_") and "\n" not in key
    stored = keys_cli.keys_file.read_text()
    assert key not in stored and key.split("_", 2)[2] not in stored
    [entry] = json.loads(stored)["keys"]
    assert entry["tenant"] == "acme" and entry["hash"].startswith("sha256:")
    assert keys_cli.keys_file.stat().st_mode & 0o077 == 0


def test_create_writes_an_audit_event_without_the_key(keys_cli) -> None:
    done = keys_cli("create", "--tenant", "acme", "--scopes", "ingest")
    event = json.loads(next(line for line in done.stderr.splitlines() if line.startswith("{")))
    assert (event["event"], event["channel"], event["tenant"]) == ("key_create", "audit", "acme")
    assert done.stdout.strip() not in done.stderr


def test_create_refuses_an_unknown_scope(keys_cli) -> None:
    done = keys_cli("create", "--tenant", "acme", "--scopes", "ingest,root")
    assert done.returncode == 2
    assert "scopes" in done.stderr
    assert not keys_cli.keys_file.exists()


def test_list_shows_keys_but_no_secrets(keys_cli) -> None:
    key = keys_cli("create", "--tenant", "acme", "--scopes", "ingest", "--rate", "5", "--burst", "10").stdout.strip()
    done = keys_cli("list", "--json")
    [row] = [json.loads(line) for line in done.stdout.splitlines()]
    assert row["key_id"] == key.split("_")[1]
    assert (row["tenant"], row["scopes"], row["rate"], row["burst"]) == ("acme", ["ingest"], 5.0, 10)
    assert "hash" not in row and key not in done.stdout


async def test_created_key_is_let_in_and_revoked_key_is_not(
    keys_cli, app_client, make_settings
) -> None:
    key = keys_cli("create", "--tenant", "acme", "--scopes", "ingest").stdout.strip()
    client = await app_client(
        make_settings(auth_disabled=False, keys_file=str(keys_cli.keys_file), feature_dims=(4,))
    )
    assert (await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})).status == 202
    done = keys_cli("revoke", key.split("_")[1])
    assert done.returncode == 0, done.stderr
    client.app[KEY_STORE].reload()
    assert (await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})).status == 401


def test_revoking_an_unknown_key_fails(keys_cli) -> None:
    assert keys_cli("revoke", "0123456789abcdef").returncode == 1


def closed_port() -> int:
    """A port nothing listens on: bound once to find it free, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the JSON audit events."""
    return [line for line in done.stderr.splitlines() if not line.startswith("{")]


@pytest.mark.parametrize(
    "action",
    [
        ("list",),
        ("create", "--tenant", "acme", "--scopes", "ingest", "--store", "redis"),
        ("revoke", "0123456789abcdef"),
    ],
    ids=["list", "create", "revoke"],
)
def test_unreachable_redis_is_one_error_line_without_its_password(keys_cli, action) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    done = keys_cli(*action, REDIS_URL=url)
    assert done.returncode == 2
    [line] = error_lines(done)
    assert line.startswith("mlgate keys: Redis at redis://:***@127.0.0.1:") and "Connection refused" in line
    assert "hunter2" not in done.stderr and done.stdout == ""


def test_a_keys_file_that_is_a_directory_is_one_error_line(keys_cli, tmp_path: Path) -> None:
    done = keys_cli("list", "--keys-file", str(tmp_path))
    assert done.returncode == 2
    assert error_lines(done) == [f"mlgate keys: {tmp_path}: Is a directory"]


async def test_keys_created_in_redis_are_let_in(
    keys_cli, app_client, make_settings, redis_server: ManagedProcess
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}"
    done = keys_cli("create", "--tenant", "acme", "--scopes", "ingest", "--store", "redis", REDIS_URL=url)
    assert done.returncode == 0, done.stderr
    assert not keys_cli.keys_file.exists()
    client = await app_client(
        make_settings(
            auth_disabled=False, keys_file=str(keys_cli.keys_file), redis_url=url, feature_dims=(4,)
        )
    )
    response = await client.post(
        "/api/v2/ingest", json=INGEST, headers={"X-API-Key": done.stdout.strip()}
    )
    assert response.status == 202


def test_dev_mode_creates_a_key_with_every_scope_and_prints_it(make_settings, capsys) -> None:
    settings = make_settings(auth_disabled=False)
    ensure_dev_key(settings)
    printed = capsys.readouterr().err  # stdout is the JSON log lines
    [entry] = KeyFile(keys_path(settings)).load().values()
    assert entry.scopes == {"ingest", "predict", "admin", "quality"}
    assert f"mlg_{entry.key_id}_" in printed


def test_dev_mode_prints_the_same_key_at_the_next_start(make_settings, capsys) -> None:
    settings = make_settings(auth_disabled=False)
    ensure_dev_key(settings)
    first = capsys.readouterr().err
    ensure_dev_key(settings)
    assert capsys.readouterr().err == first
    assert len(KeyFile(keys_path(settings)).load()) == 1


@pytest.mark.parametrize("rate", ["nan", "inf", "1e-320", "0"])
def test_create_refuses_a_rate_that_is_not_a_usable_number(keys_cli, rate: str) -> None:
    """A review: ``--rate nan`` stored a key with a burst and no rate, exit 0."""
    answer = keys_cli("create", "--tenant", "acme", "--scopes", "ingest", "--rate", rate, "--burst", "2")
    assert answer.returncode == 2, answer.stderr
    assert "rate must be" in answer.stderr
    assert not keys_cli.keys_file.exists() or "acme" not in keys_cli.keys_file.read_text()


@pytest.mark.parametrize("name", ["line1\nKEY_ID  fake  admin", "\x1b[31mred", "x" * 201])
def test_a_name_that_would_break_the_list_is_refused(keys_cli, name: str) -> None:
    """A review: a newline in ``--name`` forged a row of ``keys list``, an escape
    coloured the terminal."""
    done = keys_cli("create", "--tenant", "acme", "--scopes", "ingest", "--name", name)
    assert done.returncode == 2
    assert "name must be" in done.stderr and "Traceback" not in done.stderr


def test_an_unreadable_key_in_redis_hides_no_other_and_revoking_it_removes_it(
    keys_cli, redis_server: ManagedProcess
) -> None:
    """A review: one entry edited out of its bounds failed ``keys list`` (every key
    unlisted) and ``keys revoke`` of any key."""
    import redis

    url = f"redis://127.0.0.1:{redis_server.port}"
    assert keys_cli("create", "--tenant", "acme", "--scopes", "ingest", "--store", "redis", REDIS_URL=url).returncode == 0
    client = redis.Redis(port=redis_server.port)
    try:
        client.hset("mlgate:apikeys", "badrate", json.dumps(
            {"created_at": "x", "hash": "sha256:00", "key_id": "badrate", "scopes": ["ingest"],
             "tenant": "t", "rate": 0, "burst": 1}
        ))
        listed = keys_cli("list", "--json", REDIS_URL=url)
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(line)["tenant"] for line in listed.stdout.splitlines()] == ["acme"]
        assert "unreadable key badrate" in listed.stderr
        revoked = keys_cli("revoke", "badrate", REDIS_URL=url)
        assert revoked.returncode == 0, revoked.stderr
        assert client.hget("mlgate:apikeys", "badrate") is None
    finally:
        client.close()
