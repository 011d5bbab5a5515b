"""API keys at the front door: open routes, 401 / 403, key sources, auth switched off."""

from __future__ import annotations

import asyncio
import re
import signal

import msgspec
import pytest
from structlog.testing import capture_logs

from mlgate.service.protection.api_keys import (
    REDIS_HASH,
    KeysFileError,
    KeyStore,
    encode_key,
    key_id_of,
    new_key,
)
from mlgate.service.state import KEY_STORE, RELOAD_HOOKS, ROUTE_ACCESS
from tests.service.protection.conftest import ready_once
from tests.support import KeyMaker, ManagedProcess

INGEST = {"source": "s", "records": [{"features": [1.0, 2.0, 3.0, 4.0]}]}
# The contract's open routes, plus the docs page's own assets.
OPEN_PATHS = {
    "/health", "/ready", "/metrics", "/openapi.json", "/docs", "/v2/health/live",
    "/v2/health/ready", "/docs/init.js", "/docs/static/{name}",
}


def _concrete(path: str) -> str:
    """A request path for a route template: ``/v2/models/{model}`` -> ``/v2/models/x``."""
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_only_the_open_routes_answer_without_a_key(app_client, secured) -> None:
    client = await app_client(secured())
    checked = 0
    for route in client.app.router.routes():
        canonical = route.resource.canonical
        path = _concrete(canonical)
        if canonical == "/docs/static/{name}":
            path = "/docs/static/swagger-ui.css"
        method = "GET" if route.method == "*" else route.method
        response = await client.request(method, path)
        if canonical in OPEN_PATHS:
            assert response.status != 401, f"{method} {canonical} must be open"
        else:
            assert response.status == 401, f"{method} {canonical} answered {response.status}"
        checked += 1
    assert checked > len(OPEN_PATHS)


async def test_missing_key_is_401_with_a_bearer_challenge(app_client, secured) -> None:
    client = await app_client(secured())
    response = await client.post("/api/v2/ingest", json=INGEST)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="mlgate"'
    assert response.content_type == "application/problem+json"


async def test_unknown_key_is_401(app_client, secured, api_keys: KeyMaker) -> None:
    api_keys.create()
    client = await app_client(secured())
    forged = "mlg_0123456789abcdef_" + "A" * 43
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": forged})
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_right_id_with_wrong_secret_is_401(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create()
    client = await app_client(secured())
    tampered = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": tampered})
    assert response.status == 401


async def test_bearer_key_with_the_scope_is_let_in(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    response = await client.post(
        "/api/v2/ingest", json=INGEST, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status == 202


async def test_x_api_key_header_is_let_in(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 202


async def test_other_authorization_schemes_are_401(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    response = await client.post(
        "/api/v2/ingest", json=INGEST, headers={"Authorization": f"Basic {key}"}
    )
    assert response.status == 401


async def test_x_api_key_counts_beside_another_authorization_scheme(
    app_client, secured, api_keys: KeyMaker
) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    headers = {"Authorization": "Basic dXNlcjpwdw==", "X-API-Key": key}
    assert (await client.post("/api/v2/ingest", json=INGEST, headers=headers)).status == 202


async def test_key_without_the_scope_is_403(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="predict")
    client = await app_client(secured())
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 403
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


async def test_a_403_is_logged_with_the_keys_tenant_and_id(app_client, secured, api_keys: KeyMaker) -> None:
    """A review: its access line said ``tenant: null, key_id: null``, so a key probing
    routes beyond its scopes left no trace of which key it was."""
    key = api_keys.create(scopes="predict", tenant="acme")
    client = await app_client(secured())
    with capture_logs() as events:
        response = await client.post("/v2/repository/index", headers={"X-API-Key": key})
    assert response.status == 403
    [line] = [e for e in events if e["event"] == "request"]
    assert line["tenant"] == "acme"
    assert line["key_id"] == key_id_of(key)


async def test_repository_routes_need_admin(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="ingest,predict,quality")
    client = await app_client(secured())
    response = await client.post("/v2/repository/index", headers={"X-API-Key": key})
    assert response.status == 403


async def test_server_metadata_takes_any_valid_key(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="quality")
    client = await app_client(secured())
    assert (await client.get("/v2", headers={"X-API-Key": key})).status == 200


async def test_every_route_declares_who_may_call_it(app_client, secured) -> None:
    client = await app_client(secured())
    access = client.app[ROUTE_ACCESS]
    undeclared = [
        route.resource.canonical
        for route in client.app.router.routes()
        if route.resource is not None and route.resource not in access
    ]
    assert undeclared == []


async def test_declared_scopes_follow_the_contract(app_client, secured) -> None:
    client = await app_client(secured())
    by_path = {resource.canonical: scopes for resource, scopes in client.app[ROUTE_ACCESS].items()}
    assert by_path["/api/v2/ingest/stream"] == {"ingest"}
    assert by_path["/api/v1/predict"] == {"predict"}
    assert by_path["/v2/models/{model}/infer"] == {"predict"}
    assert by_path["/v2/repository/index"] == {"admin"}
    assert by_path["/api/v2/quality/sources/{source}"] == {"quality", "admin"}
    assert by_path["/v2"] == frozenset()
    assert {path for path, scopes in by_path.items() if scopes is None} == OPEN_PATHS


async def test_unknown_path_is_401_without_a_key_and_404_with_one(
    app_client, secured, api_keys: KeyMaker
) -> None:
    key = api_keys.create()
    client = await app_client(secured())
    assert (await client.get("/nothing-here")).status == 401
    assert (await client.get("/nothing-here", headers={"X-API-Key": key})).status == 404


async def test_wrong_method_on_an_open_route_is_405_with_allow_without_a_key(
    app_client, secured
) -> None:
    """A review: it was 401, as if the open path needed a key."""
    client = await app_client(secured())
    for path in ("/health", "/v2/health/live", "/metrics"):
        response = await client.post(path)
        assert response.status == 405, path
        assert "GET" in response.headers["Allow"]
    # The Open Inference Protocol's routes answer errors as that protocol does.
    assert (await client.post("/health")).content_type == "application/problem+json"
    assert "error" in await (await client.post("/v2/health/live")).json()


async def test_wrong_method_on_a_protected_route_needs_a_key(app_client, secured) -> None:
    client = await app_client(secured())
    assert (await client.delete("/api/v2/ingest")).status == 401


async def test_revoked_key_is_401_after_reload(app_client, secured, api_keys: KeyMaker) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    assert (await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})).status == 202
    api_keys.revoke(key)
    client.app[KEY_STORE].reload()  # what SIGHUP does; otherwise within a second
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})
    assert response.status == 401


async def _key_kept_in_redis(redis_server: ManagedProcess) -> str:
    """A new ingest key stored in Redis alone, as ``keys create --store redis`` does."""
    import redis.asyncio as aioredis

    plaintext, stored = new_key("acme", frozenset({"ingest"}))
    client_redis = aioredis.Redis(port=redis_server.port)
    await client_redis.hset(REDIS_HASH, stored.key_id, encode_key(stored))
    await client_redis.aclose()
    return plaintext


async def test_keys_kept_in_redis_are_let_in(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    plaintext = await _key_kept_in_redis(redis_server)
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert response.status == 202


async def test_a_flood_of_made_up_keys_keeps_a_cached_key_served_while_redis_is_down(
    app_client, secured, redis_server: ManagedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's flood of 10,500 unknown key ids (each a 401) pushed a tenant's cached
    Redis key out of the shared cache: with Redis paused the tenant got 503s."""
    import secrets

    from mlgate.service.protection import api_keys as api_keys_module

    monkeypatch.setattr(api_keys_module, "MAX_CACHED_REDIS_KEYS", 20)
    monkeypatch.setattr(api_keys_module, "MAX_CACHED_UNKNOWN_KEYS", 20, raising=False)
    plaintext = await _key_kept_in_redis(redis_server)
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    ok = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert ok.status == 202
    for _ in range(100):
        made_up = f"mlg_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
        assert await client.app[KEY_STORE].authenticate(made_up) is None

    redis_server.stop()
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert response.status == 202


async def test_a_key_revoked_in_redis_is_refused_at_once_after_a_reload(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    """SIGHUP re-reads the keys: those kept from Redis too (a review: a revoked key
    served its cache time, ~4 s, after the SIGHUP)."""
    import redis.asyncio as aioredis

    plaintext = await _key_kept_in_redis(redis_server)
    client = await app_client(
        secured(redis_url=f"redis://127.0.0.1:{redis_server.port}", keys_cache_s=3600)
    )
    ok = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert ok.status == 202
    client_redis = aioredis.Redis(port=redis_server.port)
    await client_redis.hdel(REDIS_HASH, key_id_of(plaintext))
    await client_redis.aclose()
    for hook in client.app[RELOAD_HOOKS].values():
        await hook()
    refused = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert refused.status == 401


async def test_a_cached_redis_key_is_trusted_only_so_long_past_its_cache_while_redis_is_down(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    """A review: a key revoked in Redis, then Redis cut off, served for as long as it
    stayed cut off; the stale key is now trusted ``keys_stale_s`` past its cache time."""
    plaintext = await _key_kept_in_redis(redis_server)
    client = await app_client(
        secured(
            redis_url=f"redis://127.0.0.1:{redis_server.port}", keys_cache_s=0.1, keys_stale_s=0.5
        )
    )
    ok = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert ok.status == 202
    redis_server.stop()
    await asyncio.sleep(0.2)  # past the cache time, within the stale time
    stale = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert stale.status == 202
    await asyncio.sleep(0.5)  # past both
    refused = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert refused.status == 503
    assert "Retry-After" in refused.headers


async def test_unreachable_key_store_never_lets_a_key_in(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    plaintext, _ = new_key("acme", frozenset({"ingest"}))
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    redis_server.stop()
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert response.status == 503
    assert "Retry-After" in response.headers


async def test_auth_disabled_lets_requests_in_and_warns_at_start(app_client, make_settings) -> None:
    with capture_logs() as logs:
        client = await app_client(make_settings(auth_disabled=True, feature_dims=(4,)))
    assert any(entry["event"] == "auth_disabled" and entry["log_level"] == "warning" for entry in logs)
    assert (await client.post("/api/v2/ingest", json=INGEST)).status == 202


async def test_a_broken_keys_file_keeps_the_keys_read_last(
    app_client, secured, api_keys: KeyMaker
) -> None:
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    api_keys.path.write_text("{not json")
    client.app[KEY_STORE].reload()
    assert (await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})).status == 202


async def test_a_reload_meeting_a_broken_keys_file_fails_and_keeps_the_keys_read_last(
    app_client, secured, api_keys: KeyMaker
) -> None:
    """A review: SIGHUP's reload said it had succeeded (systemd's status "reloaded")."""
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    api_keys.path.write_text("{not json")
    client.app[KEY_STORE].reload()  # a request's look at the file, before the reload
    for _ in range(2):  # and a second reload, the file still broken
        with pytest.raises(KeysFileError):
            await client.app[RELOAD_HOOKS]["api_keys"]()
    assert (await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})).status == 202


async def test_a_reload_reads_again_a_keys_file_that_failed_though_its_stamp_is_the_same(
    app_client, secured, api_keys: KeyMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a file made readable again by chmod (no stamp changes) failed every
    reload with its old error."""
    key = api_keys.create(scopes="ingest")
    client = await app_client(secured())
    store = client.app[KEY_STORE]
    load = store._file.load
    monkeypatch.setattr(store._file, "load", lambda: (_ for _ in ()).throw(PermissionError(13, "denied")))
    api_keys.path.touch()  # a new stamp, read and failed
    with pytest.raises(KeysFileError):
        await client.app[RELOAD_HOOKS]["api_keys"]()
    monkeypatch.setattr(store._file, "load", load)  # readable again, the same stamp
    await client.app[RELOAD_HOOKS]["api_keys"]()
    assert (await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": key})).status == 202


def test_a_broken_keys_file_stops_start_up(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text('{"keys": [{"key_id": 1}]}')
    with pytest.raises(KeysFileError):
        KeyStore(path)


async def test_a_quiet_host_sees_redis_frozen_without_a_request_paying_for_it(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    """A review: Redis stopped (SIGSTOP) under an idle host: /ready said nothing until a
    request needed Redis and waited out its timeout."""
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    assert "degraded" not in await (await client.get("/ready")).json()
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        # /ready and the metrics' sampling ping it, once a second.
        body = await ready_once(client, lambda body: "degraded" in body)
        assert "Redis unreachable" in body["degraded"]["redis"]
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert "degraded" not in await ready_once(client, lambda body: "degraded" not in body)


async def test_ready_reports_redis_down_as_degraded_and_stays_ready(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    """A review: /ready said nothing of Redis while keys it had not read were refused.
    Not ready would take every host sharing that Redis out of its balancer at once."""
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    healthy = await (await client.get("/ready")).json()
    assert "degraded" not in healthy
    redis_server.stop()
    plaintext, _ = new_key("acme", frozenset({"ingest"}))
    response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert response.status == 503  # a Redis call failed: Redis is known down
    ready = await client.get("/ready")
    body = await ready.json()
    assert ready.status == 200 and body["status"] == "ready"
    assert "Redis unreachable" in body["degraded"]["redis"]

    redis_server.start()  # and no request needs Redis: /ready's own trial finds it back
    assert "degraded" not in await ready_once(client, lambda body: "degraded" not in body)


async def test_a_key_in_redis_edited_out_of_its_bounds_is_refused_and_said(
    app_client, secured, redis_server: ManagedProcess
) -> None:
    """A review: a key's rate edited to 0 made each of its requests a 500 (a division
    by zero in its rate limit); one read from Redis so is refused as unknown, logged."""
    import redis.asyncio as aioredis

    plaintext, stored = new_key("acme", frozenset({"ingest"}))
    record = msgspec.json.decode(encode_key(stored))
    record.update(rate=0, burst=5)
    client_redis = aioredis.Redis(port=redis_server.port)
    await client_redis.hset(REDIS_HASH, stored.key_id, msgspec.json.encode(record))
    await client_redis.aclose()
    client = await app_client(secured(redis_url=f"redis://127.0.0.1:{redis_server.port}"))
    with capture_logs() as logs:
        response = await client.post("/api/v2/ingest", json=INGEST, headers={"X-API-Key": plaintext})
    assert response.status == 401
    assert [entry["key_id"] for entry in logs if entry["event"] == "redis_key_unreadable"] == [stored.key_id]
