"""IngestPipeline: the one path every ingested record takes, and what a 202 means.

    admit -> decode -> hold -> validate -> quality screen -> dedup claim -> write -> confirm

- **admit** and **hold**: the feature values requests hold until durable are bounded
  (``max_held_values``) and shared fairly between tenants (``hold``); what the bound
  refuses whatever the body holds is refused before it is decoded (``admit``).
- **decode**: the body into the source and, per index, a ``Record`` or the reason it
  was rejected (``RecordValidator.decode_batch``; streams decode record by record in
  ``ingest.streams``).
- **validate** and **quality screen**: per-record checks, partial success
  (``RecordValidator.validate``, ``QualityScreen``).
- **dedup claim**: client-given ``record_id``s already written within the window are
  dropped as duplicates; ids another request is writing wait for it or answer 409
  (``ingest.dedup``).
- **write**: the rest go to the record sink's mailbox; the call returns once the sink
  has made them durable: Kafka ``acks=all`` (or the local spill, fsync'd, while Kafka
  is down), or the embedded local log, fsync'd. While it runs, the claim is extended
  every third of its lapse, so a write slower than the lapse keeps its ids.
- **confirm**: the claimed ids are marked written. Write and confirm run in a task of
  their own, so a caller cancelled after it handed its records on (a client gone
  away) still settles the claim by the write's outcome: a retry is then a duplicate,
  not a second write. The writes handed on in one turn of the event loop (requests
  whose bodies arrived together) share that task and one sink write, and each caller
  is answered by its outcome: many single-record requests then pay for one hand-off.
  A tenant with many records on their way writes in a lane of its own, and the sink
  takes the lanes in turn, so its queued writes do not hold up the others'.

So a 202 means: every record counted in ``records_accepted`` is durable, each keyed
by its ``record_id``; ``records_duplicate`` were already written and were not written
again; ``records_rejected`` are listed in ``errors`` with their reasons. Any failure
before the sink's acknowledgement surfaces as an error (503 when the sink is full or
down), so nothing is acknowledged that is not durable. The claim is released only when
the sink refused the records (``MailboxFull``, ``WorkerClosed``: full, or stopped;
``SpillFull`` before Kafka was tried; a local-log append cut back: ``nothing_written``);
after any other failure part of them may have
landed, so their ids stay claimed until they lapse (``MLGATE_IDEMPOTENCY_LOCK_S``) and a
retry meanwhile is 409, not a duplicate write. A failure before the records are handed
on (their encoding) releases the claim too, and the caller gets it. A turn whose
records the spill had no room for is written again write by write, so those that fit
are written as they would have been alone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import structlog

from mlgate.service.http.codec import Format
from mlgate.service.http.metrics import Metrics
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.ingest.dedup import Claim, RecordDeduplicator
from mlgate.service.ingest.ids import UniqueIds
from mlgate.service.ingest.validation import Decoded, PackedRecords, RecordError, RecordValidator
from mlgate.workers.errors import MailboxFull, SinkFailed, WorkerClosed, WorkerError
from mlgate.workers.lanes import SHARED_LANE
from mlgate.workers.sinks.records import OutboundRecord, RecordSink
from mlgate.workers.sinks.spilling_sink import SpillFull

# A tenant refused room for its values shares the bound this long with those holding
# some (``IngestPipeline.hold``): a few client retries (Retry-After is a second).
WANTING_S = 5.0

log = structlog.get_logger("mlgate.ingest")


@dataclass(frozen=True, slots=True)
class Written:
    """What one write did: ``accepted`` records written, ``duplicates`` dropped."""

    accepted: int
    duplicates: int


@dataclass(slots=True)
class _Write:
    """One caller's part of a turn's write: its records, its claim (settled with the
    turn) and the future it waits on."""

    tenant: str
    claim: Claim | None
    records: list[OutboundRecord]
    done: asyncio.Future[None]
    # Its records counted in the tenant's records on their way, until it is settled.
    counted: bool = False


@dataclass(slots=True)
class _Turn:
    """The writes of one turn of the event loop in one lane (the shared one, or a heavy
    tenant's own), handed to the sink as one."""

    lane: str
    writes: list[_Write] = field(default_factory=list)
    records: list[OutboundRecord] = field(default_factory=list)


class _Holding:
    """Calls ``extend_all`` every ``interval`` seconds until stopped."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float, extend_all: Callable[[], None]
    ) -> None:
        self._loop, self._interval, self._extend_all = loop, interval, extend_all
        self._timer = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        self._extend_all()
        self._timer = self._loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        self._timer.cancel()


def refused(error: BaseException) -> bool:
    """The sink wrote none of the records: full, not running, a spill without room
    before Kafka was tried, or a local-log append cut back. Their claims can be released."""
    return isinstance(error, MailboxFull | WorkerClosed) or (
        isinstance(error, SpillFull | SinkFailed) and error.nothing_written
    )


def _answer_stalled(writes: list[_Write], waited_s: float) -> None:
    """The callers of a write the sink has not made durable in ``waited_s``: built when
    due, not for every turn."""
    _answer(
        writes,
        SinkFailed(
            f"the sink has not made the records durable in {waited_s:g} s (it stalls): they "
            "may still land, and their record_ids stay claimed until the write ends"
        ),
    )


def _answer(writes: list[_Write], error: BaseException | None) -> None:
    """Each caller still waiting gets ``error``, or its write done."""
    for write in writes:
        if write.done.done():
            continue  # cancelled: its caller went away
        if error is None:
            write.done.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            write.done.cancel()
        else:
            write.done.set_exception(error)


class IngestPipeline:
    def __init__(
        self,
        validator: RecordValidator,
        dedup: RecordDeduplicator,
        sink: RecordSink,
        metrics: Metrics,
        *,
        max_turn_records: int = 5000,
        max_held_values: int = 8_000_000,
        answer_within_s: float = math.inf,
    ) -> None:
        """``answer_within_s``: how long a caller waits for the sink before it is told
        its records may still land (``_write_and_settle``)."""
        self._validator = validator
        self._answer_within_s = answer_within_s
        self._max_turn_records = max_turn_records
        self._max_held_values = max_held_values
        self._held_values = 0  # of the requests between their decoding and their answer
        self._held_by: dict[str, int] = {}  # the same, per tenant holding any
        # Tenants refused for want of room: when (``time.monotonic``) and how many
        # values they asked for. For ``WANTING_S`` they count among those sharing the
        # bound, and room is kept for what they asked (up to their share).
        self._wanting: dict[str, tuple[float, int]] = {}
        self._dedup = dedup
        self._sink = sink
        self._metrics = metrics
        self._settling: set[asyncio.Future[None]] = set()
        self.new_tracking_id = UniqueIds()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The writes of this loop turn, not yet handed on, by lane.
        self._turns: dict[str, _Turn] = {}
        # Records each tenant has handed to the sink and not yet had answered.
        self._on_their_way: dict[str, int] = {}

    @property
    def dedup(self) -> RecordDeduplicator:
        """The record-id dedup its writes claim ids in."""
        return self._dedup

    @property
    def claim_lapse_s(self) -> float:
        """How long the ids of a write that may have landed stay claimed (none when
        record dedup is off)."""
        return self._dedup.lapse_s if self._dedup.enabled else 0.0

    @property
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pipeline serves, asked once: ``asyncio.get_running_loop()`` (and
        ``ensure_future``) make a system call on Python 3.11, for the process id."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.get_running_loop()
            self._turns = {}  # a turn of a closed loop is never written (nor answered)
            self._on_their_way = {}
        return self._loop

    def decode(self, body: bytes, fmt: Format) -> tuple[str, Sequence[Decoded]]:
        return self._validator.decode_batch(body, fmt)

    @property
    def held_values(self) -> int:
        return self._held_values

    def admit(self, tenant: str) -> None:
        """Before the body is decoded, refuse at once what ``hold`` would refuse
        whatever the body holds: no room left at all, or ``tenant`` at its share while
        others wait. A review: under a flood on 32 connections the refused bodies were
        decoded first (half the core), and a calm tenant's ingests took seconds."""
        self._check(tenant, 1, known=False)

    def hold(self, items: Sequence[Decoded], tenant: str) -> int:
        """Count the feature values of decoded ``items`` against ``max_held_values``
        until ``release``: a request holds its decoded records until they are durable,
        for seconds while Kafka does not answer, and without a bound a few large
        batches (10,000 records of 768 one-byte zeros: +351 MB each) took the process
        to gigabytes. Over the bound, ``MailboxFull`` (503 with Retry-After) at once;
        a request always fits when nothing else is held.

        The bound is shared fairly: while other tenants hold values or were refused
        room within ``WANTING_S``, a tenant already holding some takes more past its
        share (the bound over the tenants sharing it) only into room none of them asked
        for (what each asked, up to its share, is kept: a review saw a tenant refused
        once cap the others at half while it used little). One tenant posting
        large batches on many connections (within its rate limit: 10,000-record
        batches at 1,000 requests a second fill 8M values in 10 ms of Kafka latency)
        cannot keep the others' ingests refused: once refused, they count for
        ``WANTING_S``, and the flood's further requests are refused until it holds no
        more than its share. Counted from the last refusal only (a review: refreshed
        by every request, a tenant refused once capped the others while it used
        little), a calm tenant may meet a refill of the bound a refusal every
        ``WANTING_S`` or so."""
        if isinstance(items, PackedRecords):
            values = int(items.matrix.size)
        else:
            values = sum(len(item.features) for item in items if not isinstance(item, RecordError))
        self._check(tenant, values)
        if values:
            self._held_values += values
            self._held_by[tenant] = self._held_by.get(tenant, 0) + values
        return values

    def _check(self, tenant: str, values: int, known: bool = True) -> None:
        """Refuse ``values`` more for ``tenant`` (``known``: the request's size, else
        only that it holds some) when the bound has no room, or when the tenant would
        pass its share and take room kept for the tenants refused meanwhile: past its
        share a tenant still takes what no waiting tenant asked for."""
        wanting = self._wanting
        held = self._held_values
        mine = self._held_by.get(tenant, 0)
        if held and held + values > self._max_held_values:
            share = self._max_held_values // self._sharing(tenant)
            if mine < share:
                asked = values if known else wanting.get(tenant, (0.0, share))[1]
                wanting[tenant] = (time.monotonic(), asked)
            self._metrics.ingest_refused.labels("held_values").inc()
            raise MailboxFull(
                f"ingests hold {held} feature values until durable; "
                f"{values} more would pass {self._max_held_values}"
            )
        if mine and wanting:
            share = self._max_held_values // self._sharing(tenant)
            kept = sum(min(asked, share) for name, (_, asked) in wanting.items() if name != tenant)
            if mine + values > share and held + values > self._max_held_values - kept:
                self._metrics.ingest_refused.labels("tenant_share").inc()
                raise MailboxFull(
                    f"this tenant's ingests hold {mine} feature values until durable; "
                    f"{values} more would pass its share of {share} while other tenants "
                    "wait for room"
                )

    def _sharing(self, tenant: str) -> int:
        """How many tenants share the bound: those holding values, those refused room
        within ``WANTING_S``, and ``tenant``."""
        wanting = self._wanting
        if wanting:
            since = time.monotonic() - WANTING_S
            for name in [name for name, (at, _) in wanting.items() if at < since]:
                del wanting[name]
        holding = self._held_by
        return len(holding.keys() | wanting.keys() | {tenant})

    def release(self, values: int, tenant: str) -> None:
        if not values:
            return
        self._held_values -= values
        left = self._held_by[tenant] - values
        if left:
            self._held_by[tenant] = left
        else:
            del self._held_by[tenant]

    def validate(self, source: str, items: Sequence[Decoded]) -> ValidatedBatch:
        return self._validator.validate(source, items)

    async def write(
        self,
        tenant: str,
        batch: ValidatedBatch,
        tracking_id: str,
    ) -> Written:
        """Write the accepted records whose ``record_id`` was not written within the
        dedup window; returns once they are durable."""
        fresh, claim = await self._drop_duplicates(tenant, batch)
        try:
            records = self._validator.outbound(fresh, tracking_id) if fresh.accepted else []
        except Exception:
            # Nothing was handed on: the ids are let go at once, whatever failed (a
            # review: a value the encoder refused left them claimed, and a resend was
            # 409 for the lapse).
            if claim is not None:
                await self._let_go(tenant, claim)
            raise
        if records or (claim is not None and claim.held):
            await self._join_turn(tenant, claim, records)
        self._validator.observe_written(batch, fresh)
        duplicates = len(batch.accepted) - len(fresh.accepted)
        if duplicates:
            self._metrics.records_duplicate.inc(duplicates)
        return Written(accepted=len(fresh.accepted), duplicates=duplicates)

    def observe_unwritten(self, batch: ValidatedBatch) -> None:
        """A batch of which no record was accepted: its rows still go to the drift
        monitor (a review: a source gone wholly out of range, every batch 422, showed no
        drift at all, and one record a request never any)."""
        self._validator.observe_written(batch, batch)

    async def _let_go(self, tenant: str, claim: Claim) -> None:
        """Release ``claim`` after a failure before its records were handed on; a
        release that fails too is logged, and the ids lapse as after a partial write."""
        try:
            await self._dedup.release(tenant, claim)
        except Exception as exc:
            log.warning("dedup_claim_release_failed", error=repr(exc))

    async def _join_turn(self, tenant: str, claim: Claim | None, records: list[OutboundRecord]) -> None:
        """Hand ``records`` to this loop turn's write and wait for its outcome.

        The writes that reach this point in one turn of the event loop (the requests
        whose bodies arrived together) go to the sink as one write, settled in one
        task: with single-record requests each paying a task, a sink hand-off and a
        wake-up of its own, those per-write costs were a tenth of a request's CPU. A
        turn holds at most ``max_turn_records`` records (the most a writer takes in a
        round), so one sink write holds no more than one large batch did.

        A tenant with ``max_turn_records`` or more records on their way (handed on, not
        yet answered) writes in a lane of its own; the others share one. The sink takes
        the lanes in turn, so the other tenants' writes wait for one of a flooding
        tenant's at most, not for all it queued before them (a review: a lane per
        tenant made many tenants' single records many writes, and filled the writer's
        mailbox of 1,024 writes with a burst of 1,500 tenants)."""
        loop = self._running_loop
        on_their_way = self._on_their_way
        lane = tenant if on_their_way.get(tenant, 0) >= self._max_turn_records else SHARED_LANE
        turn = self._turns.get(lane)
        if turn is None or (turn.records and len(turn.records) + len(records) > self._max_turn_records):
            turn = self._turns[lane] = _Turn(lane)
            loop.call_soon(self._write_turn, turn)
        done: asyncio.Future[None] = loop.create_future()
        turn.writes.append(_Write(tenant, claim, records, done, counted=bool(records)))
        turn.records += records
        if records:
            on_their_way[tenant] = on_their_way.get(tenant, 0) + len(records)
        # Cancelled here (a client gone away), the write still goes with its turn, and
        # its claim is settled by the outcome, so a retry is then a duplicate.
        await done

    def _arrived(self, writes: list[_Write]) -> None:
        """Take settled ``writes`` off their tenants' records on their way (once: a
        turn the spill refused settles again write by write). When settled, not when
        the caller stops waiting (a review: a flood whose clients time out went back to
        the shared lane with its writes still queued)."""
        on_their_way = self._on_their_way
        for write in writes:
            if write.counted:
                write.counted = False
                left = on_their_way.get(write.tenant, 0) - len(write.records)
                if left > 0:
                    on_their_way[write.tenant] = left
                else:
                    on_their_way.pop(write.tenant, None)

    def _write_turn(self, turn: _Turn) -> None:
        if self._turns.get(turn.lane) is turn:
            del self._turns[turn.lane]
        settle = self._running_loop.create_task(self._write_and_settle(turn))
        self._settling.add(settle)
        settle.add_done_callback(self._settled)

    async def _write_and_settle(self, turn: _Turn) -> None:
        """Write the turn's records, then settle each write's claim and answer its
        caller: confirmed once the records are durable; released when the sink wrote
        none of them (``_refused``). Any other failure may follow a partial write
        (Kafka took some, the spill refused the rest): the ids stay claimed until they
        lapse. While this runs, the claims are extended every third of their lapse."""
        writes = turn.writes
        holding = self._hold([(write.tenant, write.claim) for write in writes if write.claim is not None])
        # A sink that stalls (a hung disk) answers its callers at ``answer_within_s``:
        # their records may still land, so the write goes on, holding their ids, and
        # its outcome settles them (a review: a bound inside the sink failed the write
        # and left the ids to lapse, and a retry then wrote the landed records again).
        late = (
            self._running_loop.call_later(self._answer_within_s, _answer_stalled, writes, self._answer_within_s)
            if turn.records and self._answer_within_s < math.inf
            else None
        )
        try:
            error: Exception | None = None
            try:
                if turn.records:
                    tenants = [(write.tenant, len(write.records)) for write in writes if write.records]
                    await self._sink.write(turn.records, lane=turn.lane, tenants=tenants)
            except Exception as exc:
                error = exc
            in_parts = isinstance(error, SpillFull) and refused(error) and len(writes) > 1
            if isinstance(error, SpillFull) and not in_parts:
                # Neither produced nor spilled, and answered so (the sink leaves a full
                # spill's refusals to count here: a turn refused whole goes again in parts).
                self._metrics.records.labels("failed").inc(error.records)
            if error is None or refused(error):
                if in_parts:
                    # The spill had no room for the whole turn, but may for some of its
                    # writes: each is written as it would have been alone (and holds
                    # its own claim meanwhile).
                    if holding is not None:
                        holding.stop()
                        holding = None
                    await asyncio.gather(
                        *(
                            self._write_and_settle(_Turn(turn.lane, [write], write.records))
                            for write in writes
                        )
                    )
                    return
                await self._settle_claims(writes, error)
            else:
                _answer(writes, error)
        except BaseException as exc:
            _answer(writes, exc)
            raise
        finally:
            self._arrived(writes)
            if holding is not None:
                holding.stop()
            if late is not None:
                late.cancel()

    async def _settle_claims(self, writes: list[_Write], error: Exception | None) -> None:
        """Confirm (no ``error``) or release each write's claim, then answer its caller.
        Against Redis each is a round trip: they run at once, each caller answered as
        its own claim is settled."""
        if self._dedup.shared and len(writes) > 1:
            await asyncio.gather(*(self._settle_claim(write, error) for write in writes))
        else:
            for write in writes:
                await self._settle_claim(write, error)

    async def _settle_claim(self, write: _Write, error: Exception | None) -> None:
        try:
            if write.claim is not None:
                if error is None:
                    await self._dedup.confirm(write.tenant, write.claim)
                else:
                    await self._dedup.release(write.tenant, write.claim)
        except Exception as exc:
            _answer([write], exc)
            return
        _answer([write], error)

    def _hold(self, claimed: list[tuple[str, Claim]]) -> _Holding | None:
        """The claims extended every third of their lapse until the holding stops: a
        write slower than the lapse must not let a retry claim its ids. A timer, so
        only a slow write pays for an extension. None without claims."""
        if not claimed:
            return None
        loop = self._running_loop

        def extend_all() -> None:
            for tenant, claim in claimed:
                extending = loop.create_task(self._dedup.extend(tenant, claim))
                self._settling.add(extending)
                extending.add_done_callback(self._extended)

        return _Holding(loop, self._dedup.lapse_s / 3, extend_all)

    def _extended(self, extending: asyncio.Future[None]) -> None:
        self._settling.discard(extending)
        if not extending.cancelled() and (error := extending.exception()) is not None:
            # Not extended, the claim may lapse while the write runs: worth a line.
            log.warning("dedup_claim_extend_failed", error=repr(error))

    def _settled(self, settle: asyncio.Future[None]) -> None:
        self._settling.discard(settle)
        if settle.cancelled():
            return
        error = settle.exception()  # retrieved: its callers have it, or were cancelled
        if error is not None and not isinstance(error, WorkerError):
            # Not a sink's answer but a fault of the settling itself: its callers got it
            # as a 500 (if still there); worth a line and a count of its own.
            log.error("ingest_settle_crashed", error=repr(error))
            self._metrics.background_task_crashes.labels("ingest-settle").inc()

    async def _drop_duplicates(
        self, tenant: str, batch: ValidatedBatch
    ) -> tuple[ValidatedBatch, Claim | None]:
        """The batch without records already written (by client-given record_id), and
        the claim on the rest. Generated ids are unique and not tracked."""
        if not self._dedup.enabled:
            return batch, None
        generated = batch.generated_ids
        tracked = (
            [record.record_id for record in batch.accepted if record.record_id not in generated]
            if generated
            else [record.record_id for record in batch.accepted]
        )
        if not tracked:
            return batch, None
        claim = await self._dedup.claim(tenant, tracked)
        if all(claim.new):
            return batch, claim
        keep, new = [], iter(claim.new)
        for record in batch.accepted:
            if record.record_id in generated or next(new):
                keep.append(record)
        return replace(batch, accepted=keep), claim
