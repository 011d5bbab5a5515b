"""Model repository changes through the API (``/v2/repository/models/{model}/load`` and
``/unload``) are audited like ingests: who, which model, the outcome."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.protection.api_keys import key_id_of
from tests.conftest import AppClientFactory
from tests.service_process import REPO
from tests.support import KeyMaker

Client = TestClient[web.Request, web.Application]


async def admin_client(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
) -> tuple[Client, str]:
    shutil.copytree(REPO / "models" / "demo", tmp_path / "models" / "demo")
    key = api_keys.create(tenant="ops", scopes="admin")
    settings = make_settings(
        model_repository=str(tmp_path / "models"), keys_file=str(api_keys.path), auth_disabled=False
    )
    return await app_client(settings), key


def audit_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("channel") == "audit"]


async def test_load_and_unload_through_the_repository_api_are_audited(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
) -> None:
    client, key = await admin_client(app_client, make_settings, api_keys, tmp_path)
    headers = {"X-API-Key": key}
    with structlog.testing.capture_logs() as events:
        unloaded = await client.post("/v2/repository/models/demo/unload", headers=headers)
        loaded = await client.post("/v2/repository/models/demo/load", headers=headers)
    assert unloaded.status == 200 and loaded.status == 200
    unload, load = audit_events(events)
    for event, action, route in (
        (unload, "model_unload", "POST /v2/repository/models/demo/unload"),
        (load, "model_load", "POST /v2/repository/models/demo/load"),
    ):
        assert event["event"] == action
        assert event["model"] == "demo"
        assert event["route"] == route
        assert (event["tenant"], event["key_id"]) == ("ops", key_id_of(key))
        assert event["request_id"] == (loaded if action == "model_load" else unloaded).headers[
            "X-Request-ID"
        ]
        assert key not in repr(event)
    assert (unload["outcome"], load["outcome"]) == ("unloaded", "loaded")
    assert load["model_version"] == "1"


async def test_a_load_of_a_model_not_in_the_repository_is_audited_as_not_found(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
) -> None:
    client, key = await admin_client(app_client, make_settings, api_keys, tmp_path)
    with structlog.testing.capture_logs() as events:
        response = await client.post("/v2/repository/models/nope/load", headers={"X-API-Key": key})
    assert response.status == 404
    [event] = audit_events(events)
    assert (event["event"], event["outcome"], event["model"]) == ("model_load", "not_found", "nope")


async def test_a_refused_load_option_is_audited_as_rejected(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
) -> None:
    client, key = await admin_client(app_client, make_settings, api_keys, tmp_path)
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            "/v2/repository/models/demo/load",
            json={"parameters": {"config": "{}"}},
            headers={"X-API-Key": key},
        )
    assert response.status == 400
    [event] = audit_events(events)
    assert (event["event"], event["outcome"]) == ("model_load", "rejected")
    assert "{}" not in repr(event)


async def test_a_caller_without_the_admin_scope_changes_nothing_and_no_event_is_written(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
) -> None:
    predictor = api_keys.create(tenant="acme", scopes="predict")
    client, _ = await admin_client(app_client, make_settings, api_keys, tmp_path)
    with structlog.testing.capture_logs() as events:
        response = await client.post(
            "/v2/repository/models/demo/unload", headers={"X-API-Key": predictor}
        )
    assert response.status == 403
    assert audit_events(events) == []


async def test_an_unload_repeated_with_its_idempotency_key_is_replayed_not_run_again(
    app_client: AppClientFactory,
    make_settings: Callable[..., Settings],
    api_keys: KeyMaker,
    tmp_path: Path,
) -> None:
    """A review: a load's or unload's 200 has no body, and was not kept: the repeat of
    an unload, after someone had loaded the model again, unloaded it again."""
    client, key = await admin_client(app_client, make_settings, api_keys, tmp_path)
    headers = {"X-API-Key": key}
    with_key = {**headers, "Idempotency-Key": "unload-once"}
    with structlog.testing.capture_logs() as events:
        first = await client.post("/v2/repository/models/demo/unload", headers=with_key)
        loaded = await client.post("/v2/repository/models/demo/load", headers=headers)
        repeat = await client.post("/v2/repository/models/demo/unload", headers=with_key)
    assert (first.status, loaded.status, repeat.status) == (200, 200, 200)
    assert "Idempotent-Replayed" not in first.headers
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert [event["event"] for event in audit_events(events)] == ["model_unload", "model_load"]
