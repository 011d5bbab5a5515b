"""Issue 11's reproduction, whole-process: small spill segments and drain batches, the
broker frozen under ingest load, then resumed. The drainer must forward the whole
backlog (it once died on a segment it had deleted under its own cursor), and every
duplicate in the topic must be one the service counted as possibly resent."""

from __future__ import annotations

import asyncio

from tests.conftest import ServiceFactory
from tests.service_process import ServiceProcess
from tests.support import KafkaBroker, create_topic
from tests.system.test_faults import (
    Account,
    _kafka_env,
    _run_load,
    freeze,
    settle,
    unlabelled_metrics,
)


async def _wait_for_empty_spill(service: ServiceProcess, limit_s: float = 60.0) -> None:
    for _ in range(int(limit_s / 0.2)):
        if (await unlabelled_metrics(service)).get("mlgate_spill_backlog_records") == 0:
            return
        await asyncio.sleep(0.2)
    notable = [e for e in service.events() if e.get("event") != "request"]
    raise AssertionError(f"the spill never drained: {notable[-10:]}")


async def test_spill_in_small_segments_drains_after_a_frozen_broker_resumes(
    service_process: ServiceFactory, private_kafka_broker: KafkaBroker
) -> None:
    topic = await create_topic(private_kafka_broker.bootstrap)
    service = service_process(
        **_kafka_env(private_kafka_broker, topic),
        MLGATE_LOG_SEGMENT_BYTES="4096",
        MLGATE_SPILL_DRAIN_BATCH_RECORDS="100",
    )
    account = Account("broker frozen 3 s, spill in 4 KiB segments")
    await _run_load(service, account, "frozen", freeze(private_kafka_broker, 3))
    await _wait_for_empty_spill(service)
    await settle(account, private_kafka_broker.bootstrap, topic)
    metrics = await unlabelled_metrics(service)
    print(f"resent={metrics.get('mlgate_records_resent_total')}")
    assert account.lost == 0
    assert "background_task_crashed" not in {event.get("event") for event in service.events()}
    assert account.duplicates <= metrics["mlgate_records_resent_total"]
