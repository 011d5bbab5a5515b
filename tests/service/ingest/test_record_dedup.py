"""Record-level dedup by record_id: counted in records_duplicate, never written twice."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio
from structlog.testing import capture_logs

from mlgate.service.http.errors import Conflict
from mlgate.service.ingest import dedup as dedup_module
from mlgate.service.ingest.dedup import MAX_IDS_PER_CALL, Claim, RecordDeduplicator
from mlgate.service.protection.shared_redis import SharedRedis
from mlgate.service.state import METRICS, RECORD_DEDUP, RECORD_SINK
from tests.support import KeyMaker, ManagedProcess, until

PATH = "/api/v2/ingest"


def _records(*ids: str | None) -> dict[str, object]:
    records = []
    for record_id in ids:
        record: dict[str, object] = {"features": [1.0, 2.0, 3.0, 4.0]}
        if record_id is not None:
            record["record_id"] = record_id
        records.append(record)
    return {"source": "s", "records": records}


async def test_seen_record_ids_are_counted_and_not_written(app_client, settings_for, backend) -> None:
    client = await app_client(settings_for(backend))
    await client.post(PATH, json=_records("a", "b"))
    response = await client.post(PATH, json=_records("b", "c"))
    body = await response.json()
    assert response.status == 202
    assert (body["records_accepted"], body["records_duplicate"]) == (1, 1)
    assert client.app[RECORD_SINK].next_offset == 3
    assert client.app[METRICS].records_duplicate._value.get() == 1


async def test_a_repeat_within_one_batch_is_a_duplicate(app_client, settings_for, backend) -> None:
    client = await app_client(settings_for(backend))
    body = await (await client.post(PATH, json=_records("a", "a", "b"))).json()
    assert (body["records_accepted"], body["records_duplicate"]) == (2, 1)
    assert client.app[RECORD_SINK].next_offset == 2


async def test_a_batch_of_only_duplicates_is_202_with_nothing_written(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    await client.post(PATH, json=_records("a"))
    response = await client.post(PATH, json=_records("a"))
    body = await response.json()
    assert response.status == 202
    assert (body["records_accepted"], body["records_duplicate"]) == (0, 1)
    assert client.app[RECORD_SINK].next_offset == 1


async def test_records_without_record_id_are_never_duplicates(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    for _ in range(2):
        body = await (await client.post(PATH, json=_records(None, None))).json()
        assert body["records_duplicate"] == 0
    assert client.app[RECORD_SINK].next_offset == 4


async def test_a_batch_mixing_given_and_missing_ids_drops_only_the_given_seen_ones(
    app_client, settings_for
) -> None:
    client = await app_client(settings_for())
    await client.post(PATH, json=_records("a", None, "b"))
    body = await (await client.post(PATH, json=_records(None, "a", None, "c"))).json()
    assert (body["records_accepted"], body["records_duplicate"]) == (3, 1)
    assert client.app[RECORD_SINK].next_offset == 6


async def test_rejected_records_claim_nothing(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    bad = {"source": "s", "records": [{"record_id": "a", "features": [1.0]}, {"features": [1.0] * 4}]}
    await client.post(PATH, json=bad)
    body = await (await client.post(PATH, json=_records("a"))).json()
    assert (body["records_accepted"], body["records_duplicate"]) == (1, 0)


async def test_dedup_holds_across_processes_through_redis(
    app_client, settings_for, redis_server: ManagedProcess, tmp_path
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}"
    one = await app_client(settings_for(url, data_dir=str(tmp_path / "one")))
    two = await app_client(settings_for(url, data_dir=str(tmp_path / "two")))
    await one.post(PATH, json=_records("a"))
    body = await (await two.post(PATH, json=_records("a"))).json()
    assert body["records_duplicate"] == 1


async def test_a_large_batch_claims_its_ids_in_redis_a_bounded_part_at_a_time(
    app_client, settings_for, redis_server: ManagedProcess, tmp_path
) -> None:
    """A review: one tenant's batches of 10,000 ids, one script call each, held Redis
    30-155 ms apiece, timed out other tenants' calls and opened the shared breaker."""
    url = f"redis://127.0.0.1:{redis_server.port}"
    client = await app_client(settings_for(url))
    count = 2 * MAX_IDS_PER_CALL + 7
    ids = [f"big-{i}" for i in range(count)]
    await client.post(PATH, json=_records(*ids[: count // 2]))
    observer = redis.asyncio.Redis(port=redis_server.port)
    try:
        await observer.execute_command("CONFIG", "RESETSTAT")
        body = await (await client.post(PATH, json=_records(*ids))).json()
        stats = await observer.info("commandstats")
    finally:
        await observer.aclose()
    assert (body["records_accepted"], body["records_duplicate"]) == (count - count // 2, count // 2)
    scripts = sum(
        stat["calls"] for name, stat in stats.items() if name in ("cmdstat_evalsha", "cmdstat_eval")
    )
    assert scripts >= 3 + 3  # the claim in three parts, then the confirm in three


async def test_ids_are_written_again_after_the_window(app_client, settings_for, backend) -> None:
    client = await app_client(settings_for(backend, dedup_window_s=1))
    await client.post(PATH, json=_records("a"))
    await asyncio.sleep(1.1)
    body = await (await client.post(PATH, json=_records("a"))).json()
    assert (body["records_accepted"], body["records_duplicate"]) == (1, 0)


async def test_window_zero_turns_dedup_off(app_client, settings_for) -> None:
    client = await app_client(settings_for(dedup_window_s=0))
    await client.post(PATH, json=_records("a"))
    body = await (await client.post(PATH, json=_records("a"))).json()
    assert body["records_duplicate"] == 0


async def test_dedup_is_per_tenant(app_client, make_settings, api_keys: KeyMaker) -> None:
    acme, globex = api_keys.create(tenant="acme"), api_keys.create(tenant="globex")
    client = await app_client(
        make_settings(auth_disabled=False, keys_file=str(api_keys.path), feature_dims=(4,))
    )
    await client.post(PATH, json=_records("a"), headers={"X-API-Key": acme})
    body = await (await client.post(PATH, json=_records("a"), headers={"X-API-Key": globex})).json()
    assert body["records_duplicate"] == 0


async def test_stream_ingest_counts_duplicates(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    lines = b"".join(msgspec.json.encode(r) + b"\n" for r in _records("a", "b", "a")["records"])
    response = await client.post(
        f"{PATH}/stream?source=s", data=lines, headers={"Content-Type": "application/x-ndjson"}
    )
    body = await response.json()
    assert response.status == 202
    assert (body["records_accepted"], body["records_duplicate"]) == (2, 1)


async def test_a_failed_write_releases_its_claims(app_client, settings_for) -> None:
    client = await app_client(settings_for())
    await client.app[RECORD_SINK].close()  # the write fails: 503
    assert (await client.post(PATH, json=_records("a"))).status == 503
    # what the client's retry meets: "a" is not taken
    assert (await client.app[RECORD_DEDUP].claim("anonymous", ["a"])).new == [True]


async def test_redis_outage_falls_back_to_the_local_set(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    redis_server.stop()
    await client.post(PATH, json=_records("a"))
    body = await (await client.post(PATH, json=_records("a"))).json()
    assert body["records_duplicate"] == 1
    # The first batch's claim and confirm; the second batch's claim finds "a" in this
    # process's table, which it asks first while it holds ids Redis may not have.
    assert client.app[METRICS].redis_fallback.labels("dedup")._value.get() == 2


# -- a record_id in flight for another request ------------------------------------------


async def _second_claim_of_a(dedup: RecordDeduplicator) -> tuple[Claim, asyncio.Task[Claim]]:
    """A first claim of "a", and a second one made while the first is in flight."""
    first = await dedup.claim("t", ["a"])
    assert first.new == [True]
    waiting = asyncio.create_task(dedup.claim("t", ["a"]))
    await asyncio.sleep(0.05)
    return first, waiting


async def test_an_id_in_flight_elsewhere_becomes_a_duplicate_once_written(
    app_client, settings_for, backend
) -> None:
    dedup = (await app_client(settings_for(backend))).app[RECORD_DEDUP]
    first, waiting = await _second_claim_of_a(dedup)
    assert not waiting.done()  # neither new nor a duplicate while the first write runs
    await dedup.confirm("t", first)
    assert (await waiting).new == [False]


async def test_an_id_in_flight_elsewhere_is_claimed_when_that_write_fails(
    app_client, settings_for, backend
) -> None:
    dedup = (await app_client(settings_for(backend))).app[RECORD_DEDUP]
    first, waiting = await _second_claim_of_a(dedup)
    await dedup.release("t", first)
    second = await waiting
    assert second.new == [True]
    # the first request's late release or confirm does not touch the second one's claim
    await dedup.release("t", first)
    await dedup.confirm("t", first)
    third = asyncio.create_task(dedup.claim("t", ["a"]))
    await asyncio.sleep(0.05)
    assert not third.done()  # still in flight for the second
    await dedup.confirm("t", second)
    assert (await third).new == [False]


async def test_a_claim_cancelled_while_waiting_releases_what_it_held(
    app_client, settings_for, backend
) -> None:
    dedup = (await app_client(settings_for(backend))).app[RECORD_DEDUP]
    await dedup.claim("t", ["a"])  # another request is writing "a"
    waiting = asyncio.create_task(dedup.claim("t", ["b", "a"]))  # holds "b", waits for "a"
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (await dedup.claim("t", ["b"])).new == [True]


async def test_ids_written_while_redis_failed_to_record_them_stay_duplicates_here(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    dedup = client.app[RECORD_DEDUP]
    claim = await dedup.claim("t", ["a"])  # claimed in Redis
    redis_server.stop()
    await dedup.confirm("t", claim)  # Redis cannot record it: this process does
    assert (await dedup.claim("t", ["a"])).new == [False]


async def test_a_batch_meeting_an_id_in_flight_too_long_gets_409_and_writes_nothing(
    app_client, settings_for, backend
) -> None:
    client = await app_client(settings_for(backend, dedup_in_flight_wait_s=0.1))
    dedup = client.app[RECORD_DEDUP]
    other = await dedup.claim("anonymous", ["a"])  # another request is writing "a"
    response = await client.post(PATH, json=_records("b", "a"))
    body = await response.json(content_type=None)
    assert response.status == 409
    assert response.headers["Retry-After"] == "1"
    assert "another request is writing record_ids of this batch" in body["detail"]
    assert client.app[RECORD_SINK].next_offset == 0
    # "b" was claimed by the refused batch and released with it: the retry writes it
    assert (await dedup.claim("anonymous", ["b"])).new == [True]
    assert other.new == [True]


async def test_a_409_for_an_id_in_flight_is_not_kept_for_the_idempotency_key(
    app_client, settings_for
) -> None:
    client = await app_client(settings_for(dedup_in_flight_wait_s=0.05))
    dedup = client.app[RECORD_DEDUP]
    other = await dedup.claim("anonymous", ["a"])  # another request is writing "a"
    headers = {"Idempotency-Key": "k-1"}
    assert (await client.post(PATH, json=_records("a"), headers=headers)).status == 409
    await dedup.release("anonymous", other)  # ...and its write failed
    retry = await client.post(PATH, json=_records("a"), headers=headers)
    assert retry.status == 202 and "Idempotent-Replayed" not in retry.headers
    assert (await retry.json())["records_accepted"] == 1


async def test_an_in_flight_mark_of_the_previous_release_still_counts_as_in_flight(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    # During a rolling deploy the previous release marks ids in flight with a bare "p".
    url = f"redis://127.0.0.1:{redis_server.port}"
    dedup = (await app_client(settings_for(url, dedup_in_flight_wait_s=0.05))).app[RECORD_DEDUP]
    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.set("mlgate:rid:t:a", "p", ex=60)
    finally:
        await client.aclose()
    with pytest.raises(Conflict):
        await dedup.claim("t", ["a"])  # not a duplicate: that write may still fail


async def test_ids_written_while_redis_was_down_stay_duplicates_once_it_is_back(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}"
    dedup = (await app_client(settings_for(url, redis_breaker_reset_s=0.1))).app[RECORD_DEDUP]
    redis_server.stop()
    claim = await dedup.claim("t", ["a"])  # in this process only
    await dedup.confirm("t", claim)
    redis_server.start()  # back, empty: it never heard of "a"
    client = redis.asyncio.Redis.from_url(url)
    try:
        for n in range(100):  # until this process writes to Redis again
            await dedup.confirm("t", await dedup.claim("t", [f"probe{n}"]))
            if await client.exists(f"mlgate:rid:t:probe{n}"):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the process never used Redis again")
    finally:
        await client.aclose()
    assert (await dedup.claim("t", ["a"])).new == [False]


async def test_ids_written_while_redis_was_down_reach_it_once_it_answers_again(
    app_client, settings_for, make_settings, redis_server: ManagedProcess
) -> None:
    """A review: ids written in one process while Redis failed stayed in its table, and
    a client's retry sent to another process after Redis came back was written again."""
    url = f"redis://127.0.0.1:{redis_server.port}"
    client = await app_client(settings_for(url, redis_breaker_reset_s=0.1))
    dedup = client.app[RECORD_DEDUP]
    redis_server.stop()
    claim = await dedup.claim("t", ["a", "b"])  # in this process only
    await dedup.confirm("t", claim)
    redis_server.start()
    checker = redis.asyncio.Redis.from_url(url)
    try:
        for _ in range(100):  # a /ready probe pings Redis: it answers, the ids go to it
            await client.get("/ready")
            if await checker.exists("mlgate:rid:t:a", "mlgate:rid:t:b") == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the ids never reached Redis")
        ttl = await checker.ttl("mlgate:rid:t:a")
    finally:
        await checker.aclose()
    assert 0 < ttl <= dedup.window_s
    other_process = SharedRedis(url, timeout_s=2.0)
    try:
        retry = await RecordDeduplicator(make_settings(redis_url=url), other_process).claim("t", ["a"])
    finally:
        await other_process.client.aclose()
    assert retry.new == [False]


async def test_claims_of_the_same_large_batch_in_any_order_leave_exactly_one_holding_it(
    make_settings, redis_server: ManagedProcess
) -> None:
    """A review: claimed part by part, two claims of one batch (a request and its retry,
    the ids in another order) each took a part the other then waited for, and both got
    409. Nobody confirms here, so the others wait out their wait: one Claim, the rest
    Conflict."""
    url = f"redis://127.0.0.1:{redis_server.port}"
    settings = make_settings(redis_url=url, dedup_in_flight_wait_s=0.3)
    shared = SharedRedis(url, timeout_s=2.0)
    claimers = [RecordDeduplicator(settings, shared) for _ in range(3)]
    try:
        ids = [f"r{i}" for i in range(2 * MAX_IDS_PER_CALL + 3)]
        orders = [ids, ids[::-1], ids[MAX_IDS_PER_CALL:] + ids[:MAX_IDS_PER_CALL]]
        results = await asyncio.gather(
            *(claimer.claim("acme", order) for claimer, order in zip(claimers, orders, strict=True)),
            return_exceptions=True,
        )
    finally:
        await shared.client.aclose()
    assert sorted(type(result).__name__ for result in results) == ["Claim", "Conflict", "Conflict"]
    winner = next(result for result in results if isinstance(result, Claim))
    assert all(winner.new)


async def test_a_small_claim_between_a_large_ones_parts_does_not_hold_what_that_one_waits_for(
    make_settings, redis_server: ManagedProcess
) -> None:
    """A review: a claim of two ids made between a large claim's parts kept the later id
    while it waited for the earlier one, and the large claim waited for it in turn."""
    url = f"redis://127.0.0.1:{redis_server.port}"
    settings = make_settings(redis_url=url, dedup_in_flight_wait_s=2.0)
    shared = SharedRedis(url, timeout_s=2.0)
    large, small = RecordDeduplicator(settings, shared), RecordDeduplicator(settings, shared)
    ids = [f"r{i:04d}" for i in range(2 * MAX_IDS_PER_CALL)]
    small_asked = asyncio.Event()
    calls = 0
    claim_script = large._scripts["claim"]

    async def large_claim(keys: list[str], args: list[object]) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:  # its second part goes once the small claim has been made
            await small_asked.wait()
        return await claim_script(keys=keys, args=args)

    small_script = small._scripts["claim"]

    async def small_claim(keys: list[str], args: list[object]) -> object:
        answer = await small_script(keys=keys, args=args)
        small_asked.set()
        return answer

    large._scripts["claim"] = large_claim
    small._scripts["claim"] = small_claim
    try:
        large_task = asyncio.create_task(large.claim("t", ids))
        await asyncio.sleep(0.1)  # the large claim holds its first part
        small_task = asyncio.create_task(small.claim("t", [ids[1], ids[MAX_IDS_PER_CALL + 100]]))
        done, _ = await asyncio.wait({large_task, small_task}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {large_task}  # not held up by the small claim
        assert all(large_task.result().new)
        with pytest.raises(Conflict):  # the large claim is never confirmed here
            await small_task
    finally:
        await shared.client.aclose()


async def test_a_crash_while_sharing_keeps_the_ids_and_shares_them_on_a_retry(
    app_client, settings_for, redis_server: ManagedProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sharing task is started by a recovery: one that crashed left its ids to the
    next outage's recovery, which may never come, and dropped the entry in hand."""
    monkeypatch.setattr(dedup_module, "SHARING_RETRY_S", 0.05)
    url = f"redis://127.0.0.1:{redis_server.port}"
    client = await app_client(settings_for(url, redis_breaker_reset_s=0.1))
    dedup = client.app[RECORD_DEDUP]
    redis_server.stop()
    claim = await dedup.claim("t", ["a", "b"])  # in this process only
    await dedup.confirm("t", claim)
    run = dedup._run
    crashes = [RuntimeError("a bug")]

    async def crashing_once(script_name: str, *args: object) -> object:
        if script_name == "confirm" and crashes:
            raise crashes.pop()
        return await run(script_name, *args)

    monkeypatch.setattr(dedup, "_run", crashing_once)
    redis_server.start()
    checker = redis.asyncio.Redis.from_url(url)
    try:
        for _ in range(100):  # a /ready probe pings Redis: it answers, the sharing starts
            await client.get("/ready")
            if await checker.exists("mlgate:rid:t:a", "mlgate:rid:t:b") == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the ids never reached Redis")
    finally:
        await checker.aclose()
    assert not crashes  # it crashed once, and the retry shared the ids
    assert client.app[METRICS].background_task_crashes.labels("dedup-sharing")._value.get() == 1


async def test_ids_written_while_redis_was_down_reach_it_before_the_breaker_would_let_calls_through(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: the ids reached Redis only once this process's breaker let a call
    through again (up to its reset time after Redis was back), while another process's
    breaker had let its own through already and written a retry of them again."""
    url = f"redis://127.0.0.1:{redis_server.port}"
    client = await app_client(settings_for(url, redis_breaker_reset_s=60, redis_breaker_fail_max=1))
    dedup = client.app[RECORD_DEDUP]
    redis_server.stop()
    await dedup.confirm("t", await dedup.claim("t", ["a"]))  # in this process only
    redis_server.start()
    checker = redis.Redis.from_url(url)
    try:
        # Well within the breaker's 60 s, and no request asks Redis meanwhile.
        await until(lambda: bool(checker.exists("mlgate:rid:t:a")), timeout_s=10)
    finally:
        checker.close()


async def test_sharing_that_redis_refuses_while_it_answers_pings_is_tried_less_and_less_often(
    app_client, settings_for, redis_server: ManagedProcess
) -> None:
    """A review: Redis out of memory answered the probe's ping and refused the ids, and
    the sharing ran again every 0.1 s, a pair of lines each time."""
    url = f"redis://127.0.0.1:{redis_server.port}"
    client = await app_client(settings_for(url, redis_breaker_fail_max=1))
    dedup = client.app[RECORD_DEDUP]
    admin = redis.asyncio.Redis.from_url(url)
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # every write refused: OOM
        with capture_logs() as logs:
            await dedup.confirm("t", await dedup.claim("t", ["a"]))  # kept here
            await asyncio.sleep(1.5)
        await admin.config_set("maxmemory", 0)
    finally:
        await admin.aclose()
    recoveries = [entry for entry in logs if entry["event"] == "redis_recovered"]
    assert 1 <= len(recoveries) <= 6  # 0.2, 0.4, 0.8 s apart, not 0.1
