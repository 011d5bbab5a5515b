"""LocalLogWriter: the actor that makes ingested records durable in the local log.

It group-commits: it takes everything waiting in its mailbox, writes the frames and
fsyncs once, in a thread of its own, before resolving the requests' futures; so a 202
means the records are on disk. Framing happens on the caller's turn, in ``submit``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from mlgate.workers.actor import Actor
from mlgate.workers.errors import SinkFailed
from mlgate.workers.sinks.local_log import LocalLog, frame
from mlgate.workers.sinks.records import OutboundRecord

log = structlog.get_logger("mlgate.local_log")


@dataclass(eq=False, slots=True)
class _Pending:
    frames: list[bytes]
    future: asyncio.Future[None]


class LocalLogWriter(Actor[_Pending]):
    """Actor: one task, one bounded mailbox, one thread for the blocking writes."""

    name = "local_log"

    def __init__(
        self, directory: str | Path, *, mailbox_size: int = 1024, segment_bytes: int = 64 * 1024 * 1024
    ) -> None:
        super().__init__(mailbox_size)
        self._directory = Path(directory)
        self._segment_bytes = segment_bytes
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="local-log")
        self._log: LocalLog | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._log = await loop.run_in_executor(
            self._executor, LocalLog, self._directory, self._segment_bytes
        )
        self._launch(self._run())
        log.info("local_log_started", directory=str(self._directory), next_offset=self._log.next_offset)

    @property
    def next_offset(self) -> int:
        """The offset the next record will get (records queued but unwritten excluded)."""
        return self._log.next_offset if self._log is not None else 0

    @property
    def durable_offset(self) -> int:
        """Every record below this offset is fsync'd."""
        return self._log.durable_offset if self._log is not None else 0

    async def write(self, records: list[OutboundRecord]) -> None:
        await self.submit(records)

    def submit(self, records: list[OutboundRecord]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Framing here, on the caller's turn, keeps the writer loop short.
        self._enqueue(_Pending([frame(r) for r in records], future))
        return future

    async def _release(self) -> None:
        if self._log is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._log.close)
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        assert self._log is not None
        loop = asyncio.get_running_loop()
        while True:
            taken = [await self._mailbox.get()]
            while not self._mailbox.empty():
                taken.append(self._mailbox.get_nowait())
            frames = [data for item in taken for data in item.frames]
            error: BaseException | None = None
            try:
                await loop.run_in_executor(self._executor, self._log.append, frames)
            except OSError as exc:
                log.error("local_log_write_failed", error=repr(exc))
                error = SinkFailed(f"local log write failed: {exc}")
            except BaseException:
                # Cancelled (close past its drain budget) or crashed mid-write: the
                # items taken are out of the mailbox, so fail them here or they hang.
                # Not as a refusal (``WorkerClosed``): the append goes on in its thread,
                # so their records may land.
                for item in taken:
                    if not item.future.done():
                        item.future.set_exception(
                            SinkFailed("local log writer stopped while writing: the records may have landed")
                        )
                    self._mailbox.task_done()
                raise
            for item in taken:
                if not item.future.done():
                    if error is None:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(error)
                self._mailbox.task_done()
