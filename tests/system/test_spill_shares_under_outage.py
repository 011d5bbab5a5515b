"""A Kafka outage with one tenant flooding: whole-process, over real sockets. The flood
is refused at its share of the spill while a calm tenant's ingests are all accepted,
and once the broker is back every acknowledged record of both lands in Kafka.

The broker is frozen (SIGSTOP), not stopped: a Tansu restarted on memory storage has
lost its topics, and acknowledges a produce to a topic it does not have (the records
are gone), so a drainer forwarding before the test made the topic again would lose
them there, not in mlgate."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path

import aiohttp

from tests.conftest import ServiceFactory
from tests.support import KafkaBroker, KeyMaker, create_topic, read_topic, stop_process
from tests.system.test_faults import _kafka_env, unlabelled_metrics
from tests.system.test_spill_drain_under_freeze import _wait_for_empty_spill

SPILL_MAX = 3000


def _batch(prefix: str, number: int, size: int) -> dict[str, object]:
    return {
        "source": "outage",
        "records": [
            {"record_id": f"{prefix}-{number}-{i}", "features": [float(i), 1.0, 2.0, 3.0]}
            for i in range(size)
        ],
    }


async def _post_until(
    url: str, key: str, prefix: str, size: int, stop: asyncio.Event, accepted: set[str], statuses: Counter[int]
) -> None:
    """Post fresh batches until ``stop``, each once: a refused one is not retried."""
    number = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while not stop.is_set():
            body = _batch(prefix, number, size)
            async with session.post(f"{url}/api/v2/ingest", json=body, headers={"X-API-Key": key}) as answer:
                statuses[answer.status] += 1
                if answer.status == 202:
                    accepted.update(r["record_id"] for r in body["records"])  # type: ignore[index]
                else:
                    assert answer.status == 503, await answer.text()
                    assert answer.headers["Retry-After"].isdigit()
            number += 1
            await asyncio.sleep(0.05 if size < 100 else 0.01)


async def test_a_flooding_tenant_is_refused_at_its_spill_share_and_every_acknowledged_record_lands(
    service_process: ServiceFactory, private_kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    keys = KeyMaker(tmp_path / "keys.json")
    flood_key, calm_key = keys.create(tenant="flood", scopes="ingest"), keys.create(tenant="calm", scopes="ingest")
    topic = await create_topic(private_kafka_broker.bootstrap)
    service = service_process(
        **_kafka_env(private_kafka_broker, topic),
        MLGATE_AUTH_DISABLED="false",
        MLGATE_KEYS_FILE=str(keys.path),
        MLGATE_SPILL_MAX_RECORDS=str(SPILL_MAX),
    )
    assert private_kafka_broker.process is not None
    broker_pid = private_kafka_broker.process.pid
    stop_process(broker_pid)  # every thread stopped before the load begins
    stop = asyncio.Event()
    accepted: dict[str, set[str]] = {"flood": set(), "calm": set()}
    statuses: dict[str, Counter[int]] = {"flood": Counter(), "calm": Counter()}
    load = [
        *(
            _post_until(service.url, flood_key, f"flood{c}", 100, stop, accepted["flood"], statuses["flood"])
            for c in range(4)
        ),
        _post_until(service.url, calm_key, "calm", 5, stop, accepted["calm"], statuses["calm"]),
    ]
    tasks = [asyncio.create_task(producer) for producer in load]
    try:
        await asyncio.sleep(6)
        stop.set()
        await asyncio.gather(*tasks)
        backlog = (await unlabelled_metrics(service))["mlgate_spill_backlog_records"]
    finally:
        os.kill(broker_pid, signal.SIGCONT)

    print(f"\nflood {dict(statuses['flood'])} calm {dict(statuses['calm'])}")
    assert statuses["flood"][503] > 0
    assert statuses["calm"][503] == 0 and statuses["calm"][202] > 20
    # The flood stopped short of the bound, leaving the calm tenant room: at its share,
    # beyond it only by its first writes, which Kafka was tried for before they spilled.
    assert len(accepted["flood"]) + len(accepted["calm"]) < SPILL_MAX
    assert backlog == len(accepted["flood"]) + len(accepted["calm"])

    await _wait_for_empty_spill(service)
    acknowledged = accepted["flood"] | accepted["calm"]
    messages = await read_topic(private_kafka_broker.bootstrap, topic, expected=len(acknowledged), wait_s=60)
    assert acknowledged <= {m.key.decode() for m in messages}
    # Drained, the spill takes the flood again.
    async with aiohttp.ClientSession() as session:
        answer = await session.post(
            f"{service.url}/api/v2/ingest", json=_batch("after", 0, 100), headers={"X-API-Key": flood_key}
        )
        assert answer.status == 202
