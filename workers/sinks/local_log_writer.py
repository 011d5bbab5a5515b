"""LocalLogWriter: the actor that makes ingested records durable in the local log.

It group-commits: it takes everything waiting in its mailbox, writes the frames and
fsyncs once, in a thread of its own, before resolving the requests' futures; so a 202
means the records are on disk. Framing happens on the caller's turn, in ``submit``.

A failed write (a full disk, a read-only one, a quota, an I/O error) makes the writer
unhealthy, so ``/ready`` takes the process out of rotation rather than leave it
answering 503s, until a write succeeds: asked for its health, it tries a probe write
(at most once a second, in its own thread, behind the writes): ``min_free_bytes``
(by default 16 MB, or a quarter of a smaller disk) free and writable by ``statvfs``,
then a small file written, fsync'd and removed.
A log left broken by a failed write (its cut-back failed too, or its directory was
removed under it) is repaired first, by the probe or by the next write.

A write that has not finished after ``stall_s`` (a hung disk, an fsync that does not
return) is logged (``local_log_write_stalled``) and counted as a write error, and makes
the writer unhealthy until it ends (a review: ingests waited as long as the disk hung,
60 s and more, while ``/ready`` said 200). The write itself goes on: its outcome is
still what settles its records' ids; the ingests waiting on it are answered at
``answer_within_s`` by the pipeline.

Written and failed records count in ``mlgate_records_total{outcome}``. A crash of the
writer's loop is counted in ``mlgate_background_task_crashes_total{task="local_log"}``
(``spill`` for the spill), fails what was queued, and the loop runs again on the log
opened afresh (``_recover``), as a restarted process would find it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from mlgate.workers.actor import Actor
from mlgate.workers.errors import SinkFailed
from mlgate.workers.sinks.local_log import LocalLog, RepairFailed, frame
from mlgate.workers.sinks.records import OutboundRecord
from mlgate.workers.supervision import background_context
from mlgate.workers.telemetry import NO_TELEMETRY, WorkerTelemetry

log = structlog.get_logger("mlgate.local_log")
# After a failed write, healthy again once this much is free (and writable).
MIN_FREE_BYTES = 16 * 1024 * 1024
PROBE_INTERVAL_S = 1.0
# A write (its frames and fsync) not done in this long stalls: as long as Kafka's
# direct writes wait (two produce timeouts of 5 s) before they spill.
STALL_S = 10.0


@dataclass(eq=False, slots=True)
class _Pending:
    frames: list[bytes]
    future: asyncio.Future[None]


class LocalLogWriter(Actor[_Pending]):
    """Actor: one task, one bounded mailbox, one thread for the blocking writes."""

    name = "local_log"

    def __init__(
        self,
        directory: str | Path,
        *,
        mailbox_size: int = 1024,
        segment_bytes: int = 64 * 1024 * 1024,
        min_free_bytes: int | None = None,
        telemetry: WorkerTelemetry = NO_TELEMETRY,
        spill: bool = False,
        stall_s: float | None = None,
    ) -> None:
        """``spill``: the Kafka sink's spill, whose records its sink counts (failed,
        spilled, then produced): this writer counts none, and a crash as ``spill``."""
        super().__init__(mailbox_size, telemetry=telemetry)
        if spill:
            self.name = "spill"
        self._counts_records = not spill
        self._directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="local-log")
        self._log: LocalLog | None = None
        self.min_free_bytes = min_free_bytes
        self._write_failed = False
        self._last_error = ""
        self._telemetry = telemetry
        self._probing = False
        self._probed_at = 0.0
        self._probe_timer: asyncio.TimerHandle | None = None
        self._stall_s = STALL_S if stall_s is None else stall_s
        self._stalled_since: float | None = None  # of the write in hand, once it stalls
        # The offset after every record handed to ``submit``: appends are in order and
        # all or nothing, so this is where the log will end once the mailbox is done.
        self._accepted = 0

    @property
    def healthy(self) -> bool:
        if not super().healthy:  # not running, or restarted after a crash and not settled
            return False
        if self._write_failed:
            self._probe_soon()
        return not self._write_failed and self._stalled_since is None

    @property
    def problem(self) -> str | None:
        if self.healthy:
            return None
        if self.crashes and not self._restarts.settled:
            return f"the local log writer at {self._directory} restarts after a crash"
        if not self.running:
            return f"the local log at {self._directory} is not running"
        if self._stalled_since is not None:
            return f"a write to {self._directory} has not finished in {self._stall_s:g} s: its disk stalls"
        return f"writes to {self._directory} fail: {self._last_error}"

    async def roll_at(self, offset: int) -> bool:
        """``LocalLog.roll_at`` in the writer's thread, after the appends handed to it
        (none can come between its check of the end and the new segment)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._roll_at, offset)

    def _roll_at(self, offset: int) -> bool:
        return self._log is not None and self._log.roll_at(offset)

    def _probe_soon(self) -> None:
        if self._probing or time.monotonic() - self._probed_at < PROBE_INTERVAL_S:
            return
        self._probing, self._probed_at = True, time.monotonic()
        probe = asyncio.get_running_loop().run_in_executor(self._executor, self._probe_write)
        # Asked by ``/ready``: its line must not carry that request's id (a review).
        probe.add_done_callback(self._probed, context=background_context())

    def _probe_while_failing(self) -> None:
        """While writes fail, a probe a second whether or not anybody asks: ``healthy``
        then says writable within about a second of room coming back (a review: the
        probe ran only when ``/ready`` asked, that request got the old answer, and a
        healthy host stayed out of its balancer for one more health-check interval)."""
        self._probe_timer = None
        if not self._write_failed or not self.running:
            return
        self._probe_soon()
        self._probe_later()

    def _probe_later(self) -> None:
        # A little past the interval: ``_probe_soon`` skips a probe asked sooner.
        self._probe_timer = asyncio.get_running_loop().call_later(
            PROBE_INTERVAL_S * 1.05 + 0.001, self._probe_while_failing
        )

    def _writes_failing(self) -> None:
        """Writes fail from now: probes run (``_probe_while_failing``) until one works."""
        self._write_failed, self._probed_at = True, time.monotonic()
        if self._probe_timer is None:
            self._probe_later()

    def _probed(self, probe: asyncio.Future[bool]) -> None:
        self._probing = False
        if not probe.cancelled() and probe.exception() is None and probe.result():
            self._write_failed = False
            log.info("local_log_writable_again", directory=str(self._directory))

    def _probe_write(self) -> bool:
        """In the writer's thread: whether a write of ours would succeed now."""
        try:
            if self._log is not None:
                self._log.repair()
            stats = os.statvfs(self._directory)
            if stats.f_flag & os.ST_RDONLY or stats.f_favail == 0:
                return False
            wanted = self.min_free_bytes
            if wanted is None:
                # A disk smaller than four times the margin (a small volume of its own)
                # needs a quarter of itself free: 16 MB of 3 MB could never be.
                wanted = min(MIN_FREE_BYTES, stats.f_blocks * stats.f_frsize // 4)
            if stats.f_bavail * stats.f_frsize < wanted:
                return False
            probe = self._directory / ".write-probe"
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError:
            return False
        return True

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._log = await loop.run_in_executor(
            self._executor, LocalLog, self._directory, self._segment_bytes
        )
        self._accepted = self._log.next_offset
        self._launch()
        log.info("local_log_started", directory=str(self._directory), next_offset=self._log.next_offset)
        # A disk full (or read-only) at start-up: unready from the start, not from the
        # first ingest that fails on it (a review: /ready said ready on a full disk).
        self._probed_at = time.monotonic()
        if not await loop.run_in_executor(self._executor, self._probe_write):
            self._writes_failing()
            self._last_error = "its disk is full or not writable (seen at start-up)"
            log.warning("local_log_not_writable", directory=str(self._directory), detail=self._last_error)

    @property
    def next_offset(self) -> int:
        """The offset the next record will get (records queued but unwritten excluded)."""
        return self._log.next_offset if self._log is not None else 0

    @property
    def accepted_offset(self) -> int:
        """The offset after every record handed to ``submit`` and not refused: queued
        same); a failed append gives its records back. Once the writer's task has
        ended, or while it restarts after a crash (its queue failed), the log's durable
        end: a crash mid-append may leave frames past it that no fsync covered."""
        task = self._task
        if task is None or task.done() or self._restarts.backing_off:
            return self.durable_offset
        return self._accepted

    @property
    def durable_offset(self) -> int:
        """Every record below this offset is fsync'd."""
        return self._log.durable_offset if self._log is not None else 0

    async def write(
        self, records: list[OutboundRecord], lane: str = "", tenants: Sequence[tuple[str, int]] = ()
    ) -> None:
        # Every write waiting goes in the next fsync: no lane waits for another's turn;
        # the log is bounded by its disk, not shared out by tenant.
        await self.submit(records)

    @property
    def answer_within_s(self) -> float:
        """How long a caller should wait for a write before it is told its records
        may still land (``IngestPipeline``): past it, the disk stalls."""
        return self._stall_s

    def submit(self, records: list[OutboundRecord]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Framing here, on the caller's turn, keeps the writer loop short.
        self._enqueue(_Pending([frame(r) for r in records], future))
        self._accepted += len(records)
        return future

    async def _recover(self) -> None:
        """The log opened again, as at start: whatever the crashed run left (frames of
        an append it never finished) is recovered or cut as a torn tail, and the
        offsets are counted again from the disk."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._reopen)
        assert self._log is not None
        self._accepted = self._log.next_offset
        log.info("local_log_reopened", directory=str(self._directory), next_offset=self._accepted)

    def _reopen(self) -> None:
        """In the writer's thread, so that a close cancelling ``_recover`` meanwhile
        still closes the log opened here (``_release`` runs behind it)."""
        if self._log is not None:
            self._log.close()
        self._log = LocalLog(self._directory, self._segment_bytes)

    async def _release(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if self._log is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._log.close)
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            taken = [await self._mailbox.get()]
            while not self._mailbox.empty():
                taken.append(self._mailbox.get_nowait())
            try:
                error = await self._write(taken)
                for item in taken:
                    if not item.future.done():
                        if error is None:
                            item.future.set_result(None)
                        else:
                            item.future.set_exception(error)
            except BaseException:
                # Cancelled (close past its drain budget) or crashed, mid-write or after:
                # the items taken are out of the mailbox, so fail them here or they
                # hang. Not as a refusal (``WorkerClosed``): the append may have been
                # made, or goes on in its thread, so their records may land.
                for item in taken:
                    if not item.future.done():
                        item.future.set_exception(
                            SinkFailed("local log writer stopped while writing: the records may have landed")
                        )
                raise
            finally:
                for _ in taken:
                    self._mailbox.task_done()

    def _stalls(self, started: float) -> None:
        self._stalled_since = started
        log.error("local_log_write_stalled", directory=str(self._directory), stall_s=self._stall_s)
        self._telemetry.local_log_write_failed()

    async def _write(self, taken: list[_Pending]) -> SinkFailed | None:
        """Append the items' frames and fsync: the error to fail them with, if any."""
        assert self._log is not None
        frames = [data for item in taken for data in item.frames]
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        stall = loop.call_later(self._stall_s, self._stalls, started)
        try:
            await loop.run_in_executor(self._executor, self._log.append, frames)
        except OSError as exc:
            self._accepted -= len(frames)  # the log was cut back to where it was
            # Logged when writes start failing (and when they work again), not once
            # a write: a full disk under load would otherwise log a line a request.
            if not self._write_failed:
                log.error("local_log_write_failed", directory=str(self._directory), error=repr(exc))
            self._writes_failing()
            self._last_error = str(exc)
            self._telemetry.local_log_write_failed()
            if self._counts_records:
                self._telemetry.local_log_batch_failed(len(frames))
            # Nothing of this write can land if the log was cut back, or if the
            # repair of an earlier failure stopped it before it wrote a frame.
            return SinkFailed(
                f"local log write failed: {exc}",
                nothing_written=isinstance(exc, RepairFailed) or not self._log.broken,
            )
        finally:
            stall.cancel()
            if self._stalled_since is not None:
                self._stalled_since = None
                log.info(
                    "local_log_write_finished", directory=str(self._directory),
                    took_s=round(time.monotonic() - started, 3),
                )
        if self._write_failed:
            self._write_failed = False
            log.info("local_log_writable_again", directory=str(self._directory))
        if self._counts_records:
            self._telemetry.local_log_batch_written(len(frames))
        return None
