"""SupervisedTask: the one shape of every long-lived background loop that is not an actor;
``Restarts``: the restart policy it shares with the actors (``workers.actor``).

A supervised task runs one coroutine function forever. When the loop raises, the crash
is logged (``background_task_crashed`` with the error), reported to telemetry (a
counter per task), and the loop is started again after an exponential backoff (0.1 s
doubling up to 30 s; back to 0.1 s once a run has lasted a minute). ``healthy`` is
False from a crash until the restarted loop has run for ``settle_s`` without crashing
again, so a readiness check built on it tells the truth while the work is stuck.
Cancellation (``stop()``) is the only way out: a ``CancelledError`` raised into the
loop while nobody cancelled its task (out of a future another party cancelled) is a
crash like any other (``stray_cancellation``). Loops start in a context of their own
(``background_context``), not in the request's that started them.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable

import structlog

from mlgate.workers.telemetry import NO_SUPERVISION_TELEMETRY, SupervisionTelemetry

log = structlog.get_logger("mlgate.supervision")

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 30.0
# A run this long counts as recovered: the next crash backs off from the start again.
RECOVERED_AFTER_S = 60.0


def stray_cancellation() -> bool:
    """Whether the ``CancelledError`` being handled is no request to stop the current
    task: raised out of an awaited future that another party cancelled. Such a loop
    is restarted; it ended without a line, a count or a restart (a review: a model's
    worker stayed dead, its ``/ready`` reason saying it restarts)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def background_context() -> contextvars.Context:
    """A context of its own for a long-lived task or a callback of one: started from a
    request, it would carry that request's id on every line it logs (a review: a
    worker's crash logged under the id of the load request that had started it)."""
    return contextvars.Context()


class Restarts:
    """When a crashed loop runs again, and whether it has settled since: backoff from
    ``FIRST_BACKOFF_S`` doubling up to ``MAX_BACKOFF_S``, from the first again once a
    run has lasted ``RECOVERED_AFTER_S``; settled once the run after a crash has
    lasted ``settle_s``."""

    def __init__(self, settle_s: float = 1.0) -> None:
        self.crashes = 0
        self.backing_off = False  # between a crash and the next run's start
        self._settle_s = settle_s
        self._backoff = FIRST_BACKOFF_S
        self._started_at = 0.0

    def started(self) -> None:
        self.backing_off = False
        self._started_at = time.monotonic()

    def crashed(self) -> float:
        """Count a crash of the current run (or of the recovery before it); how long to
        wait before the next try."""
        # Only a run that lasted counts as recovered: recoveries that fail keep doubling
        # (a review: a reopen failing after a long run retried ten times a second).
        if not self.backing_off and time.monotonic() - self._started_at >= RECOVERED_AFTER_S:
            self._backoff = FIRST_BACKOFF_S
        self.backing_off = True
        self.crashes += 1
        delay = self._backoff
        self._backoff = min(delay * 2, MAX_BACKOFF_S)
        return delay

    @property
    def settled(self) -> bool:
        if self.backing_off:
            return False
        return self.crashes == 0 or time.monotonic() - self._started_at >= self._settle_s


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
        self._task: asyncio.Task[None] | None = None
        self._restarts = Restarts(settle_s)

    @property
    def crashes(self) -> int:
        return self._restarts.crashes

    @property
    def healthy(self) -> bool:
        """Running, and not crashed within the last ``settle_s`` of its current run."""
        if self._task is None or self._task.done():
            return False
        return self._restarts.settled

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=self.name, context=background_context()
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _supervise(self) -> None:
        while True:
            self._restarts.started()
            try:
                await self._loop()
                error: BaseException = RuntimeError("the loop returned")
            except asyncio.CancelledError as exc:
                if not stray_cancellation():
                    raise
                error = exc
            except Exception as exc:  # the point of a supervisor: any crash is restarted
                error = exc
            backoff = self._restarts.crashed()
            log.error(
                "background_task_crashed",
                task=self.name,
                error=repr(error),
                restart_in_s=backoff,
                exc_info=error,
            )
            self._telemetry.background_task_crashed(self.name)
            await asyncio.sleep(backoff)
