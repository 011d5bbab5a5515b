"""Ingestion into a real Kafka-protocol broker (Tansu), read back with a consumer."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec

from tests.support import KafkaBroker, read_topic


def _record(i: int, dim: int = 4) -> dict[str, object]:
    return {"record_id": f"r-{i}", "features": [float(i)] * dim, "label": 1.0}


async def test_accepted_records_land_in_kafka_once_with_headers(
    app_client, make_settings, kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    settings = make_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic, feature_dims=(4,)
    )
    client = await app_client(settings)
    records = [_record(i) for i in range(5)] + [{"record_id": "bad", "features": [1.0, 2.0]}]
    response = await client.post("/api/v2/ingest", json={"source": "sensors", "records": records})
    assert response.status == 202
    body = await response.json()
    assert (body["records_accepted"], body["records_rejected"]) == (5, 1)

    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=5)
    assert sorted(m.key for m in messages) == [f"r-{i}".encode() for i in range(5)]
    for message in messages:
        headers = dict(message.headers)
        assert headers["source"] == b"sensors"
        assert headers["tracking_id"] == body["tracking_id"].encode()
        assert headers["schema_version"] == b"1"
        value = msgspec.json.decode(message.value)
        assert value["source"] == "sensors" and value["record_id"] == message.key.decode()


async def test_concurrent_requests_each_land_exactly_once(
    app_client, make_settings, kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    settings = make_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic, feature_dims=(4,)
    )
    client = await app_client(settings)

    async def post(batch: int) -> int:
        records = [_record(batch * 100 + i) for i in range(50)]
        response = await client.post(
            "/api/v2/ingest",
            data=msgspec.msgpack.encode({"source": "s", "records": records}),
            headers={"Content-Type": "application/msgpack"},
        )
        return response.status

    statuses = await asyncio.gather(*(post(b) for b in range(20)))
    assert statuses == [202] * 20
    messages = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=1000)
    counts = Counter(m.key for m in messages)
    assert len(counts) == 1000 and set(counts.values()) == {1}


async def test_msgpack_value_format_writes_msgpack_values(
    app_client, make_settings, kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    settings = make_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap,
        kafka_topic=kafka_topic,
        feature_dims=(4,),
        value_format="msgpack",
    )
    client = await app_client(settings)
    response = await client.post("/api/v2/ingest", json={"source": "s", "records": [_record(7)]})
    assert response.status == 202
    [message] = await read_topic(kafka_broker.bootstrap, kafka_topic, expected=1)
    assert msgspec.msgpack.decode(message.value)["features"] == [7.0] * 4


async def test_fully_rejected_batch_writes_nothing(
    app_client, make_settings, kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    settings = make_settings(
        kafka_bootstrap_servers=kafka_broker.bootstrap, kafka_topic=kafka_topic, feature_dims=(4,)
    )
    client = await app_client(settings)
    response = await client.post(
        "/api/v2/ingest", json={"source": "s", "records": [{"features": [1.0]}]}
    )
    assert response.status == 422
    assert await read_topic(kafka_broker.bootstrap, kafka_topic, expected=0, wait_s=2) == []
