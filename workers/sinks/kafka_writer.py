"""KafkaWriter: the actor that turns queued record batches into acknowledged Kafka writes.

Requests put ``(records, future)`` items in one bounded mailbox, each in a lane (the
shared one, or a heavy tenant's own: ``IngestPipeline``): the lanes take turns
(``LaneMailbox``), so a flooding tenant's queued writes do not hold up the others'.
The single writer task
takes what is waiting (up to ``writer_max_batch_records``), groups it by partition
(the Java client's murmur2 partitioner on ``record_id``, in C: ``partitions_for``),
sends one Kafka batch per partition with ``acks=all``, and resolves each request's future once every batch that
holds one of its records is acknowledged. Sends are pipelined up to
``writer_max_in_flight`` batches; aiokafka has no memory bound of its own, so the
mailbox in front of it is the bound.

A request that fails raises ``KafkaWriteFailed``, which tells its records apart:

    written          acknowledged (acks=all): never to be sent again
    not written      never handed to the producer, or refused by the broker (no
                     connection to it, a broker error answer): safe to send again
    outcome unknown  sent, then no answer (request timeout, connection lost with the
                     request in flight, a cancelled send): the broker may hold them,
                     so sending them again may duplicate them

Without the idempotent producer aiokafka gives a batch ``request_timeout_ms`` in all
(its batch TTL), so a produce that times out fails here and is not retried by the
producer. With it (``kafka_enable_idempotence``) aiokafka retries a timed-out or
refused batch itself, with the same producer id and sequence numbers (the broker drops
the repeat), and never fails it for a timeout: the writer does not either, and
``stalled`` tells the sink to spill new requests meanwhile. Either way a caller of
``write_within`` stops waiting at its deadline: its records not acknowledged by then
spill, and those the writer had taken may land twice.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TypeAlias

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    NotEnoughReplicasAfterAppendError,
    RequestTimedOutError,
)
from aiokafka.producer.message_accumulator import BatchBuilder
from murmurhash2 import murmurhash2

from mlgate.config import Settings
from mlgate.workers.actor import Actor
from mlgate.workers.errors import SinkFailed, WorkerClosed
from mlgate.workers.lanes import SHARED_LANE, LaneMailbox
from mlgate.workers.sinks.produce_request import lean_produce_requests
from mlgate.workers.sinks.record_batch import RecordBatchBuilder
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.telemetry import NO_TELEMETRY, WorkerTelemetry

log = structlog.get_logger("mlgate.kafka_writer")
# The longest a writer's close waits for its producer to stop.
PRODUCER_STOP_S = 1.0


class KafkaWriteFailed(SinkFailed):
    """Some records of a request were not acknowledged.

    ``unwritten``: those records (not written, or with an unknown outcome), in request
    order; ``outcome_unknown``: how many of them the broker may have written anyway.
    """

    def __init__(
        self,
        message: str,
        unwritten: list[OutboundRecord],
        outcome_unknown: int,
        *,
        never_sent: bool = False,
    ) -> None:
        super().__init__(message)
        self.unwritten = unwritten
        self.outcome_unknown = outcome_unknown
        # None of the request's records was ever handed to the producer.
        self.never_sent = never_sent


def outcome_unknown(error: BaseException) -> bool:
    """Whether a batch that failed with ``error`` after it was handed to the producer
    may have been written all the same."""
    if isinstance(error, RequestTimedOutError | KafkaConnectionError | NotEnoughReplicasAfterAppendError):
        return True  # sent, and the answer was lost (or says: written, not replicated)
    # No connection to the broker (NodeNotReadyError), a broker's refusal, a batch that
    # expired in the producer's queue before it was sent: not written.
    return not isinstance(error, KafkaError)


class _Batch:
    """What became of one Kafka batch once handed to the producer: set once, when its
    answer comes, for every request with records in it (not record by record)."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = _SENT


# A batch's states: handed to the producer and not answered (or answered with no
# word on it: outcome unknown), acknowledged, refused by the broker (not written).
_SENT, _WRITTEN, _REFUSED = "sent", "written", "refused"


@dataclass(eq=False)
class _Pending:
    records: list[OutboundRecord]
    future: asyncio.Future[None]
    lane: str = SHARED_LANE  # the lanes take turns (``LaneMailbox``)
    batches_left: int = 0
    errors: list[BaseException] = field(default_factory=list)
    # This request's records in each batch handed to the producer, with that batch:
    # read only if the request fails, to tell its records apart.
    handed: list[tuple[list[OutboundRecord], _Batch]] = field(default_factory=list)
    gave_up: bool = False  # its caller stopped waiting (``KafkaWriter.write_within``)

    def give_up(self) -> None:
        """Stop waiting: the future cancelled, so the writer skips it if it has not
        taken it yet and its late answer goes nowhere."""
        if not self.future.done():
            self.gave_up = True
            self.future.cancel()
            if self.batches_left == 0:  # never taken, never to be: its records can go
                self.records = []

    def batch_done(self, error: BaseException | None) -> None:
        if error is not None:
            self.errors.append(error)
        self.batches_left -= 1
        if self.batches_left == 0 and not self.future.done():
            if self.errors:
                self.future.set_exception(self._failure())
            else:
                self.future.set_result(None)

    def _failure(self) -> KafkaWriteFailed:
        def ids(*states: str) -> set[int]:
            return {id(r) for records, batch in self.handed if batch.state in states for r in records}

        written, refused = ids(_WRITTEN), ids(_REFUSED)
        sent = ids(_SENT, _WRITTEN, _REFUSED)
        unwritten = [r for r in self.records if id(r) not in written]
        # Sent and neither acknowledged nor refused: a batch whose answer never came.
        unknown = sum(1 for r in unwritten if id(r) in sent and id(r) not in refused)
        return KafkaWriteFailed(
            f"Kafka write failed: {self.errors[0]!r}", unwritten=unwritten, outcome_unknown=unknown
        )


def build_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        linger_ms=settings.kafka_linger_ms,
        max_batch_size=settings.kafka_max_batch_bytes,
        max_request_size=settings.kafka_max_batch_bytes * 2,
        request_timeout_ms=settings.kafka_request_timeout_ms,
        compression_type=None if settings.kafka_compression == "none" else settings.kafka_compression,
        client_id="mlgate",
    )


Batch: TypeAlias = BatchBuilder | RecordBatchBuilder


class KafkaWriter(Actor[_Pending]):
    name = "kafka"

    def __init__(
        self,
        settings: Settings,
        producer: AIOKafkaProducer | None = None,
        telemetry: WorkerTelemetry = NO_TELEMETRY,
    ) -> None:
        # Lane by lane: a write waits for one of each other lane's at most, not for all
        # the writes a flooding tenant queued in its own before it.
        super().__init__(settings.writer_mailbox_size, LaneMailbox, telemetry)
        self._settings = settings
        self._telemetry = telemetry
        self._topic = settings.kafka_topic
        self._given_producer = producer
        # Built in start(): a producer that failed to start cannot start again.
        self._producer: AIOKafkaProducer | None = None
        self._in_flight = asyncio.Semaphore(settings.writer_max_in_flight)
        # The error of this round's first batch the producer would not take, if any.
        self._round_failure: BaseException | None = None
        self._partitions: list[int] = []
        self._last_error: str | None = None
        # Batches handed to the producer and not answered, and when the last answer
        # came (or the first of them was sent): see ``stalled``.
        self._unanswered = 0
        # Writes waiting for Kafka's answer within a time (``write_within``).
        self._waiting: set[_Pending] = set()
        # While the writer lingers: the future the last answer sets (``_linger``).
        self._lingering: asyncio.Future[None] | None = None
        self._last_answer = time.monotonic()
        # When Kafka last took a batch or answered a probe (``probe``).
        self.answered_ok_at = -math.inf

    @property
    def _running_producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "KafkaWriter used before start()"
        return self._producer

    @property
    def started(self) -> bool:
        return self._task is not None

    @property
    def stalled(self) -> bool:
        """Batches are in flight and none has been answered for a request timeout: the
        broker is not answering (only the idempotent producer waits that long: without
        it the batches fail by then)."""
        timeout_s = self._settings.kafka_request_timeout_ms / 1000
        return self._unanswered > 0 and time.monotonic() - self._last_answer > timeout_s

    @property
    def unanswered_s(self) -> float:
        """How long batches have been in flight with none answered (since the last
        answer, or since the first of them went out); 0 with none in flight."""
        if not self._unanswered:
            return 0.0
        return time.monotonic() - self._last_answer

    async def probe(self, timeout_s: float) -> str | None:
        """Why no broker answered a metadata request within ``timeout_s``, or None when
        one did. Nothing else asks Kafka on a quiet host: an outage there was seen only
        when a write paid its timeout (a review)."""
        if self._producer is None:
            return "the writer has not started"
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            return repr(exc)
        self.answered_ok_at = time.monotonic()
        return None

    async def start(self) -> None:
        """Connect and learn the topic's partitions; may be retried after a failure."""
        producer = self._given_producer or build_producer(self._settings)
        lean_produce_requests(producer.client)
        try:
            await producer.start()
            partitions = await asyncio.wait_for(
                producer.partitions_for(self._topic),
                self._settings.kafka_request_timeout_ms / 1000,
            )
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._partitions = sorted(partitions)
        self._launch()
        log.info("kafka_writer_started", topic=self._topic, partitions=len(self._partitions))

    def submit(self, records: list[OutboundRecord], lane: str = SHARED_LANE) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self._new_future()
        self._enqueue(_Pending(records, future, lane))
        return future

    async def write(self, records: list[OutboundRecord], lane: str = SHARED_LANE) -> None:
        await self.submit(records, lane)

    async def write_within(
        self, records: list[OutboundRecord], seconds: float, lane: str = SHARED_LANE
    ) -> None:
        """``write``, waiting at most ``seconds`` for Kafka's answer: then
        ``KafkaWriteFailed`` with every record unwritten, their outcome unknown if the
        writer had taken the request (it may still send them) and none if it had not
        (it never will: a request given up is skipped). A broker that stops answering
        fails each round of writes only after a request timeout of its own, so the
        writes queued behind the first waited one timeout more each (25 s for the
        fifth, every tenant's ingests refused meanwhile)."""
        item = _Pending(records, self._new_future(), lane)
        self._enqueue(item)
        loop = item.future.get_loop()
        began = loop.time()
        # A timer, not ``asyncio.wait_for`` (a task and a shield on every write).
        timer = loop.call_later(seconds, item.give_up)
        self._waiting.add(item)
        try:
            await item.future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not item.gave_up or (task is not None and task.cancelling()):
                raise  # a cancellation of this task's own, even one with the give-up
            taken = item.batches_left > 0
            # What Kafka acknowledged already stays there (a write over several
            # partitions may be answered in part); the rest may land late.
            written = {
                id(record) for batch_records, batch in item.handed if batch.state == _WRITTEN
                for record in batch_records
            }
            unwritten = [record for record in records if id(record) not in written]
            # Given up early when shutting down (``give_up_waiting``): the time waited,
            # not the time allowed (a review: "within 30 s" 4 s after the signal).
            waited = min(seconds, loop.time() - began)
            raise KafkaWriteFailed(
                f"Kafka did not answer within {round(waited, 1):g} s",
                unwritten=unwritten,
                outcome_unknown=len(unwritten) if taken else 0,
                never_sent=not taken,
            ) from None
        finally:
            timer.cancel()
            self._waiting.discard(item)

    def give_up_waiting(self) -> int:
        """End every ``write_within`` wait now, as its time would (shutting down, its
        request cannot wait for a broker that stopped answering); how many there were."""
        waiting = list(self._waiting)
        for item in waiting:
            item.give_up()
        return len(waiting)

    async def _release(self) -> None:
        """Stop the producer once the writer task has stopped, for at most
        ``PRODUCER_STOP_S``: drained, it holds nothing and stops at once; not drained
        (a broker that stopped answering), what it holds was given up by its writes
        (``write_within``) and spilled, or failed, and its stop would wait for the
        frozen broker, the shutdown past its budget (a review)."""
        if self._producer is not None:
            stop_s = PRODUCER_STOP_S
            try:
                await asyncio.wait_for(self._producer.stop(), stop_s)
            except TimeoutError:
                log.warning("kafka_producer_stop_timeout", seconds=stop_s)

    async def _drained(self) -> None:
        await self._mailbox.join()
        # Wait until every in-flight batch has been acknowledged.
        for _ in range(self._settings.writer_max_in_flight):
            await self._in_flight.acquire()

    async def _run(self) -> None:
        limit = self._settings.writer_max_batch_records
        linger_s = self._settings.kafka_linger_ms / 1000
        while True:
            first = await self._mailbox.get()
            if first.future.done():  # given up by its caller (``write_within``): never sent
                self._mailbox.task_done()
                continue
            taken = [first]
            # Each item holds one count while it is being dispatched, so a fast ack of its
            # first partition batch cannot resolve it before its last batch is sent.
            taken[0].batches_left = 1
            error: BaseException | None = None
            try:
                if linger_s and self._unanswered:
                    await self._linger(linger_s)
                count = len(taken[0].records)
                while count < limit and not self._mailbox.empty():
                    item = self._mailbox.get_nowait()
                    if item.future.done():
                        self._mailbox.task_done()
                        continue
                    item.batches_left = 1
                    taken.append(item)
                    count += len(item.records)
                self._round_failure = None
                await self._send(taken)
            except Exception as exc:
                log.error("kafka_send_failed", error=repr(exc))
                error = exc
            except BaseException:
                # Cancelled mid-dispatch (close past its budget): what was not sent must
                # fail, never resolve as written.
                error = WorkerClosed("Kafka writer stopped while sending")
                raise
            finally:
                for item in taken:
                    item.batch_done(error)
                    self._mailbox.task_done()

    async def _linger(self, linger_s: float) -> None:
        """Wait until the batches in flight are all answered, for at most ``linger_s``.

        While batches are in flight nothing is gained by sending at once, and what
        arrives meanwhile joins this turn: a stream of single-record requests makes a
        few large Kafka batches instead of one per request (aiokafka's cost is mostly
        per batch). Batch size then follows the load, and an idle writer sends at once.
        A bare future and a timer: ``asyncio.timeout`` and ``Event.wait`` each ask the
        process id (Python 3.11), on every turn of a busy writer."""
        lingering = self._lingering = self._new_future()
        timer = lingering.get_loop().call_later(linger_s, _resolve, lingering)
        try:
            await lingering
        finally:
            timer.cancel()
            self._lingering = None

    async def _send(self, items: list[_Pending]) -> None:
        if self._settings.kafka_compression == "none":
            await self._send_ours(items)
            return
        by_partition: dict[int, list[tuple[OutboundRecord, _Pending]]] = defaultdict(list)
        entries = [(record, item) for item in items for record in item.records]
        chosen = partitions_for([record.key for record, _ in entries], self._partitions)
        for entry, partition in zip(entries, chosen, strict=True):
            by_partition[partition].append(entry)
        for partition, entries in by_partition.items():
            await self._send_partition(partition, entries)

    async def _send_partition(
        self, partition: int, entries: list[tuple[OutboundRecord, _Pending]]
    ) -> None:
        batch = self._new_batch()
        members: dict[_Pending, list[OutboundRecord]] = defaultdict(list)
        for record, item in entries:
            if not self._append(batch, record):
                if members:
                    await self._dispatch(batch, partition, members)
                    batch, members = self._new_batch(), defaultdict(list)
                if not self._append(batch, record):
                    item.errors.append(SinkFailed("record larger than the Kafka batch size"))
                    continue
            members[item].append(record)
        if members:
            await self._dispatch(batch, partition, members)

    async def _send_ours(self, items: list[_Pending]) -> None:
        """``_send`` with our builder: each partition's records in request order, with
        how many of them each request has in a row (no entry a record), each batch
        filled in one call (``extend``). It takes any record into an empty batch, so
        every batch holds one at least."""
        records_of: dict[int, list[OutboundRecord]] = defaultdict(list)
        runs_of: dict[int, list[tuple[_Pending, int]]] = defaultdict(list)
        for item in items:
            chosen = partitions_for([record.key for record in item.records], self._partitions)
            for record, partition in zip(item.records, chosen, strict=True):
                records_of[partition].append(record)
            for partition, count in Counter(chosen).items():
                runs_of[partition].append((item, count))
        for partition, records in records_of.items():
            runs = iter(runs_of[partition])
            item, left = next(runs)
            start = 0
            while start < len(records):
                batch = RecordBatchBuilder(self._settings.kafka_max_batch_bytes)
                end = start + batch.extend(records, start)
                members: dict[_Pending, list[OutboundRecord]] = {}
                position = start
                while position < end:
                    if not left:
                        item, left = next(runs)
                    taken = min(left, end - position)
                    members[item] = records[position : position + taken]
                    position += taken
                    left -= taken
                await self._dispatch(batch, partition, members)
                start = end

    def _new_batch(self) -> Batch:
        """aiokafka's builder, which compresses (``MLGATE_KAFKA_COMPRESSION``);
        uncompressed batches are ours (``_send_ours``)."""
        return self._running_producer.create_batch()

    @staticmethod
    def _append(batch: Batch, record: OutboundRecord) -> bool:
        appended = batch.append(
            key=record.key, value=record.value, timestamp=None, headers=record.headers
        )
        return appended is not None

    async def _dispatch(
        self, batch: Batch, partition: int, members: dict[_Pending, list[OutboundRecord]]
    ) -> None:
        for item in members:
            item.batches_left += 1
        records = batch.record_count()
        batch.close()
        if self._round_failure is not None:
            # An earlier batch of this round was not taken within the request timeout
            # (the producer's queue for its partition did not drain: Kafka is not
            # answering): the rest fail at once, never handed over (not written), for
            # the sink to spill, rather than each waiting out the timeout in turn (a
            # large request took minutes, and every write queued behind it waited).
            self._telemetry.kafka_batch_failed(records)
            for item in members:
                item.batch_done(self._round_failure)
            return
        acquired = False
        try:
            await self._in_flight.acquire()
            acquired = True
            sent_at = time.perf_counter()
            ack = await self._running_producer.send_batch(batch, self._topic, partition=partition)
        except BaseException as exc:
            # This batch's count must be given back whatever happened, a cancellation
            # (close past its budget) included, or its requests would wait forever.
            if acquired:
                self._in_flight.release()
            self._telemetry.kafka_batch_failed(records)
            error = exc if isinstance(exc, Exception) else WorkerClosed("send cancelled")
            for item in members:
                item.batch_done(error)
            if not isinstance(exc, Exception):
                raise
            self._round_failure = error
            return
        # Handed to the producer: from here on it may reach the broker.
        handed = _Batch()
        for item, records_of_item in members.items():
            item.handed.append((records_of_item, handed))
        if self._unanswered == 0:
            self._last_answer = time.monotonic()
        self._unanswered += 1

        def on_ack(done: asyncio.Future[object]) -> None:
            self._in_flight.release()
            self._unanswered -= 1
            if not self._unanswered and self._lingering is not None:
                _resolve(self._lingering)
            self._last_answer = time.monotonic()
            error = WorkerClosed("send cancelled") if done.cancelled() else done.exception()
            if error is None:
                handed.state = _WRITTEN
                self.answered_ok_at = self._last_answer
                self._telemetry.kafka_batch_acked(records, time.perf_counter() - sent_at)
            else:
                if not outcome_unknown(error):
                    handed.state = _REFUSED
                self._last_error = repr(error)
                self._telemetry.kafka_batch_failed(records)
            for item in members:
                item.batch_done(error)

        ack.add_done_callback(on_ack)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# -- partitioning ------------------------------------------------------------------------

_MURMUR2_SEED = 0x9747B28C


def partitions_for(keys: list[bytes], partitions: list[int]) -> list[int]:
    """The partition of each key, exactly as aiokafka's ``DefaultPartitioner`` (the Java
    client's) picks it: ``partitions[(murmur2(key) & 0x7fffffff) % len(partitions)]``,
    with the C murmur2 of the ``murmurhash2`` package (0.2 us a key; aiokafka's pure
    Python one takes 6 us)."""
    count = len(partitions)
    return [partitions[(murmurhash2(key, _MURMUR2_SEED) & 0x7FFFFFFF) % count] for key in keys]
