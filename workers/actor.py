"""Actor: the one worker shape every mlgate worker shares.

An actor owns exactly one task and one bounded mailbox of items that each carry a
future. A full mailbox raises ``MailboxFull`` at once (the caller answers 503, it
never waits); ``close()`` stops taking work, lets the task drain what was accepted
within a budget, then cancels it and fails whatever is left with ``WorkerClosed``.

The task supervises the actor's loop (``_run``): when the loop raises, the crash is
logged (``actor_crashed``), counted (``background_task_crashed`` to telemetry, under
``crash_label``), every item queued or held fails with ``WorkerClosed`` (so no
request waits for a loop that is gone), and after the backoff of
``workers.supervision.Restarts`` the actor recovers (``_recover``) and runs its loop
again. Meanwhile it takes no work (``submit`` raises
``WorkerClosed``: a 503) and is not ``healthy`` until the new run has lasted a second,
so ``/ready`` tells the truth. If the task itself dies (anything but an ``Exception``)
a done-callback fails every pending future (after aiokafka's ``Sender._fail_all``).

Subclasses write ``_run`` (the loop) and may extend ``_drained`` (more to wait for
than the mailbox), ``_held`` (items taken out of the mailbox but not yet finished),
``_fail_pending`` (how a failed item is let go), ``_recover`` (what to put right
before the loop runs again) and ``_release`` (what to free once the task has stopped).
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, Protocol, TypeVar

import structlog

from mlgate.workers.errors import MailboxFull, WorkerClosed
from mlgate.workers.supervision import Restarts, background_context, stray_cancellation
from mlgate.workers.telemetry import NO_SUPERVISION_TELEMETRY, SupervisionTelemetry

log = structlog.get_logger("mlgate.actor")


class HasFuture(Protocol):
    @property
    def future(self) -> asyncio.Future[Any]: ...


ItemT = TypeVar("ItemT", bound=HasFuture)


class Actor(Generic[ItemT]):
    name: str = "actor"

    def __init__(
        self,
        mailbox_size: int,
        mailbox: type[asyncio.Queue[Any]] = asyncio.Queue,
        telemetry: SupervisionTelemetry = NO_SUPERVISION_TELEMETRY,
    ) -> None:
        # ``mailbox``: a Queue class (``LaneMailbox`` takes items lane by lane).
        self._mailbox: asyncio.Queue[ItemT] = mailbox(mailbox_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # takes no more work (closing, or the task died)
        self._stopped = False  # close() has run: resources released
        self._restarts = Restarts()
        self._crash_telemetry = telemetry

    @property
    def crash_label(self) -> str:
        """The actor's name in ``mlgate_background_task_crashes_total{task}``."""
        return self.name

    @property
    def crashes(self) -> int:
        return self._restarts.crashes

    @property
    def running(self) -> bool:
        """Taking work: started, not closed, and not between a crash and its restart."""
        return (
            self._task is not None
            and not self._task.done()
            and not self._closed
            and not self._restarts.backing_off
        )

    @property
    def dead(self) -> bool:
        """Its task has ended (closed, or killed by what a restart does not cover)."""
        return self._task is not None and self._task.done()

    @property
    def healthy(self) -> bool:
        """Running, and its loop has run for a second since its last crash, if any."""
        return self.running and self._restarts.settled

    @property
    def mailbox_depth(self) -> int:
        return self._mailbox.qsize()

    @property
    def mailbox_full(self) -> bool:
        return self._mailbox.full()

    def _new_future(self) -> asyncio.Future[Any]:
        """A future on the actor's loop, without ``asyncio.get_running_loop()``'s system
        call (Python 3.11 asks the process id each time): one a request."""
        task = self._task
        loop = task.get_loop() if task is not None else asyncio.get_running_loop()
        return loop.create_future()

    def _launch(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._supervise(), name=self.name, context=background_context()
        )
        self._task.add_done_callback(self._fail_all)

    async def _run(self) -> None:
        raise NotImplementedError

    async def _supervise(self) -> None:
        crashed = False
        while True:
            try:
                if crashed:
                    await self._recover()
                self._restarts.started()
                await self._run()
                error: BaseException = RuntimeError("the loop returned")
            except asyncio.CancelledError as exc:
                if not stray_cancellation():
                    raise
                error = exc  # out of a future another party cancelled: a crash
            except Exception as exc:  # a bug: the actor runs again rather than stay dead
                error = exc
            crashed = True
            backoff = self._restarts.crashed()
            log.error(
                "actor_crashed", actor=self.name, error=repr(error), restart_in_s=backoff, exc_info=error
            )
            self._crash_telemetry.background_task_crashed(self.crash_label)
            # The error itself goes to the log only: it is ours, not the caller's.
            self._fail_pending(WorkerClosed(f"{self.name} crashed; it restarts"))
            await asyncio.sleep(backoff)

    async def _recover(self) -> None:
        """Put right what the crashed run left, before the loop runs again; raising
        counts as another crash."""

    def _enqueue(self, item: ItemT) -> None:
        if not self.running:
            item.future.cancel()
            raise WorkerClosed(f"{self.name} is not running")
        try:
            self._mailbox.put_nowait(item)
        except asyncio.QueueFull:
            item.future.cancel()
            raise MailboxFull(f"{self.name} mailbox is full") from None

    async def close(self, drain_s: float = 10.0) -> None:
        """Stop taking work, drain what was accepted (up to ``drain_s``), stop. Idempotent;
        after a crash it still releases what the actor holds."""
        if self._stopped:
            return
        self._closed = self._stopped = True
        if self._task is not None and not self._task.done():
            if not self._restarts.backing_off:  # else the crash failed what there was
                try:
                    await asyncio.wait_for(self._drained(), drain_s)
                except TimeoutError:
                    log.warning("actor_drain_timeout", actor=self.name, left=self._mailbox.qsize())
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_pending(WorkerClosed(f"{self.name} stopped"))
        await self._release()

    async def _drained(self) -> None:
        await self._mailbox.join()

    def _held(self) -> list[ItemT]:
        return []

    async def _release(self) -> None:
        pass

    def _fail_pending(self, error: BaseException) -> None:
        pending = self._held()
        while not self._mailbox.empty():
            pending.append(self._mailbox.get_nowait())
            self._mailbox.task_done()
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)

    def _fail_all(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("actor_died", actor=self.name, error=repr(error))
            self._closed = True
            self._fail_pending(WorkerClosed(f"{self.name} stopped: its task died"))
            self._crash_telemetry.background_task_crashed(self.crash_label)
