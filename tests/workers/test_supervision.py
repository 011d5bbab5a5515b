"""SupervisedTask: a crashed background loop is logged, counted, restarted, and unhealthy
until it has run again for a while."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from mlgate.workers.supervision import RECOVERED_AFTER_S, Restarts, SupervisedTask


class CountingTelemetry:
    def __init__(self) -> None:
        self.crashes: list[str] = []

    def background_task_crashed(self, task: str) -> None:
        self.crashes.append(task)


async def test_a_crashed_loop_is_logged_counted_and_restarted() -> None:
    runs = 0
    second_run = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise FileNotFoundError("segment gone")
        second_run.set()
        await asyncio.Event().wait()

    telemetry = CountingTelemetry()
    task = SupervisedTask("drainer", loop, telemetry, settle_s=0)
    with capture_logs() as logs:
        task.start()
        await asyncio.wait_for(second_run.wait(), 5)
    await task.stop()
    assert runs == 2
    assert telemetry.crashes == ["drainer"]
    crashed = [line for line in logs if line["event"] == "background_task_crashed"]
    assert crashed[0]["task"] == "drainer"
    assert "segment gone" in crashed[0]["error"]


async def test_a_loop_is_unhealthy_from_its_crash_until_it_has_run_for_a_while() -> None:
    crashed = asyncio.Event()
    restarted = asyncio.Event()
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            crashed.set()
            raise RuntimeError("boom")
        restarted.set()
        await asyncio.Event().wait()

    task = SupervisedTask("poller", loop, settle_s=3600)
    task.start()
    await asyncio.sleep(0)
    await asyncio.wait_for(crashed.wait(), 5)
    await asyncio.wait_for(restarted.wait(), 5)
    assert not task.healthy  # restarted, but not yet settled
    await task.stop()
    assert not task.healthy


async def test_a_loop_that_never_crashed_is_healthy_and_stops_on_request() -> None:
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    task = SupervisedTask("sampler", loop)
    task.start()
    await asyncio.wait_for(started.wait(), 5)
    assert task.healthy
    await task.stop()
    assert task.crashes == 0


def test_recoveries_that_fail_after_a_long_run_keep_doubling_their_backoff() -> None:
    restarts = Restarts()
    restarts.started()
    restarts._started_at -= RECOVERED_AFTER_S + 1  # the run lasted: its crash backs off from the start
    delays = [restarts.crashed() for _ in range(4)]  # then each recovery fails
    assert delays == [0.1, 0.2, 0.4, 0.8]


async def test_a_cancelled_future_raised_into_the_loop_is_a_crash_and_restarted() -> None:
    """A review: the loop ended silently, and polling stopped for good."""
    runs = 0
    second_run = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            elsewhere: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            elsewhere.cancel()
            await elsewhere
        second_run.set()
        await asyncio.Event().wait()

    telemetry = CountingTelemetry()
    task = SupervisedTask("model-poller", loop, telemetry, settle_s=0)
    with capture_logs() as logs:
        task.start()
        await asyncio.wait_for(second_run.wait(), 5)
    await task.stop()
    assert runs == 2 and telemetry.crashes == ["model-poller"]
    assert [line["event"] for line in logs] == ["background_task_crashed"]


async def test_stop_still_ends_the_loop() -> None:
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    telemetry = CountingTelemetry()
    task = SupervisedTask("poller", loop, telemetry)
    task.start()
    await asyncio.wait_for(started.wait(), 5)
    await task.stop()
    assert not task.healthy and telemetry.crashes == []
