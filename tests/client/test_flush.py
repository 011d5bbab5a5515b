"""``flush``: it waits for the records sent before it, not for the ones other tasks
send while it waits."""

from __future__ import annotations

import asyncio

from aiohttp import web
from mlgate_client import Producer

from tests.client.scripted import Scripted, accepted


async def test_flush_returns_while_another_task_keeps_sending(scripted: Scripted) -> None:
    """A review: flush() waited until no record at all was pending, so with a task
    still sending it never returned."""

    async def slowly(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)  # so that some batch is always in flight, as over a network
        return await accepted(request)

    scripted.script = [slowly]
    stop = asyncio.Event()
    async with Producer(scripted.url, "s", linger_ms=20) as producer:

        async def keep_sending() -> None:
            while not stop.is_set():
                await producer.send([0.1])
                await asyncio.sleep(0.001)

        feeder = asyncio.create_task(keep_sending())
        await asyncio.sleep(0.1)
        before = [await producer.send([0.2]) for _ in range(10)]
        try:
            await producer.flush(timeout_s=5)
            assert all(future.done() for future in before)
        finally:
            stop.set()
            await feeder
    assert all(future.result().delivered for future in before)
