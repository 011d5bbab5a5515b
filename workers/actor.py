"""Actor: the one worker shape every mlgate worker shares.

An actor owns exactly one task and one bounded mailbox of items that each carry a
future. A full mailbox raises ``MailboxFull`` at once (the caller answers 503, it
never waits); ``close()`` stops taking work, lets the task drain what was accepted
within a budget, then cancels it and fails whatever is left with ``WorkerClosed``;
if the task dies, a done-callback fails every pending future, so no request waits
forever (after aiokafka's ``Sender._fail_all``).

Subclasses write ``_run`` (the loop) and may extend ``_drained`` (more to wait for
than the mailbox), ``_held`` (items taken out of the mailbox but not yet finished),
``_crashed`` (what else to do when the task dies, such as counting it) and
``_release`` (what to free once the task has stopped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar

import structlog

from mlgate.workers.errors import MailboxFull, WorkerClosed

log = structlog.get_logger("mlgate.actor")


class HasFuture(Protocol):
    @property
    def future(self) -> asyncio.Future[Any]: ...


ItemT = TypeVar("ItemT", bound=HasFuture)


class Actor(Generic[ItemT]):
    name: str = "actor"

    def __init__(self, mailbox_size: int, mailbox: type[asyncio.Queue[Any]] = asyncio.Queue) -> None:
        # ``mailbox``: a Queue class (``LaneMailbox`` takes items lane by lane).
        self._mailbox: asyncio.Queue[ItemT] = mailbox(mailbox_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # takes no more work (closing, or the task died)
        self._stopped = False  # close() has run: resources released

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closed

    @property
    def healthy(self) -> bool:
        return self.running

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

    def _launch(self, loop_body: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(loop_body, name=self.name)
        self._task.add_done_callback(self._fail_all)

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

    def _crashed(self, error: BaseException) -> None:
        pass

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
            log.error("actor_crashed", actor=self.name, error=repr(error))
            self._closed = True
            self._fail_pending(WorkerClosed(f"{self.name} crashed: {error!r}"))
            self._crashed(error)
