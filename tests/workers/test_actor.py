"""Actor: a crashed loop fails what waits for it, is logged and counted, and runs again;
meanwhile the actor takes no work and is not healthy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import structlog
from structlog.testing import capture_logs

from mlgate.workers.actor import Actor
from mlgate.workers.errors import WorkerClosed
from mlgate.workers.supervision import Restarts
from tests.support import until

CRASH = "crash"
CANCELLED = "cancelled"  # the loop awaits a future another party cancelled


@dataclass(eq=False)
class _Item:
    value: str
    future: asyncio.Future[str]


class CountingTelemetry:
    def __init__(self) -> None:
        self.crashes: list[str] = []

    def background_task_crashed(self, task: str) -> None:
        self.crashes.append(task)


class Echo(Actor[_Item]):
    """Answers each item with its value; an item ``CRASH`` crashes the loop."""

    name = "echo"

    def __init__(self, telemetry: CountingTelemetry) -> None:
        super().__init__(8, telemetry=telemetry)
        self.recoveries = 0
        self.failing_recoveries = 0
        self._current: _Item | None = None

    def start(self) -> None:
        self._launch()

    def submit(self, value: str) -> asyncio.Future[str]:
        future: asyncio.Future[str] = self._new_future()
        self._enqueue(_Item(value, future))
        return future

    def _held(self) -> list[_Item]:
        return [self._current] if self._current is not None else []

    async def _recover(self) -> None:
        self.recoveries += 1
        self._current = None
        if self.failing_recoveries:
            self.failing_recoveries -= 1
            raise OSError("not yet")

    async def _run(self) -> None:
        while True:
            self._current = await self._mailbox.get()
            self._mailbox.task_done()
            if self._current.value == CRASH:
                raise RuntimeError("echo bug")
            if self._current.value == CANCELLED:
                elsewhere: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                elsewhere.cancel()
                await elsewhere
            self._current.future.set_result(self._current.value)
            self._current = None


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    actor = Echo(CountingTelemetry())
    actor.start()
    yield actor
    await actor.close(drain_s=1)



async def test_a_crash_fails_the_item_in_hand_and_those_queued(echo: Echo) -> None:
    crashing, queued = echo.submit(CRASH), echo.submit("queued")
    for future in (crashing, queued):
        with pytest.raises(WorkerClosed, match="echo crashed; it restarts"):
            await future


async def test_a_crash_is_logged_and_counted(echo: Echo) -> None:
    with capture_logs() as logs:
        with pytest.raises(WorkerClosed):
            await echo.submit(CRASH)
    crashed = [line for line in logs if line["event"] == "actor_crashed"]
    assert [(line["actor"], line["restart_in_s"]) for line in crashed] == [("echo", 0.1)]
    assert "echo bug" in crashed[0]["error"]
    assert echo.crashes == 1
    assert echo._crash_telemetry.crashes == ["echo"]  # type: ignore[attr-defined]


async def test_a_cancelled_future_raised_into_its_loop_is_a_crash_it_recovers_from(
    echo: Echo,
) -> None:
    """A review: a CancelledError out of an awaited future ended the actor's task with
    no line, no count and no restart; only a cancellation of the task itself stops it."""
    with capture_logs() as logs:
        with pytest.raises(WorkerClosed, match="echo crashed; it restarts"):
            await echo.submit(CANCELLED)
    assert [line["event"] for line in logs if line["event"] == "actor_crashed"] == ["actor_crashed"]
    assert echo._crash_telemetry.crashes == ["echo"]  # type: ignore[attr-defined]
    await until(lambda: echo.running)
    assert await echo.submit("after") == "after"


async def test_its_loop_logs_in_no_context_of_the_request_that_started_it() -> None:
    """A review: a worker started by a request logged its crash under that request's id."""
    structlog.contextvars.bind_contextvars(request_id="the-starting-request")
    actor = Echo(CountingTelemetry())
    try:
        actor.start()
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            with pytest.raises(WorkerClosed):
                await actor.submit(CRASH)
        [crashed] = [line for line in logs if line["event"] == "actor_crashed"]
        assert "request_id" not in crashed
    finally:
        await actor.close(drain_s=1)


async def test_a_crashed_actor_recovers_and_answers_again(echo: Echo) -> None:
    with pytest.raises(WorkerClosed):
        await echo.submit(CRASH)
    await until(lambda: echo.running)
    assert await echo.submit("after") == "after"
    assert echo.recoveries == 1


async def test_between_its_crash_and_its_restart_an_actor_refuses_work(echo: Echo) -> None:
    with pytest.raises(WorkerClosed):
        await echo.submit(CRASH)
    assert not echo.running and not echo.healthy
    with pytest.raises(WorkerClosed, match="not running"):
        echo.submit("too soon")


async def test_a_restarted_actor_is_not_healthy_until_its_new_run_has_settled(echo: Echo) -> None:
    echo._restarts = Restarts(settle_s=3600)
    with pytest.raises(WorkerClosed):
        await echo.submit(CRASH)
    await until(lambda: echo.running)
    assert not echo.healthy
    echo._restarts = Restarts(settle_s=0)
    assert echo.healthy


async def test_a_recovery_that_fails_counts_as_another_crash(echo: Echo) -> None:
    echo.failing_recoveries = 1
    with pytest.raises(WorkerClosed):
        await echo.submit(CRASH)
    await until(lambda: echo.running)
    assert echo.crashes == 2 and echo.recoveries == 2
    assert await echo.submit("after") == "after"


async def test_close_during_the_backoff_does_not_wait_for_the_restart(echo: Echo) -> None:
    echo._restarts._backoff = 30.0  # the next restart is half a minute away
    with pytest.raises(WorkerClosed):
        await echo.submit(CRASH)
    await asyncio.wait_for(echo.close(drain_s=10), 1)
    assert echo.dead and echo.recoveries == 0


async def test_a_loop_that_returns_is_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    echo = Echo(CountingTelemetry())
    loop, runs = echo._run, 0

    async def returns_the_first_time() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            await loop()

    monkeypatch.setattr(echo, "_run", returns_the_first_time)
    echo.start()
    try:
        await until(lambda: runs == 2 and echo.running)
        assert echo.crashes == 1
        assert await echo.submit("after") == "after"
    finally:
        await echo.close()
