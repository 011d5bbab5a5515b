"""Kafka down: accepted records spill to the local log and reach Kafka once it is back."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from mlgate.config import Settings, worker_data_dir
from mlgate.service.state import DEGRADED_CHECKS, METRICS, READINESS_CHECKS, RECORD_SINK, SETTINGS
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink, write_forwarded_offset
from tests.support import (
    KafkaBroker,
    KeyMaker,
    create_topic,
    read_topic,
    restart_with_topic,
    until,
    wait_until_drained,
)


def _batch(key: int, sequence: int) -> dict[str, object]:
    return {
        "source": "s",
        "records": [
            {"record_id": f"k{key}-{sequence}", "features": [float(sequence)] * 4,
             "metadata": {"key": key, "seq": sequence}}
        ],
    }


async def _on_fresh_topic(
    make_settings, broker: KafkaBroker, **overrides: object
) -> tuple[str, Settings]:
    """A new topic on ``broker`` and settings that write to it."""
    topic = await create_topic(broker.bootstrap)
    return topic, make_settings(
        kafka_bootstrap_servers=broker.bootstrap, kafka_topic=topic, **overrides
    )


async def test_records_accepted_while_kafka_is_down_reach_kafka_once_in_order(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    topic, settings = await _on_fresh_topic(
        make_settings,
        private_kafka_broker,
        feature_dims=(4,),
        kafka_request_timeout_ms=1000,
        kafka_breaker_reset_s=1.0,
    )
    client = await app_client(settings)
    sink = client.app[RECORD_SINK]
    assert isinstance(sink, SpillingKafkaSink)

    private_kafka_broker.stop()
    statuses: list[int] = []

    async def producer(key: int) -> None:
        for sequence in range(10):
            response = await client.post("/api/v2/ingest", json=_batch(key, sequence))
            statuses.append(response.status)

    await asyncio.gather(*(producer(key) for key in range(5)))
    assert statuses == [202] * 50
    assert sink.backlog > 0

    await restart_with_topic(private_kafka_broker, topic, sink.breaker)
    await wait_until_drained(sink)

    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=50)
    keys = [m.key.decode() for m in messages]
    assert sorted(keys) == sorted(f"k{k}-{s}" for k in range(5) for s in range(10))
    # Kafka orders within a partition: there, each producer's records keep their order.
    sequences: dict[tuple[int, int], list[int]] = defaultdict(list)
    for message in sorted(messages, key=lambda m: (m.partition, m.offset)):
        value = msgspec.json.decode(message.value)
        sequences[message.partition, value["metadata"]["key"]].append(value["metadata"]["seq"])
    assert all(seq == sorted(seq) for seq in sequences.values())


async def test_ready_stays_200_and_names_kafka_degraded_while_records_spill(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """Ingests spill, so the host stays in rotation; an operator still sees the outage
    in /ready (a review: only the metrics and the logs said so)."""
    topic, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, feature_dims=(4,), kafka_request_timeout_ms=500,
        kafka_breaker_reset_s=0.5,
    )
    client = await app_client(settings)
    sink = client.app[RECORD_SINK]
    assert isinstance(sink, SpillingKafkaSink)
    assert "degraded" not in await (await client.get("/ready")).json()
    private_kafka_broker.stop()
    for sequence in range(3):
        assert (await client.post("/api/v2/ingest", json=_batch(0, sequence))).status == 202
    answer = await client.get("/ready")
    assert answer.status == 200
    kafka = (await answer.json())["degraded"]["kafka"]
    assert "3 wait for it" in kafka or "3 spilled records wait for Kafka" in kafka
    await restart_with_topic(private_kafka_broker, topic, sink.breaker)
    await wait_until_drained(sink)
    await until(lambda: sink.degraded is None)
    assert "degraded" not in await (await client.get("/ready")).json()


async def test_kafka_down_since_the_start_is_named_degraded_until_it_answers(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """A review: with Kafka unreachable from the start, /ready said all was well and
    ``mlgate_dependency_unavailable`` stayed 0 (writes spilled without calling the
    breaker); and the writer was tried again only once a record spilled."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    private_kafka_broker.stop()
    settings = make_settings(
        kafka_bootstrap_servers=private_kafka_broker.bootstrap,
        kafka_topic=topic,
        feature_dims=(4,),
        kafka_request_timeout_ms=500,
        kafka_breaker_reset_s=0.5,
    )
    client = await app_client(settings)
    sink = client.app[RECORD_SINK]
    assert isinstance(sink, SpillingKafkaSink)
    answer = await client.get("/ready")
    assert answer.status == 200
    assert "Kafka unreachable" in (await answer.json())["degraded"]["kafka"]
    metrics = client.app[METRICS]
    metrics.sample()
    assert metrics.dependency_unavailable.labels("kafka")._value.get() == 1

    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    await until(lambda: sink.degraded is None, timeout_s=15)  # no record sent meanwhile
    metrics.sample()
    assert metrics.dependency_unavailable.labels("kafka")._value.get() == 0
    assert (await client.post("/api/v2/ingest", json=_batch(0, 0))).status == 202
    assert sink.backlog == 0  # written to Kafka directly
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=1)
    assert [m.key for m in messages] == [b"k0-0"]


@pytest.mark.parametrize("outage", ["killed", "frozen"])
async def test_kafka_gone_on_a_quiet_host_is_named_degraded_without_any_write(
    app_client, make_settings, private_kafka_broker: KafkaBroker, outage: str
) -> None:
    """A review: a minute after the broker died on a quiet host, /ready and
    ``mlgate_dependency_unavailable`` said nothing; the first ingest paid 5 s for it.
    A metadata request probes Kafka once it has taken nothing for 2 s."""
    _, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, feature_dims=(4,), kafka_request_timeout_ms=500,
    )
    client = await app_client(settings)
    kafka = client.app[DEGRADED_CHECKS]["kafka"]
    assert "degraded" not in await (await client.get("/ready")).json()
    process = private_kafka_broker.process
    assert process is not None
    if outage == "killed":
        private_kafka_broker.stop()
    else:
        process.send_signal(signal.SIGSTOP)
    try:
        await until(lambda: "Kafka unreachable" in (kafka() or ""), timeout_s=15)
        answer = await client.get("/ready")
        assert answer.status == 200 and "Kafka unreachable" in (await answer.json())["degraded"]["kafka"]
        metrics = client.app[METRICS]
        metrics.sample()
        assert metrics.dependency_unavailable.labels("kafka")._value.get() == 1
    finally:
        if outage == "killed":
            private_kafka_broker.start()
        else:
            process.send_signal(signal.SIGCONT)
    await until(lambda: kafka() is None, timeout_s=15)


async def test_a_spill_left_by_a_run_with_more_processes_reaches_kafka(
    app_client, make_settings, private_kafka_broker: KafkaBroker, monkeypatch
) -> None:
    """A review: a restart with fewer processes (``MLGATE_WORKERS`` 2, then 1) left
    ``worker-1``'s spill on disk, its 202'd records never sent, and nothing said so."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    common = dict(
        kafka_bootstrap_servers=private_kafka_broker.bootstrap,
        kafka_topic=topic,
        feature_dims=(4,),
        kafka_request_timeout_ms=500,
        kafka_breaker_reset_s=0.5,
    )
    private_kafka_broker.stop()
    second = await app_client(make_settings(workers=2, worker_index=1, **common))
    for sequence in range(3):
        assert (await second.post("/api/v2/ingest", json=_batch(1, sequence))).status == 202
    await second.close()  # the run with two processes ends, its spill on disk

    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    alone = await app_client(make_settings(workers=1, worker_index=0, **common))
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=3)
    assert sorted(m.key for m in messages) == [b"k1-0", b"k1-1", b"k1-2"]
    metrics = alone.app[METRICS]

    def drained() -> bool:
        metrics.sample()
        return metrics.spill_backlog._value.get() == 0

    await until(drained)
    # Its drainer counts in /ready as the process's own does.
    check = alone.app[READINESS_CHECKS]["spill-worker-1"]
    assert check() is None and (await alone.get("/ready")).status == 200
    adopted = check.args[0]
    monkeypatch.setattr(type(adopted), "problem", property(lambda sink: "stuck" if sink is adopted else None))
    answer = await alone.get("/ready")
    assert answer.status == 503 and (await answer.json())["checks"]["spill-worker-1"] is False
    monkeypatch.undo()

    # Closed with the drain budget, as the process's own: a batch in flight cut off
    # would be sent again at the next start (a review: 100 records twice in Kafka).
    closed: dict[str, float] = {}
    close = SpillingKafkaSink.close

    async def recorded(sink: SpillingKafkaSink, drain_s: float = 10.0) -> None:
        closed[sink._directory.parent.name] = drain_s
        await close(sink, drain_s=drain_s)

    monkeypatch.setattr(SpillingKafkaSink, "close", recorded)
    await alone.close()
    budget = alone.app[SETTINGS].shutdown_timeout_s / 2
    assert closed["worker-1"] == budget and len(closed) == 2 and set(closed.values()) == {budget}


async def test_full_spill_answers_503_with_retry_after(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    _, settings = await _on_fresh_topic(
        make_settings,
        private_kafka_broker,
        feature_dims=(4,),
        kafka_request_timeout_ms=500,
        spill_max_records=3,
        spill_tenant_share=1.0,  # the bound itself, not a tenant's share of it
    )
    client = await app_client(settings)
    private_kafka_broker.stop()
    statuses = []
    for sequence in range(5):
        response = await client.post("/api/v2/ingest", json=_batch(0, sequence))
        statuses.append(response.status)
    assert statuses == [202, 202, 202, 503, 503]
    assert response.headers["Retry-After"].isdigit()
    assert response.content_type == "application/problem+json"


async def test_records_spilled_in_an_outage_are_counted_spilled_and_only_refused_ones_failed(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """A review: each failed produce attempt counted its records failed, the spill's
    resends again, so a quiet outage with nothing lost grew ``failed`` by the minute."""
    _, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, feature_dims=(4,), kafka_request_timeout_ms=300,
        kafka_breaker_reset_s=0.2, spill_max_records=3, spill_tenant_share=1.0,
    )
    client = await app_client(settings)
    registry = client.app[METRICS].registry

    def records(outcome: str) -> float:
        return registry.get_sample_value("mlgate_records_total", {"outcome": outcome}) or 0

    def failed_attempts() -> float:
        return registry.get_sample_value("mlgate_kafka_failed_records_total") or 0

    private_kafka_broker.stop()
    statuses = [
        (await client.post("/api/v2/ingest", json=_batch(0, sequence))).status for sequence in range(4)
    ]
    assert statuses == [202, 202, 202, 503]
    await until(lambda: failed_attempts() >= 3, timeout_s=10)  # the drainer's tries too
    assert (records("spilled"), records("failed")) == (3, 1)


def _outbound(n: int) -> list[OutboundRecord]:
    return [OutboundRecord(key=f"r{i}".encode(), value=b"{}", headers=[]) for i in range(n)]


async def test_spill_drained_after_restart_is_neither_lost_nor_sent_twice(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    topic, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, kafka_request_timeout_ms=500
    )
    private_kafka_broker.stop()
    sink = SpillingKafkaSink(settings)
    await sink.start()
    await sink.write(_outbound(20))
    assert sink.backlog == 20
    await sink.close()

    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    for _ in range(2):  # the second start must find nothing left to send
        sink = SpillingKafkaSink(settings)
        await sink.start()
        await wait_until_drained(sink)
        await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=20)
    assert sorted(m.key for m in messages) == sorted(r.key for r in _outbound(20))


async def test_forwarded_offset_past_the_spill_end_does_not_skip_later_spilled_records(
    make_settings, private_kafka_broker: KafkaBroker
) -> None:
    topic, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, kafka_request_timeout_ms=500
    )
    # As after a power loss that took spill records the drainer had already forwarded.
    spill = Path(worker_data_dir(settings)) / "spill"
    spill.mkdir(parents=True)
    write_forwarded_offset(spill, 5)
    private_kafka_broker.stop()
    sink = SpillingKafkaSink(settings)
    await sink.start()
    await sink.write(_outbound(3))
    assert sink.backlog == 3
    await sink.close()

    private_kafka_broker.start()
    await create_topic(private_kafka_broker.bootstrap, name=topic)
    sink = SpillingKafkaSink(settings)
    await sink.start()
    await wait_until_drained(sink)
    await sink.close()
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=3)
    assert sorted(m.key for m in messages) == sorted(r.key for r in _outbound(3))


async def test_a_crashed_kafka_writer_restarts_and_nothing_is_lost(
    app_client, make_settings, kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    settings = make_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic, feature_dims=(4,)
    )
    client = await app_client(settings)
    sink = client.app[RECORD_SINK]
    assert isinstance(sink, SpillingKafkaSink)
    writer = sink._kafka
    mailbox_get, crashed = writer._mailbox.get, False

    def crash_once():  # type: ignore[no-untyped-def]
        nonlocal crashed
        if not crashed:
            crashed = True
            raise RuntimeError("writer bug")
        return mailbox_get()

    writer._mailbox.get = crash_once  # type: ignore[method-assign]
    first = await client.post("/api/v2/ingest", json=_batch(0, 0))
    assert first.status == 202  # written; the writer crashes as it waits for the next
    await until(lambda: writer.crashes > 0)
    assert not writer.healthy

    second = await client.post("/api/v2/ingest", json=_batch(0, 1))
    assert second.status == 202  # spilled while the writer restarts
    await wait_until_drained(sink)
    assert sink._kafka is writer and writer.running
    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=2)
    assert sorted(m.key for m in messages) == [b"k0-0", b"k0-1"]


def _records_batch(tenant: str, sequence: int, count: int) -> dict[str, object]:
    return {
        "source": "s",
        "records": [
            {"record_id": f"{tenant}-{sequence}-{i}", "features": [1.0, 2.0, 3.0, 4.0]}
            for i in range(count)
        ],
    }


async def test_a_tenant_flooding_the_spill_is_refused_at_its_share_while_others_still_spill(
    app_client, make_settings, private_kafka_broker: KafkaBroker, api_keys: KeyMaker
) -> None:
    """Past three quarters full (30 of 40), a tenant adds to the spill only up to its
    fair share: the bound over the tenants in it and one more still to come. The flood
    stops at 20, the calm tenant at 13 (40 over 3), and a tenant coming last still
    finds room."""
    keys = {tenant: api_keys.create(tenant=tenant, scopes="ingest") for tenant in ("flood", "calm", "late")}
    _, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, feature_dims=(4,), kafka_request_timeout_ms=500,
        spill_max_records=40, keys_file=str(api_keys.path), auth_disabled=False,
        rate_limits_enabled=False,
    )
    private_kafka_broker.stop()
    client = await app_client(settings)

    async def post(tenant: str, sequence: int, count: int = 1) -> int:
        response = await client.post(
            "/api/v2/ingest", json=_records_batch(tenant, sequence, count),
            headers={"X-API-Key": keys[tenant]},
        )
        if response.status == 503:
            assert response.content_type == "application/problem+json"
            assert response.headers["Retry-After"].isdigit()
        return response.status

    assert await post("calm", 0) == 202
    assert [await post("flood", n, 10) for n in range(4)] == [202, 202, 503, 503]
    assert [await post("calm", n) for n in range(1, 14)] == [202] * 12 + [503]
    assert [await post("late", n) for n in range(8)] == [202] * 7 + [503]  # then full
    assert client.app[RECORD_SINK].backlog == 40


async def test_a_tenants_writes_in_flight_at_a_freeze_do_not_take_the_room_kept_for_the_others(
    app_client, make_settings, private_kafka_broker: KafkaBroker, api_keys: KeyMaker
) -> None:
    """A review: with the broker frozen, a flooding tenant's writes waiting on Kafka
    spilled whatever it held (Kafka may hold part of them) and filled the spill: the
    other tenant was refused for the rest of the outage. Its writes in flight count
    against its share: past three quarters (30 of 40) the flood's next ones are refused
    before Kafka is tried, and what flew spills within its share, leaving room."""
    keys = {tenant: api_keys.create(tenant=tenant, scopes="ingest") for tenant in ("flood", "calm")}
    _, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, feature_dims=(4,), kafka_request_timeout_ms=500,
        spill_max_records=40, keys_file=str(api_keys.path), auth_disabled=False,
        rate_limits_enabled=False,
    )
    client = await app_client(settings)

    async def post(tenant: str, sequence: int, count: int = 1) -> int:
        response = await client.post(
            "/api/v2/ingest", json=_records_batch(tenant, sequence, count),
            headers={"X-API-Key": keys[tenant]},
        )
        return response.status

    assert await post("calm", 0) == 202  # Kafka answers: a direct write
    process = private_kafka_broker.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        first = asyncio.ensure_future(post("flood", 0, 10))
        # Kafka silent past a quarter of its timeout (125 ms): what flies now counts.
        await until(lambda: client.app[RECORD_SINK]._kafka.unanswered_s > 0.2)
        flood = [await first, *await asyncio.gather(*(post("flood", n, 10) for n in range(1, 8)))]
        assert flood.count(202) == 3, flood  # 30 flew, then spilled: the rest refused
        assert client.app[RECORD_SINK].backlog == 30
        calm = [await post("calm", n) for n in range(1, 6)]
    finally:
        process.send_signal(signal.SIGCONT)
    assert calm == [202] * 5


async def test_writes_in_flight_to_an_answering_kafka_are_held_against_no_one(
    app_client, make_settings, private_kafka_broker: KafkaBroker
) -> None:
    """A review: with a spill of 1,000 records, two 400-record batches of one tenant in
    flight to a healthy broker were refused as past its share, nothing spilled."""
    _, settings = await _on_fresh_topic(
        make_settings, private_kafka_broker, feature_dims=(4,), spill_max_records=1000,
    )
    client = await app_client(settings)
    sink = client.app[RECORD_SINK]
    for _round in range(3):
        writes = [
            sink.write(_outbound(400), tenants=[("t", 400)]) for _ in range(3)
        ]
        await asyncio.gather(*writes)  # none refused
    assert sink.backlog == 0
