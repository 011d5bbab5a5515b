"""Producer: records in, batches out to ``POST /api/v2/ingest``, a report per record.

    send() -> encode -> current batch --(max_records | max_bytes | linger_ms)--> ready queue
           -> one of max_in_flight senders -> POST with retries -> futures resolved

- **Bounded**: every record counts against ``max_buffer_bytes`` from ``send`` until its
  report is out (buffered, in flight or waiting to retry). A full producer makes
  ``send`` wait for room, or raise ``BufferFull`` with ``block_on_full=False``.
- **Retries** follow ``retry.RetryPolicy``: each batch is encoded once and keeps its
  ``Idempotency-Key`` (also sent as ``X-Request-ID``) and its records' ``record_id``s on
  every attempt, so a retry that reaches the server after a lost answer (another host
  behind a balancer sharing its Redis) writes nothing twice. A server killed after
  writing a batch and before recording its answer may have it written again by a
  retry: in process its idempotency and dedup state die with it, and in Redis its
  claims lapse unconfirmed after ``MLGATE_IDEMPOTENCY_LOCK_S`` (60 s; the retries get
  409 until then, within a budget of 120 s) (see mlgate's delivery guarantee).
- **Reports**: ``send`` returns an ``asyncio.Future[Delivery]`` (see ``delivery``); a
  batch that fails for good fails its futures with the last error (an ``ApiError``
  whose ``problem`` is the last problem document, or a ``TransportError``). The
  optional ``on_delivery(record_id, delivery_or_error)`` is called for each record too.
- A batch the server finds too large (413, or 422 for more records than it takes)
  goes again as two halves, each with a key of its own, until it fits.
- Batches may land out of order when ``max_in_flight > 1`` and one is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from mlgate_client.delivery import (
    Delivery,
    Outcome,
    all_rejected,
    counts_every_record,
    from_accepted,
)
from mlgate_client.errors import (
    BufferFull,
    MlgateError,
    PayloadTooLarge,
    ProducerClosed,
    RecordTooLarge,
    TransportError,
    UnexpectedAnswer,
    ValidationFailed,
)
from mlgate_client.records import (
    Features,
    Metadata,
    RecordEncoder,
    Timestamp,
    batch_body,
    batch_prefix,
)
from mlgate_client.retry import RetryPolicy, call_with_retries
from mlgate_client.transport import Transport

INGEST_PATH = "/api/v2/ingest"
BATCH_OVERHEAD_BYTES = 200  # the map header and source around the records
log = logging.getLogger("mlgate_client.producer")

DeliveryCallback = Callable[[str, "Delivery | MlgateError"], None]


@dataclass
class ProducerStats:
    """Counters since the producer started (records unless named otherwise)."""

    sent: int = 0
    accepted: int = 0
    duplicate: int = 0
    accepted_or_duplicate: int = 0
    rejected: int = 0
    failed: int = 0
    batches: int = 0
    retries: int = 0
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Batch:
    records: list[bytes] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)
    futures: list[asyncio.Future[Delivery]] = field(default_factory=list)
    nbytes: int = 0
    reported: bool = False
    generation: int = 0  # the flushes begun before its records were sent (see ``flush``)


class Producer:
    def __init__(
        self,
        url: str,
        source: str,
        *,
        api_key: str | None = None,
        max_records: int = 500,
        max_bytes: int = 1024 * 1024,
        linger_ms: float = 5.0,
        max_in_flight: int = 4,
        max_buffer_bytes: int = 64 * 1024 * 1024,
        block_on_full: bool = True,
        retry: RetryPolicy | None = None,
        request_timeout_s: float = 30.0,
        single_float: bool = False,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        if max_records < 1 or max_in_flight < 1 or linger_ms < 0:
            raise ValueError("need max_records >= 1, max_in_flight >= 1, linger_ms >= 0")
        if max_buffer_bytes < max_bytes:
            raise ValueError("max_buffer_bytes must hold at least one full batch (max_bytes)")
        self.source = source
        self.stats = ProducerStats()
        self._transport = Transport(url, api_key, connections=max_in_flight)
        self._encoder = RecordEncoder(single_float)
        self._prefix = batch_prefix(source)
        self._max_records = max_records
        self._max_bytes = max_bytes - BATCH_OVERHEAD_BYTES
        self._linger_s = linger_ms / 1000
        self._max_in_flight = max_in_flight
        self._max_buffer_bytes = max_buffer_bytes
        self._block_on_full = block_on_full
        self._retry = retry or RetryPolicy()
        self._request_timeout_s = request_timeout_s
        self._on_delivery = on_delivery
        self._current: _Batch | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._ready: asyncio.Queue[_Batch | None] = asyncio.Queue()
        self._senders: list[asyncio.Task[None]] = []
        self._held_bytes = 0
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._unresolved = 0
        # Records without a report, by generation: each flush starts a new one, so it
        # can wait for the records sent before it while other tasks keep sending.
        self._generation = 0
        self._unreported: dict[int, int] = {}
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._closed = False
        self._close_ended = asyncio.Event()

    # -- public --------------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes of records sent but not yet reported (the figure ``max_buffer_bytes`` bounds)."""
        return self._held_bytes

    async def send(
        self,
        features: Features,
        *,
        label: float | None = None,
        metadata: Metadata | None = None,
        timestamp: Timestamp | None = None,
        record_id: str | None = None,
    ) -> asyncio.Future[Delivery]:
        """Buffer one record; the future resolves with its ``Delivery`` (or fails).

        ``record_id`` is generated when not given; ``timestamp`` defaults to now. Waits
        while the producer is full (or raises ``BufferFull``, see ``block_on_full``)."""
        if self._closed:
            raise ProducerClosed("the producer is closed")
        self._check_loop()
        record_id = record_id or self._encoder.new_record_id()
        encoded = self._encoder.encode(record_id, features, label, metadata, timestamp)
        size = len(encoded)
        if size > self._max_bytes:
            raise RecordTooLarge(
                f"record {record_id} is {size} bytes encoded, more than a batch can carry "
                f"(max_bytes less {BATCH_OVERHEAD_BYTES} bytes of batch overhead: {self._max_bytes})"
            )
        if self._held_bytes + size > self._max_buffer_bytes:
            await self._wait_for_room(size)
            if self._closed:
                raise ProducerClosed("the producer was closed while send waited for room")
        if not self._senders:
            self._start_senders()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()
        self._held_bytes += size
        self._unresolved += 1
        self._unreported[self._generation] = self._unreported.get(self._generation, 0) + 1
        self.stats.sent += 1
        batch = self._current
        if batch is not None and (batch.nbytes + size > self._max_bytes):
            self._seal()
            batch = None
        if batch is None:
            batch = self._current = _Batch(generation=self._generation)
            self._linger = loop.call_later(
                self._linger_s, self._seal_if_current, batch
            )
        batch.records.append(encoded)
        batch.record_ids.append(record_id)
        batch.futures.append(future)
        batch.nbytes += size
        if len(batch.records) >= self._max_records:
            self._seal()
            await asyncio.sleep(0)  # let a sender pick the batch up before more piles on
        return future

    def _check_loop(self) -> None:
        """Its senders and HTTP session belong to the loop it first sent in: reused
        under a second ``asyncio.run``, its records were never posted and a close
        waited for ever (a review)."""
        if self._senders and self._senders[0].get_loop() is not asyncio.get_running_loop():
            raise RuntimeError(
                "this Producer runs in the event loop it first sent in; make one per "
                "event loop (per asyncio.run), or use SyncProducer"
            )

    async def flush(self, timeout_s: float | None = None) -> None:
        """Send what is buffered now and wait until every record sent so far has a
        report (at most ``timeout_s``: then ``TimeoutError``, the records still going).
        Records sent after the call (by another task) are not waited for."""
        self._check_loop()
        self._seal()  # the batch sealed holds only this generation's records: sent before
        generation = self._generation
        self._generation += 1
        if self._reported_up_to(generation):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((generation, waiter))
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        finally:  # a timeout or a cancel leaves no waiter behind
            with contextlib.suppress(ValueError):
                self._flush_waiters.remove((generation, waiter))

    async def close(self, timeout_s: float | None = None) -> None:
        """Flush (at most ``timeout_s``), then stop the senders and close connections.
        Idempotent. Whatever ends the flush early (the timeout, or the caller's task
        cancelled) fails every record still without a report with ``ProducerClosed``,
        at once: each record gets its one report, and closing is never held by retries
        (a dead server would otherwise keep each queued batch for its whole budget)."""
        await self._close(timeout_s, flush=True)

    async def _close(self, timeout_s: float | None, *, flush: bool) -> None:
        if self._closed:  # a second close returns once the first has ended
            await self._close_ended.wait()
            return
        self._check_loop()
        self._closed = True  # takes no more records: a sender that never stops cannot hold it
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
        try:
            if flush:
                await self.flush(timeout_s)
        except TimeoutError:
            log.warning("mlgate_client.close_timed_out", extra={"records": self._unresolved})
        finally:
            try:
                self._fail_unsent(ProducerClosed("the producer closed before this record was sent"))
                for sender in self._senders:
                    sender.cancel()  # one still delivering fails its batch with ProducerClosed
                try:
                    await asyncio.gather(*self._senders, return_exceptions=True)
                finally:
                    await self._transport.close()
            finally:
                self._close_ended.set()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Leaving on a cancellation (or KeyboardInterrupt, SystemExit) is a close cut
        # short: the caller is stopping now, so nothing waits for the retries' budget.
        cut_short = exc_type is not None and not issubclass(exc_type, Exception)
        await self._close(None, flush=not cut_short)

    # -- buffering -----------------------------------------------------------------

    async def _wait_for_room(self, size: int) -> None:
        if size > self._max_buffer_bytes:
            raise ValueError("a record larger than max_buffer_bytes can never be buffered")
        if not self._block_on_full:
            raise BufferFull(f"{self._held_bytes} bytes buffered, max_buffer_bytes reached")
        self._seal()  # a lingering batch must go out, or room may never come
        while self._held_bytes + size > self._max_buffer_bytes and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)

    def _release(self, batch: _Batch) -> None:
        records = len(batch.records)
        self._held_bytes -= batch.nbytes
        self._unresolved -= records
        left = self._unreported[batch.generation] - records
        if left:
            self._unreported[batch.generation] = left
        else:
            del self._unreported[batch.generation]
            self._wake_flushes()
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _reported_up_to(self, generation: int) -> bool:
        """Whether every record of ``generation`` and the ones before has its report."""
        return not self._unreported or min(self._unreported) > generation

    def _wake_flushes(self) -> None:
        waiting = []
        for generation, waiter in self._flush_waiters:
            if self._reported_up_to(generation):
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((generation, waiter))
        self._flush_waiters = waiting

    def _fail_unsent(self, error: MlgateError) -> None:
        """Fail the records no sender has taken yet: the open batch and the ready ones."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        batches = [self._current] if self._current is not None else []
        self._current = None
        while not self._ready.empty():
            batch = self._ready.get_nowait()
            if batch is not None:
                batches.append(batch)
        for batch in batches:
            self._resolve_failed(batch, error)

    def _seal_if_current(self, batch: _Batch) -> None:
        if self._current is batch:
            self._seal()

    def _seal(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._current is not None:
            self._ready.put_nowait(self._current)
            self._current = None

    # -- sending -------------------------------------------------------------------

    def _start_senders(self) -> None:
        self._senders = [
            asyncio.create_task(self._sender(), name=f"mlgate-producer-sender-{n}")
            for n in range(self._max_in_flight)
        ]

    async def _sender(self) -> None:
        while (batch := await self._ready.get()) is not None:
            try:
                await self._deliver(batch)
            except asyncio.CancelledError:
                self._resolve_failed(batch, ProducerClosed("the producer was cancelled"))
                raise
            except BaseException as exc:  # never leave a future pending
                log.exception("mlgate_client.batch_crashed", extra={"records": len(batch.records)})
                self._resolve_failed(batch, MlgateError(f"batch failed: {exc!r}"))

    async def _deliver(self, batch: _Batch) -> None:
        body = batch_body(self._prefix, batch.records)
        key = uuid.uuid4().hex
        headers = {
            "Content-Type": "application/msgpack",
            "Idempotency-Key": key,
            "X-Request-ID": key,
        }
        attempts = 0

        async def attempt(remaining_s: float) -> object:
            nonlocal attempts
            attempts += 1
            timeout = min(self._request_timeout_s, remaining_s)
            answer = await self._transport.post(INGEST_PATH, body, headers, timeout)
            if answer.status != 202 or not counts_every_record(answer.document, len(batch.records)):
                # Not mlgate's answer to this batch (a captive portal, a proxy's page):
                # nothing says the records were written, so they are not reported so.
                raise UnexpectedAnswer(
                    f"unexpected answer to a batch of {len(batch.records)} records: "
                    f"{answer.status} {str(answer.document)[:200]}"
                )
            return answer.document

        def on_retry(retry: int, error: MlgateError, delay_s: float) -> None:
            cause = "connection" if isinstance(error, TransportError) else str(getattr(error, "status", "?"))
            self.stats.retries += 1
            self.stats.retries_by_cause[cause] += 1
            log.info(
                "mlgate_client.retry",
                extra={"idempotency_key": key, "records": len(batch.records), "retry": retry,
                       "cause": cause, "error": str(error), "delay_s": round(delay_s, 3)},
            )

        self.stats.batches += 1
        started = time.monotonic()
        try:
            document = await call_with_retries(attempt, self._retry, on_retry)
        except (PayloadTooLarge, ValidationFailed) as exc:
            if len(batch.records) > 1 and _too_big_for_the_server(exc):
                await self._deliver_halves(batch, exc)
                return
            if isinstance(exc, PayloadTooLarge):
                self._fail(batch, exc, key, attempts)
                return

            reports = all_rejected(batch.record_ids, exc.field_errors, exc.detail, attempts)
            if reports is None:
                self._fail(batch, exc, key, attempts)
            else:
                self._resolve(batch, reports)
        except MlgateError as exc:
            self._fail(batch, exc, key, attempts)
        else:
            self._resolve(batch, from_accepted(batch.record_ids, document, attempts))
            log.debug(
                "mlgate_client.batch_delivered",
                extra={"idempotency_key": key, "records": len(batch.records),
                       "attempts": attempts, "seconds": round(time.monotonic() - started, 4)},
            )

    async def _deliver_halves(self, batch: _Batch, refusal: MlgateError) -> None:
        """A batch the server found too large (its body or record limit is below this
        producer's ``max_bytes`` or ``max_records``) goes again as two halves, each
        under a key of its own (nothing of it was written: the refusal came before)."""
        middle = len(batch.records) // 2
        first_bytes = sum(len(record) for record in batch.records[:middle])
        halves = [
            _Batch(
                batch.records[:middle], batch.record_ids[:middle], batch.futures[:middle],
                first_bytes, generation=batch.generation,
            ),
            _Batch(
                batch.records[middle:], batch.record_ids[middle:], batch.futures[middle:],
                batch.nbytes - first_bytes, generation=batch.generation,
            ),
        ]
        batch.reported = True  # its records are the halves' now
        log.info(
            "mlgate_client.batch_split",
            extra={"records": len(batch.records), "error": str(refusal)},
        )
        for n, half in enumerate(halves):
            try:
                await self._deliver(half)
            except BaseException as exc:  # as the sender would for a batch of its own
                error = (
                    ProducerClosed("the producer was cancelled")
                    if isinstance(exc, asyncio.CancelledError)
                    else MlgateError(f"batch failed: {exc!r}")
                )
                for rest in halves[n:]:
                    self._resolve_failed(rest, error)
                raise

    def _resolve(self, batch: _Batch, reports: list[Delivery]) -> None:
        # Futures and accounting first, callbacks last: a callback that raises past
        # ``_notify`` (not an Exception) can then skip only later callbacks, never
        # leave a record unreported or report one twice (``reported``).
        batch.reported = True
        stats = self.stats
        for future, report in zip(batch.futures, reports, strict=True):
            if report.outcome is Outcome.ACCEPTED:
                stats.accepted += 1
            elif report.outcome is Outcome.DUPLICATE:
                stats.duplicate += 1
            elif report.outcome is Outcome.ACCEPTED_OR_DUPLICATE:
                stats.accepted_or_duplicate += 1
            else:
                stats.rejected += 1
                stats.rejected_by_reason[report.reason or "?"] += 1
            if not future.done():
                future.set_result(report)
        self._release(batch)
        for report in reports:
            self._notify(report.record_id, report)

    def _fail(self, batch: _Batch, error: MlgateError, key: str, attempts: int) -> None:
        log.warning(
            "mlgate_client.batch_failed",
            extra={"idempotency_key": key, "records": len(batch.records), "attempts": attempts,
                   "error": str(error), "problem": getattr(error, "problem", None)},
        )
        self._resolve_failed(batch, error)

    def _resolve_failed(self, batch: _Batch, error: MlgateError) -> None:
        if batch.reported:  # one report per record, whatever interrupted the batch
            return
        batch.reported = True
        self.stats.failed += len(batch.records)
        for future in batch.futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # reported here and in the log: no "never retrieved" noise
        self._release(batch)
        for record_id in batch.record_ids:
            self._notify(record_id, error)

    def _notify(self, record_id: str, result: Delivery | MlgateError) -> None:
        if self._on_delivery is None:
            return
        try:
            self._on_delivery(record_id, result)
        except (Exception, asyncio.CancelledError):  # a callback's, not this task's cancel
            log.exception("mlgate_client.on_delivery_failed", extra={"record_id": record_id})


def _too_big_for_the_server(error: MlgateError) -> bool:
    """A 413 for the body, or a 422 for the batch's number of records (``records``:
    "at most N records"): what a smaller batch avoids."""
    if isinstance(error, PayloadTooLarge):
        return True
    return isinstance(error, ValidationFailed) and any(
        entry.get("loc") == "records" and "at most" in str(entry.get("msg", ""))
        for entry in error.field_errors
    )
