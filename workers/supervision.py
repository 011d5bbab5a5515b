"""SupervisedTask: the one shape of every long-lived background loop that is not an actor.

It runs one coroutine function forever. When the loop raises, the crash is logged
(``background_task_crashed`` with the error), reported to telemetry (a counter per
task), and the loop is started again after an exponential backoff (0.1 s doubling up
to 30 s; back to 0.1 s once a run has lasted a minute). ``healthy`` is False from a
crash until the restarted loop has run for ``settle_s`` without crashing again, so a
readiness check built on it tells the truth while the work is stuck. Cancellation
(``stop()``) is the only way out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from mlgate.workers.telemetry import NO_SUPERVISION_TELEMETRY, SupervisionTelemetry

log = structlog.get_logger("mlgate.supervision")

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 30.0
# A run this long counts as recovered: the next crash backs off from the start again.
RECOVERED_AFTER_S = 60.0


class SupervisedTask:
    def __init__(
        self,
        name: str,
        loop: Callable[[], Awaitable[None]],
        telemetry: SupervisionTelemetry = NO_SUPERVISION_TELEMETRY,
        settle_s: float = 1.0,
    ) -> None:
        self.name = name
        self._loop = loop
        self._telemetry = telemetry
        self._settle_s = settle_s
        self._task: asyncio.Task[None] | None = None
        self._backing_off = False
        self._last_start = 0.0
        self.crashes = 0

    @property
    def healthy(self) -> bool:
        """Running, and not crashed within the last ``settle_s`` of its current run."""
        if self._task is None or self._task.done() or self._backing_off:
            return False
        return self.crashes == 0 or time.monotonic() - self._last_start >= self._settle_s

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _supervise(self) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            self._last_start = time.monotonic()
            try:
                await self._loop()
                error: BaseException = RuntimeError("the loop returned")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the point of a supervisor: any crash is restarted
                error = exc
            self._backing_off = True
            if time.monotonic() - self._last_start >= RECOVERED_AFTER_S:
                backoff = FIRST_BACKOFF_S
            self.crashes += 1
            log.error(
                "background_task_crashed",
                task=self.name,
                error=repr(error),
                restart_in_s=backoff,
                exc_info=error,
            )
            self._telemetry.background_task_crashed(self.name)
            await asyncio.sleep(backoff)
            self._backing_off = False
            backoff = min(backoff * 2, MAX_BACKOFF_S)
