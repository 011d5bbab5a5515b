"""SpillingKafkaSink: Kafka first, the local log when Kafka fails, nothing lost between.

    write(records)
      ├── spill backlog empty and breaker closed → KafkaWriter (acks=all)
      │     └── produce fails / breaker trips → spill
      └── otherwise → spill (LocalLogWriter under <data_dir>/spill, fsync'd)
    drainer task: spill → KafkaWriter, in log order, once the breaker lets calls through;
                  after each ack the segments wholly below the forwarded offset are
                  deleted, then it is fsync'd to ``forwarded.offset`` (a failed write,
                  a full disk, is retried with the next ack). It is supervised: a
                  crash makes the sink unhealthy while records wait, and the restarted
                  loop reads on from ``forwarded.offset``.

Delivery is at least once, keyed by ``record_id``. A failed Kafka write spills only the
records Kafka did not acknowledge (``KafkaWriteFailed.unwritten``), and a failed drain
batch is retried with those alone; records whose produce outcome is unknown (a
timeout) may reach Kafka twice and are counted (``records_resent``). New requests also
spill while the writer is ``stalled`` (the idempotent producer waiting on a silent
broker), rather than queueing behind it.

While a backlog exists new records spill too, and the drainer forwards nothing while
a write sent directly before it is unanswered, so records of one key reach Kafka in
the order they were accepted. A full spill (``spill_max_records``), or a tenant past
its share of it (``SpillShares``), is where a write is refused (``SpillFull``). A
crash between an ack and the offset file write re-sends at most one drain batch on
restart. A write's ``lane`` goes with it to the Kafka writer (``LaneMailbox``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from mlgate.config import Settings, worker_data_dir
from mlgate.workers.breaker import Breaker, BreakerOpen
from mlgate.workers.errors import MailboxFull, SinkFailed, WorkerClosed, WorkerError
from mlgate.workers.sinks.kafka_writer import KafkaWriteFailed, KafkaWriter
from mlgate.workers.sinks.local_log import LogCursor, delete_segments_before, segments
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.sinks.spill_shares import Claim, SpillShares, TenantRuns, runs_of
from mlgate.workers.supervision import SupervisedTask
from mlgate.workers.telemetry import NO_TELEMETRY, WorkerTelemetry

log = structlog.get_logger("mlgate.spill")

OFFSET_FILE = "forwarded.offset"
_KAFKA_FAILURES = (SinkFailed, WorkerClosed, BreakerOpen, TimeoutError, OSError)


# The part of a request timeout Kafka may take to answer before the writes in flight
# count against their tenants' shares of the spill at the door of a new direct write.
FLYING_COUNTS_AFTER = 0.25


class SpillFull(WorkerError):
    """The spill holds ``spill_max_records`` records not yet forwarded, or the
    writing tenant its share of them (``SpillShares``).
    ``nothing_written``: refused before any of the records went anywhere (Kafka was
    not tried), so none of them can land. ``records``: how many the spill refused
    (those of the write Kafka did not acknowledge)."""

    def __init__(self, message: str, *, nothing_written: bool = False, records: int = 0) -> None:
        super().__init__(message)
        self.nothing_written = nothing_written
        self.records = records


@dataclass(slots=True)
class _DrainBatch:
    records: list[OutboundRecord]  # those not yet acknowledged by Kafka
    end: int  # the forwarded offset once they are
    offsets: int  # spill offsets it covers (damaged frames included)


def read_forwarded_offset(directory: Path) -> int:
    """The offset in ``forwarded.offset``; 0 when there is none, or when it holds no
    number (damaged on disk, or edited): the spill is then forwarded from its first
    segment again, at least once, rather than the process failing to start with every
    spilled record stranded (a review)."""
    path = directory / OFFSET_FILE
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except ValueError as exc:  # UnicodeDecodeError too
        log.error("spill_offset_unreadable", path=str(path), error=repr(exc), forwarded_from="the first segment")
        return 0


def forwarded_on_disk(directory: Path) -> int:
    """``forwarded.offset``, or the first offset the spill still holds where that is
    higher: segments go before the file is written (``_mark_forwarded``), and a crash
    between leaves the file behind them. What they held was all acknowledged."""
    held = segments(directory)
    return max(read_forwarded_offset(directory), int(held[0].stem) if held else 0)


def write_forwarded_offset(directory: Path, offset: int) -> None:
    temporary = directory / (OFFSET_FILE + ".tmp")
    with temporary.open("w") as handle:
        handle.write(str(offset))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / OFFSET_FILE)


class SpillingKafkaSink:
    name = "kafka"

    def __init__(self, settings: Settings, telemetry: WorkerTelemetry = NO_TELEMETRY) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._kafka = KafkaWriter(settings, telemetry=telemetry)
        self._directory = Path(worker_data_dir(settings)) / "spill"
        self._spill = LocalLogWriter(
            self._directory,
            mailbox_size=settings.writer_mailbox_size,
            segment_bytes=settings.log_segment_bytes,
            telemetry=telemetry,
            spill=True,
        )
        self.breaker = Breaker(
            "kafka",
            fail_max=settings.kafka_breaker_fail_max,
            reset_s=settings.kafka_breaker_reset_s,
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spill-drainer")
        # The offset below which Kafka acknowledged every spilled record. The backlog is
        # counted from the log's offsets, not kept as a count of its own: a count missed
        # what a cancelled write still spilled, and what a drainer that crashed between
        # an ack and its offset file sent twice.
        self._forwarded = 0
        self._shares = SpillShares(settings.spill_max_records, settings.spill_tenant_share)
        self._spilled = asyncio.Event()
        # Why the Kafka writer could not start, while it cannot (None once it has):
        # writes then spill without calling the breaker, which never hears of it.
        self._kafka_unreachable: str | None = None
        # Why Kafka did not answer the last probe, and when it failed (``probe_kafka``);
        # when the last probe began.
        self._probe_failed: tuple[str, float] | None = None
        self._probed_at = -math.inf
        # Writes sent to Kafka directly and not yet answered: the drainer waits for
        # them (``_direct_writes_done``) before it forwards what spilled after them.
        self._direct_writes = 0
        self._direct_writes_done = asyncio.Event()
        self._direct_writes_done.set()
        self._cursor = LogCursor(self._directory, 0)
        self._drainer = SupervisedTask("spill-drainer", self._drain_forever, telemetry)
        self._between_batches = asyncio.Event()  # clear while a drain batch is in flight
        self._between_batches.set()
        self._closed = False

    @property
    def healthy(self) -> bool:
        """Able to accept writes (Kafka or, failing that, the spill has room) and not
        stuck: with records spilled, the drainer must be running."""
        return (
            not self._closed
            and self._spill.healthy
            and self.backlog < self._settings.spill_max_records
            and (self.backlog == 0 or self._drainer.healthy)
        )

    @property
    def problem(self) -> str | None:
        if self.healthy:
            return None
        if self._closed:
            return "closed"
        if not self._spill.healthy:
            return f"spill: {self._spill.problem}"
        if self.backlog >= self._settings.spill_max_records:
            return (
                f"spill full: {self.backlog} records wait for Kafka "
                "(MLGATE_SPILL_MAX_RECORDS)"
            )
        return f"{self.backlog} spilled records wait for Kafka and the drainer is not running"

    @property
    def degraded(self) -> str | None:
        """Kafka failing or behind while writes still succeed (they spill): what
        ``/ready`` lists under ``degraded``, staying ready (a review: an operator saw a
        Kafka outage in the metrics and the logs only; another, Kafka down since the
        start, in the logs only)."""
        waiting = self.backlog
        if self.kafka_unavailable:
            return f"Kafka unreachable: records spill to {self._directory}, {waiting} wait for it"
        if waiting:
            return f"{waiting} spilled records wait for Kafka"
        return None

    @property
    def kafka_unavailable(self) -> bool:
        """Kafka down: its breaker opened, its writer could not start (and has not
        since), or it did not answer a probe (and has taken nothing since):
        ``mlgate_dependency_unavailable{dependency="kafka"}``."""
        return (
            self._kafka_unreachable is not None
            or self.breaker.state != "closed"
            or self.breaker.unavailable
            or (self._probe_failed is not None and self._kafka.answered_ok_at < self._probe_failed[1])
        )

    def quiet_for(self, seconds: float) -> bool:
        """Kafka has taken nothing, and was not probed, for ``seconds``: a probe is due.
        Not while the writer cannot start (the drainer tries it, and says so)."""
        last = max(self._kafka.answered_ok_at, self._probed_at)
        return self._kafka_unreachable is None and time.monotonic() - last > seconds

    async def probe_kafka(self) -> None:
        """Ask Kafka for its metadata (``KafkaWriter.probe``); a failure marks it
        unavailable until it answers again, logged once each way."""
        self._probed_at = time.monotonic()
        failed = await self._kafka.probe(self._settings.kafka_request_timeout_ms / 1000)
        if failed is not None:
            if self._probe_failed is None:
                log.warning("kafka_probe_failed", error=failed)
            self._probe_failed = (failed, time.monotonic())
        elif self._probe_failed is not None:
            log.info("kafka_probe_answered", after=self._probe_failed[0])
            self._probe_failed = None

    @property
    def answer_within_s(self) -> float:
        """How long a caller should wait for a write (``IngestPipeline``): a direct
        write's two produce timeouts, then the spill's own bound."""
        return 2 * self._settings.kafka_request_timeout_ms / 1000 + self._spill.answer_within_s

    @property
    def backlog(self) -> int:
        """Records handed to the spill that Kafka has not acknowledged."""
        return max(0, self._spill.accepted_offset - self._forwarded)

    @property
    def mailbox_depth(self) -> int:
        return self._kafka.mailbox_depth + self._spill.mailbox_depth

    async def start(self) -> None:
        await self._spill.start()
        loop = asyncio.get_running_loop()
        forwarded = await loop.run_in_executor(self._executor, forwarded_on_disk, self._directory)
        if forwarded > self._spill.next_offset:
            # The log lost records it had not fsync'd (a crash): new ones reuse those
            # offsets, and a cursor past them would skip them.
            log.warning("spill_forwarded_offset_past_end", forwarded=forwarded, end=self._spill.next_offset)
            forwarded = self._spill.next_offset
            await loop.run_in_executor(self._executor, write_forwarded_offset, self._directory, forwarded)
        self._forwarded = forwarded
        self._shares.unattributed = self.backlog  # spilled before this start: nobody's
        self._cursor = LogCursor(self._directory, forwarded)
        try:
            await self._kafka.start()
        except Exception as exc:
            # Kafka down at start-up: serve from the spill; the drainer retries Kafka,
            # with or without records to send, so the writer is ready when Kafka is.
            log.error("kafka_unavailable_at_start", error=repr(exc))
            self._kafka_unreachable = repr(exc)
            self._spilled.set()
        if self.backlog:
            log.warning("spill_backlog_at_start", records=self.backlog)
            self._spilled.set()
        self._drainer.start()

    async def write(
        self, records: list[OutboundRecord], lane: str = "", tenants: TenantRuns = ()
    ) -> None:
        """``tenants``: whose records they are (``SpillShares``); none, one
        nameless tenant's."""
        runs = tenants or [("", len(records))]
        direct = (
            self.backlog == 0
            and not self.breaker.is_open
            and self._kafka.healthy
            and not self._kafka.stalled
        )
        resent = 0
        # Whether Kafka certainly holds none of the records (it was not called): a
        # refusal of the spill is then a refusal of the whole write, and its callers may
        # release their ids.
        kafka_took_none = True
        if direct:
            # Only while Kafka is slow to answer are the writes in flight a spill to
            # come: a healthy broker's many large batches in flight past a small spill's
            # share were refused (a review: 66 of 120 ingests, nothing spilled).
            timeout_s = self._settings.kafka_request_timeout_ms / 1000
            if (
                self._kafka.unanswered_s > timeout_s * FLYING_COUNTS_AFTER
                and self._shares.tenant_over_share(runs, self.backlog) is not None
            ):
                raise SpillFull(
                    "this tenant's writes waiting for Kafka hold its share of the spill "
                    "(MLGATE_SPILL_TENANT_SHARE)",
                    nothing_written=True,
                    records=len(records),
                )
            try:
                # At most two request timeouts: then it spills (see ``write_within``).
                deadline_s = 2 * self._settings.kafka_request_timeout_ms / 1000
                self._direct_writes += 1
                self._direct_writes_done.clear()
                self._shares.took_off(runs)
                try:
                    await self.breaker.call(self._kafka.write_within, records, deadline_s, lane)
                finally:
                    self._shares.landed(runs)
                    self._direct_writes -= 1
                    if not self._direct_writes:
                        self._direct_writes_done.set()
                return
            except MailboxFull:
                raise
            except _KAFKA_FAILURES as exc:  # KafkaWriteFailed is a SinkFailed
                # A write whose own failure opened the breaker comes as BreakerOpen
                # carrying that failure; without one, Kafka was not called.
                failure = exc.failure if isinstance(exc, BreakerOpen) and exc.failure else exc
                if isinstance(failure, KafkaWriteFailed):
                    # What Kafka acknowledged stays there; the rest spills.
                    log.warning(
                        "kafka_write_failed_spilling", error=str(failure), records=len(failure.unwritten),
                        acknowledged=len(records) - len(failure.unwritten),
                        outcome_unknown=failure.outcome_unknown,
                    )
                    # Not "took none" even when it acknowledged none: aiokafka retries a
                    # batch itself, and an answer lost on the way is then reported as the
                    # last attempt's error, not as an unknown outcome.
                    kafka_took_none = failure.never_sent
                    runs = runs_of(failure.unwritten, records, runs)
                    records, resent = failure.unwritten, failure.outcome_unknown
                    if not records:
                        return
                else:
                    log.warning("kafka_write_failed_spilling", error=repr(failure), records=len(records))
                    # Sent and not answered, Kafka may hold them; refused, it holds none.
                    kafka_took_none = isinstance(failure, BreakerOpen)
        try:
            try:
                await self._to_spill(records, runs, kafka_took_none=kafka_took_none)
            except BaseException as exc:
                # Neither produced nor spilled. A full spill's refusal is counted by the
                # caller, which may write a refused turn of many writes again write by
                # write (a review: its records counted failed, then spilled).
                if not isinstance(exc, SpillFull):
                    self._telemetry.records_failed(len(records))
                raise
        except (MailboxFull, WorkerClosed) as exc:
            if kafka_took_none:
                raise
            # Kafka may hold some of them: not a refusal of the whole write, whose
            # callers would then take their records for unwritten.
            raise SinkFailed(f"spill refused the records Kafka did not take: {exc!r}") from exc
        except SinkFailed as exc:
            if kafka_took_none or not exc.nothing_written:
                raise
            # The spill's append was cut back, but Kafka was tried and may hold some:
            # not "nothing written" for the write as a whole (a review: the claims were
            # released, and a resend wrote to Kafka twice).
            raise SinkFailed(f"spill failed the records Kafka did not take: {exc}") from exc
        if resent:
            self._telemetry.records_resent(resent)

    async def _to_spill(
        self, records: list[OutboundRecord], runs: TenantRuns, *, kafka_took_none: bool
    ) -> None:
        max_records = self._settings.spill_max_records
        backlog = self.backlog
        if backlog + len(records) > max_records:
            raise SpillFull(
                f"spill is full ({backlog} records waiting for Kafka)",
                nothing_written=kafka_took_none,
                records=len(records),
            )
        # Shared out only before Kafka was tried: records it may hold in part go to the
        # spill whatever their tenant holds, rather than be refused half written.
        if kafka_took_none and self._shares.tenant_over_share(runs, backlog) is not None:
            raise SpillFull(
                f"this tenant holds its share of the spill ({backlog} records of all "
                "tenants wait for Kafka; MLGATE_SPILL_TENANT_SHARE)",
                nothing_written=True,
                records=len(records),
            )
        try:
            written = self._spill.submit(records)
        except Exception:
            self._spilled.set()
            raise
        # Attributed as handed to the log (no await between), so in the log's order;
        # given back when the log fails them, whether or not this caller still waits.
        claims = self._shares.add(runs)
        written.add_done_callback(lambda done: self._spill_written(done, claims, len(records)))
        await asyncio.shield(written)

    def _spill_written(self, written: asyncio.Future[None], claims: list[Claim], records: int) -> None:
        """A spill write's outcome, whether or not its caller still waits for it (a
        caller that stopped waiting leaves its records to be written all the same)."""
        if written.cancelled() or written.exception() is not None:
            self._shares.give_back(claims)  # refused, or the append failed: not in the log
        else:
            self._telemetry.records_spilled(records)
        self._spilled.set()  # the drainer comes for them

    async def _drain_forever(self) -> None:
        loop = asyncio.get_running_loop()
        batch_size = self._settings.spill_drain_batch_records
        # A restarted loop trusts nothing of the run that crashed: it reads on from the
        # last offset Kafka acknowledged (re-sending at most the batch in flight then).
        forwarded = await loop.run_in_executor(self._executor, forwarded_on_disk, self._directory)
        if forwarded < self._forwarded:
            self._shares.sent_again(self._forwarded - forwarded)
        self._forwarded = forwarded
        self._cursor = LogCursor(self._directory, forwarded)
        # A batch read and not yet acknowledged whole: what of it is left to send.
        unacked: _DrainBatch | None = None
        while True:
            await self._spilled.wait()
            if self._kafka.started and self._kafka.dead:
                # The writer's task died, past what its own restart covers (its requests
                # were failed and spilled): a fresh one.
                log.error("kafka_writer_replaced")
                await self._kafka.close(drain_s=0)
                self._kafka = KafkaWriter(self._settings, telemetry=self._telemetry)
            if not self._kafka.started:
                try:
                    await self._kafka.start()
                except Exception as exc:
                    log.warning("kafka_still_unavailable", error=repr(exc))
                    self._kafka_unreachable = repr(exc)
                    await asyncio.sleep(self._settings.kafka_breaker_reset_s)
                    continue
                if self._kafka_unreachable is not None:
                    log.info("kafka_available", after=self._kafka_unreachable)
                    self._kafka_unreachable = None
            if unacked is None:
                # Only fsync'd records: one not yet durable may still be rolled back.
                start = self._cursor.offset
                durable = min(batch_size, self._spill.durable_offset - start)
                entries = await loop.run_in_executor(self._executor, self._cursor.read, durable)
                # Offsets read, damaged frames (skipped, logged) included.
                read = self._cursor.offset - start
                if not read and durable > 0:
                    # fsync'd records the cursor cannot read: crash, so the supervisor
                    # says so (/ready) and the next run starts from the forwarded offset.
                    raise RuntimeError(
                        f"spill cursor read nothing at offset {self._cursor.offset}, "
                        f"though records up to {self._spill.durable_offset} are durable"
                    )
                if not read:
                    if self.backlog == 0:
                        self._spilled.clear()
                    else:
                        await asyncio.sleep(0.05)  # written but not yet fsync'd
                    continue
                unacked = _DrainBatch([entry.record for entry in entries], self._cursor.offset, read)
            await self._direct_writes_settled()
            if self._closed:  # ``close`` waits for no batch begun after it: none begins
                await asyncio.Event().wait()  # parked until it cancels the drainer
            self._between_batches.clear()
            try:
                retry_in_s = await self._forward(unacked, loop)
            finally:
                self._between_batches.set()
            if retry_in_s is None:
                unacked = None
            else:
                await asyncio.sleep(retry_in_s)

    async def _forward(self, unacked: _DrainBatch, loop: asyncio.AbstractEventLoop) -> float | None:
        """Send a drain batch's records Kafka has not acknowledged, and on its ack mark
        the batch forwarded: None; or, when Kafka failed them, the seconds until the
        next try (``unacked`` then holds only what is still unacknowledged)."""
        try:
            if unacked.records:
                await self.breaker.call(self._kafka.write, unacked.records)
        except KafkaWriteFailed as exc:
            # Again only what Kafka did not acknowledge.
            unacked.records = exc.unwritten
            if exc.outcome_unknown:
                self._telemetry.records_resent(exc.outcome_unknown)
            return 0.5
        except (MailboxFull, *_KAFKA_FAILURES) as exc:
            if isinstance(exc, BreakerOpen) and isinstance(exc.failure, KafkaWriteFailed):
                # The failure that opened the breaker: what Kafka acknowledged of
                # the batch is not sent again.
                unacked.records = exc.failure.unwritten
                if exc.failure.outcome_unknown:
                    self._telemetry.records_resent(exc.failure.outcome_unknown)
            return exc.retry_after_s if isinstance(exc, BreakerOpen) else 0.5
        # Acknowledged, so no longer waiting, whether or not the offset file can be
        # written: a drainer restarted after it could not reads the file's offset
        # back, and the backlog grows again by what it will send twice.
        self._forwarded = unacked.end
        self._shares.forwarded(unacked.offsets)
        if unacked.end == self._spill.next_offset:
            # All forwarded: the segment written to can go too (``LocalLog.roll_at``).
            try:
                await self._spill.roll_at(unacked.end)
            except OSError as exc:
                log.warning("spill_segment_not_rolled", offset=unacked.end, error=repr(exc))
        try:
            await loop.run_in_executor(self._executor, self._mark_forwarded, unacked.end)
        except OSError as exc:
            # A full disk, say. Crashing here restarted the drainer from the file's
            # offset, which sent this batch again, failed again, for as long as the
            # disk stayed full (a review: one batch in Kafka nine times, the rest of
            # the spill never reached). The drain goes on from memory; a later ack
            # writes the file, and a crash meanwhile re-sends what was forwarded
            # since the file was last written.
            log.warning("spill_forwarded_offset_not_saved", offset=unacked.end, error=repr(exc))
        else:
            log.info("spill_forwarded", offsets=unacked.offsets, backlog=self.backlog)
        return None

    async def _direct_writes_settled(self) -> None:
        """Until the writes sent to Kafka directly have their answers: one accepted
        before the backlog began may still wait in the writer's mailbox, in a lane the
        drainer's could overtake (a review). No direct write starts while a backlog
        exists and each ends within two request timeouts, so this waits that long at
        most (bounded all the same: a backlog miscounted as empty lets new ones start)."""
        if self._direct_writes_done.is_set():
            return
        wait_s = 2 * self._settings.kafka_request_timeout_ms / 1000 + 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._direct_writes_done.wait(), wait_s)

    def _mark_forwarded(self, offset: int) -> None:
        # Segments first: on a full disk, the room they free is what the file needs. A
        # crash between leaves the file behind them, read back as their end
        # (``forwarded_on_disk``).
        delete_segments_before(self._directory, offset)
        write_forwarded_offset(self._directory, offset)

    def spill_waiting_writes(self) -> int:
        """The direct writes still waiting for Kafka's answer stop waiting and spill, as
        when their time is up: shutting down, their requests are answered (durable in
        the spill) before the server cuts them (a review: a frozen broker at SIGTERM,
        the connections cut with no answer). How many writes there were."""
        return self._kafka.give_up_waiting()

    async def close(self, drain_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        # The drain batch in flight ends first, its ack recorded: cancelled, its produce
        # still landed with the writer's flush below while ``forwarded.offset`` stayed
        # behind it, and the next start sent it again (a review).
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._between_batches.wait(), drain_s / 2)
        await self._drainer.stop()
        drain_s = max(0.0, drain_s - (loop.time() - started))  # taken out of the budget
        await self._kafka.close(drain_s=drain_s)
        await self._spill.close(drain_s=drain_s)
        self._executor.shutdown(wait=True)
