"""Idempotency-Key: replay, mismatch, in-flight conflicts, what is kept, TTL, tenants, and
exactly one copy in Kafka when clients time out and retry."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from collections.abc import Iterator

import aiohttp
import msgspec
import redis.asyncio
import structlog
from structlog.testing import capture_logs

from mlgate.service.protection.idempotency import (
    Claim,
    Entry,
    IdempotencyUnavailable,
    StoredResponse,
    fingerprint,
)
from mlgate.service.protection.middleware import body_reading
from mlgate.service.routes.ingest import STREAM_MAX_REJECTED_LEAD
from mlgate.service.state import IDEMPOTENCY, METRICS, RECORD_SINK
from tests.support import KafkaBroker, KeyMaker, ManagedProcess, read_topic

PATH = "/api/v2/ingest"
STREAM = "/api/v2/ingest/stream?source=s"
JSON = {"Content-Type": "application/json"}


def _batch(n: int = 3, tag: str = "a") -> dict[str, object]:
    return {
        "source": "s",
        "records": [{"features": [1.0, 2.0, 3.0, 4.0], "metadata": {"tag": tag, "i": i}} for i in range(n)],
    }


def _with_key(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def test_repeat_replays_the_first_answer_and_writes_nothing(
    app_client, settings_for, backend
) -> None:
    client = await app_client(settings_for(backend))
    first = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    again = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert (first.status, again.status) == (202, 202)
    assert await again.read() == await first.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert again.content_type == "application/json"
    assert client.app[RECORD_SINK].next_offset == 3


async def test_a_repeat_gets_the_answer_in_the_format_it_accepts(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    msgpack = {"Accept": "application/msgpack", **_with_key("k1")}
    first = await client.post(PATH, json=_batch(), headers=msgpack)
    again = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (first.content_type, again.content_type) == ("application/msgpack", "application/json")
    assert await again.json() == msgspec.msgpack.decode(await first.read())
    back = await client.post(PATH, json=_batch(), headers=msgpack)
    assert back.content_type == "application/msgpack"
    assert msgspec.msgpack.decode(await back.read()) == await again.json()
    assert client.app[RECORD_SINK].next_offset == 3


async def test_a_kept_problem_is_replayed_as_a_problem_in_the_format_accepted(
    app_client, settings_for
) -> None:
    client = await app_client(settings_for())
    # The stream's first records are written, then it is stopped: its 422 is kept.
    lines = [b'{"record_id": "w", "features": [1.0, 2.0, 3.0, 4.0]}']
    lines += [b"{}"] * (STREAM_MAX_REJECTED_LEAD + 2)
    body = b"\n".join(lines)
    headers = {"Content-Type": "application/x-ndjson", **_with_key("k1")}
    first = await client.post(STREAM, data=body, headers={"Accept": "application/msgpack", **headers})
    again = await client.post(STREAM, data=body, headers=headers)
    assert (first.status, again.status) == (422, 422)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content_type == "application/problem+json"
    assert await again.json() == msgspec.msgpack.decode(await first.read())


async def test_same_key_with_a_different_body_is_422(app_client, settings_for, backend) -> None:
    client = await app_client(settings_for(backend))
    assert (await client.post(PATH, json=_batch(tag="a"), headers=_with_key("k1"))).status == 202
    response = await client.post(PATH, json=_batch(tag="b"), headers=_with_key("k1"))
    assert response.status == 422
    assert client.app[RECORD_SINK].next_offset == 3


async def test_the_same_bytes_sent_as_another_media_type_are_another_request(
    app_client, settings_for
) -> None:
    client = await app_client(settings_for())
    body = msgspec.json.encode(_batch())
    first = await client.post(
        PATH, data=body, headers={"Content-Type": "application/json", **_with_key("k1")}
    )
    again = await client.post(
        PATH, data=body, headers={"Content-Type": "application/msgpack", **_with_key("k1")}
    )
    assert (first.status, again.status) == (202, 422)
    assert "Idempotent-Replayed" not in again.headers


async def test_a_repeat_naming_its_media_type_otherwise_is_still_a_replay(
    app_client, settings_for
) -> None:
    client = await app_client(settings_for())
    body = msgspec.msgpack.encode(_batch())
    for media in ("application/msgpack", "application/x-msgpack; charset=binary"):
        response = await client.post(
            PATH, data=body, headers={"Content-Type": media, **_with_key("k1")}
        )
        assert response.status == 202
    assert response.headers["Idempotent-Replayed"] == "true"


async def test_a_body_forged_to_read_as_a_kept_fingerprint_is_another_request(
    app_client, settings_for
) -> None:
    """A review: the earlier format of a body starting with the reading of a kept
    request hashed to that request's fingerprint, and was replayed its answer."""
    client = await app_client(settings_for())
    body = msgspec.json.encode(_batch())
    json_body = {"Content-Type": "application/json", **_with_key("k1")}
    assert (await client.post(PATH, data=body, headers=json_body)).status == 202
    forged = body_reading(json_body).encode() + b"\n" + body
    response = await client.post(PATH, data=forged, headers=json_body)
    assert response.status == 422
    assert "Idempotent-Replayed" not in response.headers


async def test_a_key_kept_by_an_earlier_version_still_matches_its_retry(
    app_client, settings_for
) -> None:
    """Earlier versions kept a fingerprint without the media type: a retry across the
    upgrade is that request, not 422 (a review)."""
    client = await app_client(settings_for())
    body = msgspec.msgpack.encode(_batch())
    await client.app[IDEMPOTENCY].claim("anonymous", "k1", fingerprint("POST", PATH, body))
    response = await client.post(
        PATH, data=body, headers={"Content-Type": "application/msgpack", **_with_key("k1")}
    )
    assert response.status == 409  # that request, still in flight


async def test_repeat_while_the_first_is_in_flight_is_409(app_client, settings_for, backend) -> None:
    client = await app_client(settings_for(backend))
    body = msgspec.json.encode(_batch())
    # Another process is still working on the first request under this key.
    json_body = {"Content-Type": "application/json"}
    await client.app[IDEMPOTENCY].claim(
        "anonymous", "k1", fingerprint("POST", PATH, body, body_reading(json_body))
    )
    response = await client.post(PATH, data=body, headers={**json_body, **_with_key("k1")})
    assert response.status == 409
    assert response.headers["Retry-After"] == "1"
    assert client.app[RECORD_SINK].next_offset == 0


async def test_concurrent_duplicates_execute_once(app_client, settings_for, backend) -> None:
    # Ten requests at once open new Redis connections; on a loaded host one of them can
    # take longer than the default 200 ms, and that request then falls back to
    # in-process state (a separate store, so a second execution). This test is about
    # Redis answering; the fallback has tests of its own.
    client = await app_client(settings_for(backend, redis_timeout_ms=5000))
    responses = await asyncio.gather(
        *(client.post(PATH, json=_batch(), headers=_with_key("k1")) for _ in range(10))
    )
    executed = [r for r in responses if r.status == 202 and "Idempotent-Replayed" not in r.headers]
    assert len(executed) == 1
    assert {r.status for r in responses} <= {202, 409}
    assert client.app[RECORD_SINK].next_offset == 3


async def test_a_request_refused_before_its_work_keeps_no_answer_and_its_fix_runs(
    app_client, settings_for
) -> None:
    """A review: a 400, 415 or 422 answer was kept, and the request fixed was refused
    422 "used with a different request" for the key's whole day (Stripe's API keeps
    no answer of a request that failed its validation)."""
    client = await app_client(settings_for())
    refused = [
        client.post(PATH, data=b'{"source": "s", "records": [', headers={**JSON, **_with_key("k1")}),
        client.post(PATH, data=b"{}", headers={"Content-Type": "text/plain", **_with_key("k1")}),
        client.post(PATH, json={"source": "s", "records": [{"features": [1.0]}]}, headers=_with_key("k1")),
    ]
    assert [(await answer).status for answer in refused] == [400, 415, 422]
    fixed = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert fixed.status == 202
    assert "Idempotent-Replayed" not in fixed.headers
    again = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert again.headers["Idempotent-Replayed"] == "true"


async def test_server_errors_release_the_key_so_a_retry_runs_again(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    await client.app[RECORD_SINK].close()  # every write now fails: 503
    first = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    again = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert (first.status, again.status) == (503, 503)
    assert "Idempotent-Replayed" not in again.headers


async def test_kept_answers_expire_after_the_ttl(app_client, settings_for, backend) -> None:
    client = await app_client(settings_for(backend, idempotency_ttl_s=1))
    first = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    await asyncio.sleep(1.1)
    later = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert (first.status, later.status) == (202, 202)
    assert "Idempotent-Replayed" not in later.headers
    assert (await later.json())["tracking_id"] != (await first.json())["tracking_id"]


async def test_redis_replays_across_processes(
    app_client, settings_for, redis_server: ManagedProcess, tmp_path
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}"
    one = await app_client(settings_for(url, data_dir=str(tmp_path / "one")))
    two = await app_client(settings_for(url, data_dir=str(tmp_path / "two")))
    first = await one.post(PATH, json=_batch(), headers=_with_key("k1"))
    again = await two.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == await first.read()
    assert two.app[RECORD_SINK].next_offset == 0


async def test_keys_are_scoped_per_tenant(app_client, make_settings, api_keys: KeyMaker) -> None:
    acme, globex = api_keys.create(tenant="acme"), api_keys.create(tenant="globex")
    client = await app_client(
        make_settings(auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,))
    )
    one = await client.post(PATH, json=_batch(tag="a"), headers={"X-API-Key": acme, **_with_key("k1")})
    two = await client.post(
        PATH, json=_batch(tag="b"), headers={"X-API-Key": globex, **_with_key("k1")}
    )
    assert (one.status, two.status) == (202, 202)
    assert "Idempotent-Replayed" not in two.headers


async def test_malformed_key_is_400(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    response = await client.post(PATH, json=_batch(), headers=_with_key("x" * 256))
    assert response.status == 400


async def test_client_retries_with_timeouts_leave_exactly_one_copy_in_kafka(
    app_client, make_settings, kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    settings = make_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap,
        kafka_topic=kafka_topic,
        feature_dims=(4,),
        dedup_window_s=0,  # records carry no record_id anyway: only the key protects them
    )
    client = await app_client(settings)
    timeouts = Counter[str]()

    async def send(batch: int) -> None:
        body = _batch(n=10, tag=f"b{batch}")
        for attempt in range(100):
            # The first attempt gives up long before the broker acknowledges.
            timeout = aiohttp.ClientTimeout(total=0.002 if attempt == 0 else 10)
            try:
                response = await client.post(
                    PATH, json=body, headers=_with_key(f"batch-{batch}"), timeout=timeout
                )
            except TimeoutError:
                timeouts["timeout"] += 1
                continue
            if response.status == 202:
                return
            assert response.status == 409
            await asyncio.sleep(0.02)
        raise AssertionError(f"batch {batch} never got a 202")

    await asyncio.gather(*(send(b) for b in range(20)))
    assert timeouts["timeout"] > 0
    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=200)
    seen = Counter(
        (value["metadata"]["tag"], value["metadata"]["i"])
        for value in (msgspec.json.decode(m.value) for m in messages)
    )
    assert len(messages) == 200 and set(seen.values()) == {1}


# -- Redis failing ------------------------------------------------------------------------


@contextlib.contextmanager
def _frozen(server: ManagedProcess) -> Iterator[None]:
    """Redis stops answering (SIGSTOP) and keeps what it holds."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def test_a_repeat_while_redis_fails_is_refused_and_never_runs_again(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: claims fell back to an in-process store that had never seen the answers
    kept in Redis, and every repeat during a 350 ms pause wrote its records again."""
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    first = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
    assert first.status == 202
    written = client.app[RECORD_SINK].next_offset
    with _frozen(redis_server):
        repeats = [await client.post(PATH, json=_batch(), headers=_with_key("k1")) for _ in range(4)]
    assert [r.status for r in repeats] == [503] * 4
    assert all(r.headers["Retry-After"] for r in repeats)
    assert client.app[RECORD_SINK].next_offset == written  # nothing ran again
    for _ in range(50):  # until Redis's breaker lets calls through again
        replayed = await client.post(PATH, json=_batch(), headers=_with_key("k1"))
        if replayed.status != 503:
            break
        await asyncio.sleep(0.2)
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert await replayed.read() == await first.read()
    assert client.app[RECORD_SINK].next_offset == written


async def test_an_answer_redis_could_not_take_is_stored_once_it_answers_again(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: the answer was dropped, repeats got 409 for the whole lock (60 s), then
    ran the request again."""
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    store = client.app[IDEMPOTENCY]
    claimed = await store.claim("t", "k1", "print")
    assert isinstance(claimed, Claim)
    answer = StoredResponse(202, [("Content-Type", "application/json")], b'{"ok": true}')
    with _frozen(redis_server):
        await store.complete(claimed, answer)  # Redis does not answer
    for _ in range(50):
        await asyncio.sleep(0.2)
        try:
            found = await store.claim("t", "k1", "print")
        except IdempotencyUnavailable:
            continue  # Redis's breaker still open
        if isinstance(found, Entry) and found.response is not None:
            break
    assert isinstance(found, Entry) and found.response == answer



async def test_an_answer_stored_late_is_logged_under_its_own_requests_id(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: the task storing late answers ran in the context of the first request
    that needed it, and logged another request's answer under that one's id."""
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    store = client.app[IDEMPOTENCY]
    answer = StoredResponse(202, [("Content-Type", "application/json")], b'{"ok": true}')
    claims = {}
    for request_id in ("rid-b", "rid-c"):
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            claims[request_id] = await store.claim("t", f"key-{request_id}", "print")
    with capture_logs() as logs:
        with _frozen(redis_server):
            for request_id, claimed in claims.items():
                with structlog.contextvars.bound_contextvars(request_id=request_id):
                    await store.complete(claimed, answer)  # Redis does not answer
        for _ in range(50):
            await asyncio.sleep(0.2)
            if not store._unfinished:
                break
    stored = [entry for entry in logs if entry["event"] == "idempotency_answer_stored_late"]
    assert sorted(entry["request_id"] for entry in stored) == ["rid-b", "rid-c"]

_BUSY_LUA = (
    "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] "
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > tonumber(ARGV[1]) return 1"
)


async def test_a_claim_redis_ran_after_its_call_timed_out_does_not_hold_the_key(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: Redis, busy past the call's timeout, ran the claim afterwards. The
    client was told nothing was done; its retries met a claim nobody owned, 409 for the
    whole lock (60 s). The claim is now released once Redis answers."""
    client = await app_client(
        settings_for(f"redis://127.0.0.1:{redis_server.port}", rate_limits_enabled=False)
    )
    assert (await client.post(PATH, json=_batch(), headers=_with_key("warm-up"))).status == 202
    observer = redis.asyncio.Redis(port=redis_server.port)
    try:
        busy = asyncio.create_task(observer.eval(_BUSY_LUA, 0, 400_000))  # Redis busy 0.4 s
        await asyncio.sleep(0.02)
        first = await client.post(PATH, json=_batch(), headers=_with_key("k-orphan"))
        await busy
    finally:
        await observer.aclose()
    assert first.status == 503
    statuses = []
    for _ in range(20):  # the client retries, as told
        await asyncio.sleep(0.25)
        retry = await client.post(PATH, json=_batch(), headers=_with_key("k-orphan"))
        statuses.append(retry.status)
        if retry.status == 202:
            break
    assert statuses[-1] == 202, statuses
    assert client.app[RECORD_SINK].next_offset == 2 * 3  # the warm-up batch and this one, once


async def test_answers_waiting_for_redis_are_bounded_the_oldest_given_up_first(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: with Redis slow rather than down, every answer waited in memory for
    the whole lock, without bound."""
    client = await app_client(
        settings_for(f"redis://127.0.0.1:{redis_server.port}", idempotency_max_entries=2)
    )
    store = client.app[IDEMPOTENCY]
    claims = [await store.claim("t", f"k{i}", "print") for i in range(3)]
    answer = StoredResponse(202, [], b"{}")
    with _frozen(redis_server):
        for claimed in claims:
            assert isinstance(claimed, Claim)
            await store.complete(claimed, answer)
        assert [record for record, _ in store._unfinished] == [c.record for c in claims[1:]]


async def _claimed_k1(store) -> tuple[Claim, StoredResponse]:
    """A claim of key k1 while Redis answers, and an answer to finish it with."""
    claimed = await store.claim("t", "k1", "print")
    assert isinstance(claimed, Claim)
    return claimed, StoredResponse(202, [], b'{"ok": 1}')


async def _stored_answer(store, key: str) -> Entry | None:
    """The entry under ``key`` once Redis answers again and holds an answer there."""
    for _ in range(50):
        await asyncio.sleep(0.2)
        try:
            found = await store.claim("t", key, "print")
        except IdempotencyUnavailable:
            continue  # Redis's breaker still open
        if isinstance(found, Entry) and found.response is not None:
            return found
    return None


async def test_a_retry_refused_while_redis_fails_leaves_the_waiting_answer_to_be_stored(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: the retry's failed claim was queued in the place of the first request's
    answer (by key); the answer was lost, 409 for the lock, then a second run."""
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    store = client.app[IDEMPOTENCY]
    claimed, answer = await _claimed_k1(store)
    with _frozen(redis_server):
        await store.complete(claimed, answer)
        with contextlib.suppress(IdempotencyUnavailable):
            await store.claim("t", "k1", "print")  # the client's retry
    found = await _stored_answer(store, "k1")
    assert found is not None and found.response == answer


async def test_claims_refused_while_redis_fails_push_out_no_waiting_answer(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    client = await app_client(
        settings_for(f"redis://127.0.0.1:{redis_server.port}", idempotency_max_entries=1)
    )
    store = client.app[IDEMPOTENCY]
    claimed, answer = await _claimed_k1(store)
    with _frozen(redis_server):
        await store.complete(claimed, answer)
        for other in ("k2", "k3"):
            with contextlib.suppress(IdempotencyUnavailable):
                await store.claim("t", other, "print")
    found = await _stored_answer(store, "k1")
    assert found is not None and found.response == answer


async def test_a_failing_finisher_is_logged_and_counted(
    app_client, settings_for, redis_server: ManagedProcess, monkeypatch
) -> None:
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    store = client.app[IDEMPOTENCY]
    claimed, answer = await _claimed_k1(store)
    with _frozen(redis_server):
        await store.complete(claimed, answer)  # waits for the finisher

    async def broken(*_: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "_finish_in_redis", broken)
    with capture_logs() as logs:
        for _ in range(20):
            await asyncio.sleep(0.2)
            if store._finisher is None:
                break
    assert any(entry["event"] == "idempotency_store_unfinished_failed" for entry in logs)
    crashes = client.app[METRICS].background_task_crashes.labels("idempotency-finisher")
    assert crashes._value.get() == 1


async def test_a_key_refused_while_redis_breaker_is_open_says_when_to_retry(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """Retry-After is the time until Redis's breaker lets a call through, not 1 s."""
    client = await app_client(
        settings_for(
            f"redis://127.0.0.1:{redis_server.port}",
            redis_breaker_fail_max=1,
            redis_breaker_reset_s=5,
            rate_limits_enabled=False,
        )
    )
    with _frozen(redis_server):
        first = await client.post(PATH, json=_batch(), headers=_with_key("k1"))  # opens it
        refused = await client.post(PATH, json=_batch(), headers=_with_key("k2"))
    assert (first.status, refused.status) == (503, 503)
    assert int(refused.headers["Retry-After"]) >= 3


async def test_an_idempotency_key_sent_twice_is_400_and_writes_nothing(app_client, settings_for) -> None:
    """A review: of two ``Idempotency-Key`` lines the first was the key, the second ignored."""
    client = await app_client(settings_for(None))
    headers = [("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]
    response = await client.post(PATH, json=_batch(), headers=headers)
    assert response.status == 400
    assert "must be sent once" in (await response.json())["detail"]
    assert client.app[RECORD_SINK].next_offset == 0
