"""The baseline: the raw aiokafka producer writing what mlgate would write.

Runs in its own process (``python -m bench.raw_producer OPTIONS_JSON``). The records
are built up front with mlgate's own validator (same keys, values and headers as the
service writes); the timed loop does what any keyed producer must: pick the partition
(aiokafka's murmur2 ``DefaultPartitioner``), fill one ``create_batch()`` per partition
up to ``max_batch_bytes``, and ``send_batch`` it with ``acks=all``. Records acknowledged
inside the measurement window count for throughput.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time

import msgspec
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from bench.child import MEASURING, WINDOW_END, emit, run_child
from bench.payload import RequestBodies, outbound_batches
from mlgate.workers.sinks.records import OutboundRecord


class RawOptions(msgspec.Struct, frozen=True, kw_only=True):
    bootstrap: str
    topic: str
    warmup_s: float
    duration_s: float
    batches: int
    records: int
    dims: int
    value_format: str = "json"
    shape: str = "bare"  # bench.payload.Shape
    body_format: str = "msgpack"
    single_float: bool | None = None
    # > 0: send this many records, however long it takes (duration_s is then a limit)
    total_records: int = 0
    seed: int = 0
    max_batch_bytes: int = 1024 * 1024
    linger_ms: int = 2


class RawResult(msgspec.Struct, frozen=True, kw_only=True):
    acked_total: int
    acked_in_window: int
    window_s: float
    kafka_batches: int
    errors: list[str]
    acked_per_s: list[int] = []  # records acknowledged in each second since the start


async def produce(options: RawOptions) -> RawResult:
    pool = outbound_batches(
        RequestBodies(
            options.batches,
            options.records,
            options.dims,
            options.seed,
            shape=options.shape,  # type: ignore[arg-type]
            body_format=options.body_format,  # type: ignore[arg-type]
            single_float=options.single_float,
        ),
        options.dims,
        options.value_format,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=options.bootstrap,
        acks="all",
        enable_idempotence=False,
        linger_ms=options.linger_ms,
        max_batch_size=options.max_batch_bytes,
        max_request_size=options.max_batch_bytes * 2,
        client_id="mlgate-bench-raw",
    )
    await producer.start()
    try:
        return await _produce(producer, pool, options)
    finally:
        await producer.stop()


async def _produce(
    producer: AIOKafkaProducer, pool: list[list[OutboundRecord]], options: RawOptions
) -> RawResult:
    partitions = sorted(await producer.partitions_for(options.topic))
    partitioner = DefaultPartitioner()
    builders: dict[int, BatchBuilder] = {p: producer.create_batch() for p in partitions}
    acks: list[asyncio.Future[object]] = []
    errors: list[str] = []
    totals = {"acked": 0, "window": 0, "sent": 0}
    per_second: list[int] = []

    started = time.perf_counter()
    window_start = started + options.warmup_s
    window_end = window_start + options.duration_s
    measuring = False

    def on_ack(count: int, done: asyncio.Future[object]) -> None:
        if done.cancelled() or done.exception() is not None:
            errors.append(repr(done.exception()) if not done.cancelled() else "cancelled")
            return
        totals["acked"] += count
        second = int(time.perf_counter() - started)
        per_second.extend([0] * (second + 1 - len(per_second)))
        per_second[second] += count
        if window_start <= time.perf_counter() <= window_end:
            totals["window"] += count

    async def send(partition: int) -> None:
        batch = builders[partition]
        builders[partition] = producer.create_batch()
        batch.close()
        count = batch.record_count()
        ack = await producer.send_batch(batch, options.topic, partition=partition)
        ack.add_done_callback(functools.partial(on_ack, count))
        acks.append(ack)

    for records in itertools.cycle(pool):
        now = time.perf_counter()
        if now >= window_end or 0 < options.total_records <= totals["sent"]:
            break
        totals["sent"] += len(records)
        if not measuring and now >= window_start:
            measuring = True
            emit(MEASURING)
        for record in records:
            partition = partitioner(record.key, partitions, partitions)
            appended = builders[partition].append(
                key=record.key, value=record.value, timestamp=None, headers=record.headers
            )
            if appended is None:
                await send(partition)
                builders[partition].append(
                    key=record.key, value=record.value, timestamp=None, headers=record.headers
                )
    if not measuring:
        emit(MEASURING)
    closed = min(time.perf_counter(), window_end)
    for partition, batch in builders.items():
        if batch.record_count():
            await send(partition)
    if options.total_records:  # the window lasts until the last acknowledgement
        await asyncio.gather(*acks, return_exceptions=True)
        closed = time.perf_counter()
    emit(WINDOW_END)
    await asyncio.gather(*acks, return_exceptions=True)
    return RawResult(
        acked_total=totals["acked"],
        acked_in_window=totals["window"],
        window_s=max(1e-9, closed - window_start),
        kafka_batches=len(acks),
        errors=errors[:5],
        acked_per_s=per_second,
    )


if __name__ == "__main__":
    run_child(RawOptions, produce)
