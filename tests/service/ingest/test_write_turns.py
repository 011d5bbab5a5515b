"""The writes handed on in one turn of the event loop share one sink write, and each
caller is answered by that write's outcome as if it had written alone."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import structlog.testing

from mlgate.service.http.codec import Format
from mlgate.service.http.errors import Conflict
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.ingest.pipeline import IngestPipeline, Written
from mlgate.service.state import METRICS, RECORD_DEDUP, RECORD_SINK, RECORD_VALIDATOR
from mlgate.workers.errors import MailboxFull, SinkFailed
from mlgate.workers.lanes import SHARED_LANE
from mlgate.workers.sinks.records import OutboundRecord, RecordSink
from mlgate.workers.sinks.spilling_sink import SpillFull
from tests.conftest import AppClientFactory
from tests.service.ingest.sinks import WrappedSink
from tests.support import KafkaBroker, create_topic


class RecordingSink(WrappedSink):
    """The app's sink, with each write's size and lane kept; ``refuse`` makes the next
    writes raise it instead."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink)
        self.writes: list[int] = []
        self.lanes: list[str] = []
        self.refuse: Exception | None = None

    async def write(self, records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        self.writes.append(len(records))
        self.lanes.append(lane)
        if self.refuse is not None:
            raise self.refuse
        await super().write(records, lane, tenants)


async def _pipeline(
    app_client: AppClientFactory, settings: Any, sink_type: type[RecordingSink] = RecordingSink, **options: Any
) -> tuple[Any, IngestPipeline, Any]:
    """The app's pipeline parts around ``sink_type`` wrapping its sink; ``options``: the
    pipeline's own (``max_turn_records``)."""
    client = await app_client(settings)
    app = client.app
    sink = sink_type(app[RECORD_SINK])
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS], **options)
    return app, pipeline, sink


async def _write_all(pipeline: IngestPipeline, batches: list[ValidatedBatch]) -> list[Any]:
    """Each batch written by a caller of its own, all in one turn: answers or errors."""
    return await asyncio.gather(
        *(pipeline.write("t", batch, "track") for batch in batches), return_exceptions=True
    )


def _batch(pipeline: IngestPipeline, *ids: str) -> ValidatedBatch:
    records = [{"record_id": rid, "features": [1.0, 2.0, 3.0, 4.0]} for rid in ids]
    source, items = pipeline.decode(msgspec.json.encode({"source": "s", "records": records}), Format.JSON)
    return pipeline.validate(source, items)


async def test_writes_of_one_loop_turn_go_to_the_sink_as_one_write(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    app, pipeline, sink = await _pipeline(app_client, settings_for())
    batches = [_batch(pipeline, f"r{n}") for n in range(5)] + [_batch(pipeline, "r5", "r6")]

    answers = await asyncio.gather(
        *(pipeline.write("t", batch, f"track-{n}") for n, batch in enumerate(batches))
    )

    assert answers == [Written(accepted=1, duplicates=0)] * 5 + [Written(accepted=2, duplicates=0)]
    assert sink.writes == [7]
    assert app[RECORD_SINK].next_offset == 7
    retried = await asyncio.gather(*(pipeline.write("t", batch, "again") for batch in batches))
    assert retried == [Written(accepted=0, duplicates=1)] * 5 + [Written(accepted=0, duplicates=2)]
    assert sink.writes == [7]


async def test_writes_sharing_turns_are_each_settled_in_shared_dedup_state(
    app_client: AppClientFactory, settings_for: Any, backend: str | None
) -> None:
    """With Redis the claims answer at different times, so the writes share turns as
    their claims come back; however they are grouped, each is written once."""
    app, pipeline, sink = await _pipeline(app_client, settings_for(backend))
    batches = [_batch(pipeline, f"r{n}") for n in range(8)]

    answers = await asyncio.gather(*(pipeline.write("t", batch, "track") for batch in batches))

    assert answers == [Written(accepted=1, duplicates=0)] * 8
    assert sum(sink.writes) == app[RECORD_SINK].next_offset == 8
    retried = await asyncio.gather(*(pipeline.write("t", batch, "again") for batch in batches))
    assert retried == [Written(accepted=0, duplicates=1)] * 8
    assert app[RECORD_SINK].next_offset == 8


async def test_writes_of_separate_turns_are_separate_writes(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    _, pipeline, sink = await _pipeline(app_client, settings_for())

    await pipeline.write("t", _batch(pipeline, "a"), "track-1")
    await pipeline.write("t", _batch(pipeline, "b", "c"), "track-2")

    assert sink.writes == [1, 2]


async def test_a_refused_turn_fails_every_caller_and_releases_their_claims(
    app_client: AppClientFactory, settings_for: Any, backend: str | None
) -> None:
    app, pipeline, sink = await _pipeline(app_client, settings_for(backend))
    batches = [_batch(pipeline, f"r{n}") for n in range(3)]
    sink.refuse = MailboxFull("full")

    answers = await _write_all(pipeline, batches)

    assert [type(answer) for answer in answers] == [MailboxFull] * 3
    sink.refuse = None
    # Released: the retries write the records, they are no duplicates.
    retried = await asyncio.gather(*(pipeline.write("t", batch, "retry") for batch in batches))
    assert retried == [Written(accepted=1, duplicates=0)] * 3
    assert app[RECORD_SINK].next_offset == 3


async def test_a_failed_turn_fails_every_caller_and_keeps_their_ids_claimed(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    """A failure other than a refusal may follow a partial write: a retry within the
    lapse is a conflict, never a second write."""
    _, pipeline, sink = await _pipeline(app_client, settings_for(dedup_in_flight_wait_s=0.05))
    batches = [_batch(pipeline, "a"), _batch(pipeline, "b")]
    sink.refuse = SinkFailed("the broker answered an error")

    answers = await _write_all(pipeline, batches)

    assert [type(answer) for answer in answers] == [SinkFailed, SinkFailed]
    sink.refuse = None
    with pytest.raises(Conflict):
        await pipeline.write("t", batches[0], "retry")


async def test_a_caller_cancelled_in_its_turn_leaves_the_others_answered(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    app, pipeline, sink = await _pipeline(app_client, settings_for())
    loop = asyncio.get_running_loop()
    writes = [
        loop.create_task(pipeline.write("t", _batch(pipeline, rid), "track")) for rid in "abc"
    ]
    await asyncio.sleep(0)  # each has claimed its id and joined the turn
    writes[1].cancel()

    answers = await asyncio.gather(*writes, return_exceptions=True)

    assert answers[0] == answers[2] == Written(accepted=1, duplicates=0)
    assert isinstance(answers[1], asyncio.CancelledError)
    # Its record went with the turn and its claim was settled: a retry is a duplicate.
    assert sink.writes == [3]
    assert app[RECORD_SINK].next_offset == 3
    assert await pipeline.write("t", _batch(pipeline, "b"), "retry") == Written(accepted=0, duplicates=1)


async def test_the_same_id_twice_in_one_turn_is_written_once(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    """The second request finds the id in flight, waits for the first one's turn and
    counts it as a duplicate."""
    app, pipeline, sink = await _pipeline(app_client, settings_for())

    first, second = await asyncio.gather(
        pipeline.write("t", _batch(pipeline, "x"), "track-1"),
        pipeline.write("t", _batch(pipeline, "x"), "track-2"),
    )

    assert (first, second) == (Written(accepted=1, duplicates=0), Written(accepted=0, duplicates=1))
    assert app[RECORD_SINK].next_offset == 1


async def test_tenants_sharing_a_turn_keep_their_own_record_ids(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    _, pipeline, sink = await _pipeline(app_client, settings_for())

    answers = await asyncio.gather(
        pipeline.write("tenant-a", _batch(pipeline, "x"), "track-1"),
        pipeline.write("tenant-b", _batch(pipeline, "x"), "track-2"),
    )

    assert answers == [Written(accepted=1, duplicates=0)] * 2
    assert await pipeline.write("tenant-b", _batch(pipeline, "x"), "again") == Written(
        accepted=0, duplicates=1
    )


async def test_light_tenants_writes_of_one_turn_share_the_shared_lane(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    _, pipeline, sink = await _pipeline(app_client, settings_for())

    await asyncio.gather(
        pipeline.write("tenant-a", _batch(pipeline, "a1"), "track-1"),
        pipeline.write("tenant-b", _batch(pipeline, "b1", "b2"), "track-2"),
    )

    assert (sink.lanes, sink.writes) == ([SHARED_LANE], [3])


class GatedSink(RecordingSink):
    """A RecordingSink whose writes wait for ``opened`` before they go on."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink)
        self.opened = asyncio.Event()

    async def write(self, records: list[OutboundRecord], lane: str = "", tenants=()) -> None:
        self.writes.append(len(records))
        self.lanes.append(lane)
        await self.opened.wait()
        await self._sink.write(records, lane)


async def test_a_tenant_with_many_records_on_their_way_writes_in_a_lane_of_its_own(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    _, pipeline, sink = await _pipeline(app_client, settings_for(), GatedSink, max_turn_records=4)
    first = asyncio.ensure_future(pipeline.write("flood", _batch(pipeline, "f1", "f2", "f3", "f4"), "t1"))
    await asyncio.sleep(0.01)  # handed on, not answered: 4 records on their way
    later = [
        asyncio.ensure_future(pipeline.write("flood", _batch(pipeline, "f5"), "t2")),
        asyncio.ensure_future(pipeline.write("calm", _batch(pipeline, "c1"), "t3")),
    ]
    await asyncio.sleep(0.01)
    assert sink.lanes == [SHARED_LANE, "flood", SHARED_LANE]
    sink.opened.set()
    await asyncio.gather(first, *later)
    # Answered, flood is light again.
    await pipeline.write("flood", _batch(pipeline, "f6"), "t4")
    assert sink.lanes[-1] == SHARED_LANE


class SlowDedup:
    """The app's dedup, each confirm and release waiting ``round_trip_s`` first (a far
    Redis); counts how many run at once."""

    def __init__(self, dedup: Any, round_trip_s: float) -> None:
        self._dedup, self._round_trip_s = dedup, round_trip_s
        self.running = self.most_at_once = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dedup, name)

    async def _slowly(self, step: Any) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self._round_trip_s)
            await step
        finally:
            self.running -= 1

    async def confirm(self, tenant: str, claim: Any) -> None:
        await self._slowly(self._dedup.confirm(tenant, claim))

    async def release(self, tenant: str, claim: Any) -> None:
        await self._slowly(self._dedup.release(tenant, claim))


@pytest.mark.parametrize("refused", [False, True], ids=["confirmed", "released"])
async def test_the_claims_of_a_turn_in_redis_are_settled_at_once(
    app_client: AppClientFactory, settings_for: Any, redis_server: Any, refused: bool
) -> None:
    """Each claim is a round trip to Redis: the turn's callers must not wait for them
    one after another (nor their claims lapse meanwhile)."""
    client = await app_client(settings_for(f"redis://127.0.0.1:{redis_server.port}"))
    app = client.app
    dedup = SlowDedup(app[RECORD_DEDUP], 0.02)
    sink = RecordingSink(app[RECORD_SINK])
    sink.refuse = MailboxFull("full") if refused else None
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], dedup, sink, app[METRICS])  # type: ignore[arg-type]

    answers = await asyncio.gather(
        *(pipeline.write("t", _batch(pipeline, f"r{n}"), "track") for n in range(10)),
        return_exceptions=True,
    )

    expected = MailboxFull if refused else Written
    assert [type(answer) for answer in answers] == [expected] * 10
    # The claims came back from Redis over a few turns; each turn's settled at once.
    assert sum(sink.writes) == 10
    assert dedup.most_at_once >= max(sink.writes) > 1


async def test_a_turn_holds_at_most_max_turn_records(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    app, pipeline, sink = await _pipeline(app_client, settings_for(), max_turn_records=4)
    batches = [_batch(pipeline, "a", "b"), _batch(pipeline, "c", "d"), _batch(pipeline, "e", "f", "g", "h", "i")]

    answers = await asyncio.gather(*(pipeline.write("t", batch, "track") for batch in batches))

    assert [answer.accepted for answer in answers] == [2, 2, 5]
    # A write larger than the cap still goes, in a turn of its own.
    assert sink.writes == [4, 5]
    assert app[RECORD_SINK].next_offset == 9


def _spill_settings(make_settings: Any, broker: KafkaBroker, topic: str, fail_max: int) -> Any:
    return make_settings(
        feature_dims=(4,), kafka_bootstrap_servers=broker.bootstrap, kafka_topic=topic,
        kafka_request_timeout_ms=500, spill_max_records=3, spill_tenant_share=1.0,
        kafka_breaker_fail_max=fail_max,
        dedup_in_flight_wait_s=0.05,
    )


async def test_a_spill_without_room_for_the_turn_takes_the_writes_that_fit(
    app_client: AppClientFactory, make_settings: Any, private_kafka_broker: KafkaBroker
) -> None:
    """Kafka given up (breaker open) and room for 2 more records in the spill: of 5
    single-record writes in one turn, 2 are written, as they would have been one by
    one; the 3 refused are released, so their retry is written once there is room
    rather than locked (409)."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    client = await app_client(_spill_settings(make_settings, private_kafka_broker, topic, 1))
    app = client.app
    private_kafka_broker.stop()
    sink = RecordingSink(app[RECORD_SINK])
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS])
    # One write with the broker down spills and opens the breaker: the next ones go to
    # the spill without trying Kafka.
    assert await pipeline.write("t", _batch(pipeline, "first"), "track") == Written(1, 0)
    batches = [_batch(pipeline, f"r{n}") for n in range(5)]

    answers = await _write_all(pipeline, batches)

    assert sum(isinstance(answer, Written) and answer.accepted == 1 for answer in answers) == 2
    assert sum(isinstance(answer, SpillFull) for answer in answers) == 3
    refused = [batch for batch, answer in zip(batches, answers, strict=True) if isinstance(answer, SpillFull)]
    with pytest.raises(SpillFull):  # still no room, and not a conflict: released
        await pipeline.write("t", refused[0], "retry")


async def test_only_the_records_of_writes_answered_refused_are_counted_failed(
    app_client: AppClientFactory, make_settings: Any, private_kafka_broker: KafkaBroker
) -> None:
    """A review: a turn the full spill refused whole counted all its records failed,
    then the writes that fit were spilled (and answered 202) and the others counted
    again: ``failed``, the metric to alert on, read about twice what was refused."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    client = await app_client(_spill_settings(make_settings, private_kafka_broker, topic, 1))
    app = client.app
    private_kafka_broker.stop()
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], app[RECORD_DEDUP], app[RECORD_SINK], app[METRICS])
    assert await pipeline.write("t", _batch(pipeline, "first"), "track") == Written(1, 0)

    answers = await _write_all(pipeline, [_batch(pipeline, f"r{n}") for n in range(5)])

    registry = app[METRICS].registry
    counted = {
        outcome: registry.get_sample_value("mlgate_records_total", {"outcome": outcome}) or 0
        for outcome in ("spilled", "failed")
    }
    assert sum(isinstance(answer, SpillFull) for answer in answers) == 3
    assert counted == {"spilled": 3, "failed": 3}


async def test_records_kafka_took_before_the_spill_refused_the_rest_are_not_counted_failed(
    app_client: AppClientFactory, make_settings: Any
) -> None:
    """A review of the fix above: the pipeline counted the whole turn failed where Kafka
    had acknowledged part of it and the spill refused only the rest."""
    app, pipeline, sink = await _pipeline(app_client, make_settings(feature_dims=(4,)))
    sink.refuse = SpillFull("spill is full", nothing_written=False, records=2)
    with pytest.raises(SpillFull):
        await pipeline.write("t", _batch(pipeline, *(f"r{n}" for n in range(5))), "track")
    assert app[METRICS].registry.get_sample_value("mlgate_records_total", {"outcome": "failed"}) == 2


async def test_a_spill_without_room_after_kafka_was_tried_keeps_the_ids_claimed(
    app_client: AppClientFactory, make_settings: Any, private_kafka_broker: KafkaBroker
) -> None:
    """At an outage's start Kafka is still tried: it may hold records it did not
    acknowledge, so the turn is refused whole, its ids stay claimed (a retry within the
    lapse is 409, not a second write) and nothing is written again record by record."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    client = await app_client(_spill_settings(make_settings, private_kafka_broker, topic, 1000))
    app = client.app
    private_kafka_broker.stop()
    sink = RecordingSink(app[RECORD_SINK])
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS])
    batches = [_batch(pipeline, f"r{n}") for n in range(5)]

    answers = await _write_all(pipeline, batches)

    assert [type(answer) for answer in answers] == [SpillFull] * 5
    assert sink.writes == [5]
    with pytest.raises(Conflict):
        await pipeline.write("t", batches[0], "retry")


async def test_a_turn_refused_for_a_tenant_over_its_spill_share_writes_the_other_tenants_writes(
    app_client: AppClientFactory, make_settings: Any, private_kafka_broker: KafkaBroker
) -> None:
    """Kafka given up, the spill three quarters full (6 of 8) and "flood" holding more
    than its share (8 over 2 tenants): a turn of one write of each tenant is refused
    for the flood, then written write by write, so "calm"'s is written and the
    flood's refused."""
    topic = await create_topic(private_kafka_broker.bootstrap)
    settings = make_settings(
        feature_dims=(4,), kafka_bootstrap_servers=private_kafka_broker.bootstrap, kafka_topic=topic,
        kafka_request_timeout_ms=500, spill_max_records=8, kafka_breaker_fail_max=1,
    )
    client = await app_client(settings)
    app = client.app
    private_kafka_broker.stop()
    sink = RecordingSink(app[RECORD_SINK])
    pipeline = IngestPipeline(app[RECORD_VALIDATOR], app[RECORD_DEDUP], sink, app[METRICS])
    assert await pipeline.write("flood", _batch(pipeline, "f0"), "track") == Written(1, 0)
    assert await pipeline.write("calm", _batch(pipeline, "c0"), "track") == Written(1, 0)
    flood = _batch(pipeline, "f1", "f2", "f3", "f4")
    assert await pipeline.write("flood", flood, "track") == Written(4, 0)

    answers = await asyncio.gather(
        pipeline.write("flood", _batch(pipeline, "f5"), "track"),
        pipeline.write("calm", _batch(pipeline, "c1"), "track"),
        return_exceptions=True,
    )

    assert isinstance(answers[0], SpillFull)
    assert answers[1] == Written(1, 0)
    assert sink.writes[-3:] == [2, 1, 1]  # the turn, then each write alone
    assert app[RECORD_SINK].backlog == 7


async def test_a_fault_of_the_settling_itself_is_answered_logged_and_counted(
    app_client: AppClientFactory, settings_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a sink's answer but a bug in settling: every caller gets it (a 500, never a
    hang), and the crash has a log line and a count like any background task's."""
    app, pipeline, _ = await _pipeline(app_client, settings_for())

    async def broken(*_: Any) -> None:
        raise RuntimeError("settling broke")

    monkeypatch.setattr(pipeline, "_settle_claims", broken)
    crashes = app[METRICS].background_task_crashes.labels("ingest-settle")
    before = crashes._value.get()

    with structlog.testing.capture_logs() as logs:
        answers = await asyncio.gather(
            *(pipeline.write("t", _batch(pipeline, rid), "track") for rid in "ab"),
            return_exceptions=True,
        )
        await asyncio.sleep(0)  # the settling task's end is seen

    assert [type(answer) for answer in answers] == [RuntimeError, RuntimeError]
    assert crashes._value.get() == before + 1
    assert [entry["event"] for entry in logs if entry["log_level"] == "error"] == ["ingest_settle_crashed"]


async def test_a_tenant_whose_caller_went_away_keeps_its_lane_while_its_records_are_on_their_way(
    app_client: AppClientFactory, settings_for: Any
) -> None:
    _, pipeline, sink = await _pipeline(app_client, settings_for(), GatedSink, max_turn_records=4)
    gone = asyncio.ensure_future(pipeline.write("flood", _batch(pipeline, "f1", "f2", "f3", "f4"), "t1"))
    await asyncio.sleep(0.01)
    gone.cancel()  # the client went away; its records are still on their way
    await asyncio.sleep(0.01)
    later = asyncio.ensure_future(pipeline.write("flood", _batch(pipeline, "f5"), "t2"))
    await asyncio.sleep(0.01)
    assert sink.lanes == [SHARED_LANE, "flood"]
    sink.opened.set()
    await later
    await pipeline.write("flood", _batch(pipeline, "f6"), "t3")
    assert sink.lanes[-1] == SHARED_LANE
