"""Connection hygiene on the bare server: a real ``mlgate serve`` and raw sockets.

A client that sends half a head, or a head and a trickle of body, holds its socket only
for the configured timeouts; past ``MLGATE_MAX_CONNECTIONS`` a new connection gets a
503 and is closed at once; and meanwhile an ordinary client still gets its answers.
The timeouts are set small through the environment; each wait carries a generous
guard so a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from tests.conftest import ServiceFactory
from tests.service_process import ServiceProcess

GUARD_S = 15  # far above every timeout configured here; only a regression reaches it
HEALTH = b"GET /health HTTP/1.1\r\nHost: mlgate\r\n\r\n"


@asynccontextmanager
async def raw_connection(service: ServiceProcess) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    async with asyncio.timeout(GUARD_S):
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One response on a kept-alive connection: head, then Content-Length bytes."""
    async with asyncio.timeout(GUARD_S):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await reader.readexactly(length)


async def admitted_connection(service: ServiceProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection the server has taken and answered on, kept open.

    A connection that just closed (the start-up probe's, an earlier one of the test)
    still holds its place under the cap until the server hears of the close, which is
    not observable from here: a refused attempt is retried.
    """
    async with asyncio.timeout(GUARD_S):
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
            writer.write(HEALTH)
            try:
                answer = await read_response(reader)
            except (ConnectionResetError, asyncio.IncompleteReadError):
                answer = b"HTTP/1.1 503"  # refused while our request was on its way
            if answer.startswith(b"HTTP/1.1 200"):
                return reader, writer
            assert answer.startswith(b"HTTP/1.1 503")
            writer.close()
            await asyncio.sleep(0.05)


async def health_status(service: ServiceProcess) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{service.url}/health") as answer:
        return answer.status


async def test_a_half_sent_head_is_closed_after_the_head_timeout(service_process: ServiceFactory) -> None:
    service = service_process(MLGATE_HEAD_TIMEOUT_S="0.5")
    async with raw_connection(service) as (reader, writer):
        writer.write(b"POST /api/v2/predict HTTP/1.1\r\nHost: mlgate\r\nContent-Type: appl")
        await writer.drain()
        assert await health_status(service) == 200  # the stalled head holds no one else up
        assert await read_until_closed(reader) == b""


async def test_an_idle_connection_is_closed_after_the_head_timeout(service_process: ServiceFactory) -> None:
    service = service_process(MLGATE_HEAD_TIMEOUT_S="0.5")
    async with raw_connection(service) as (reader, writer):
        writer.write(HEALTH)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        assert await read_until_closed(reader) == b""


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 100000\r\n\r\n{", b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n"],
    ids=["content-length", "chunked"],
)
async def test_a_stalled_body_is_answered_408_and_closed(service_process: ServiceFactory, framing: bytes) -> None:
    service = service_process(MLGATE_BODY_TIMEOUT_S="0.5", MLGATE_HEAD_TIMEOUT_S="1")
    async with raw_connection(service) as (reader, writer):
        writer.write(b"POST /api/v2/predict HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\n" + framing)
        await writer.drain()
        assert await health_status(service) == 200
        answer = await read_until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"body-timeout" in answer


async def busy_connection(service: ServiceProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection admitted and busy with a request: its head sent, its body not yet."""
    reader, writer = await admitted_connection(service)
    writer.write(b"POST /api/v2/predict HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    return reader, writer


async def test_at_the_cap_a_new_connection_is_refused_at_once_when_all_are_busy(
    service_process: ServiceFactory,
) -> None:
    service = service_process(MLGATE_MAX_CONNECTIONS="3", MLGATE_BODY_TIMEOUT_S="60")
    held = [await busy_connection(service) for _ in range(3)]
    try:
        async with raw_connection(service) as (reader, writer):
            refused = await read_until_closed(reader)
        assert refused.startswith(b"HTTP/1.1 503")
        head, _, body = refused.partition(b"\r\n\r\n")
        assert b"Content-Type: application/problem+json" in head
        problem = json.loads(body)
        assert (problem["status"], problem["type"]) == (503, "/problems/overloaded")
        assert problem["error"] == problem["detail"]  # as OIP clients read it

        for reader, writer in held:  # the open ones still work: their bodies end
            writer.write(b"x" * 99)
            assert (await read_response(reader)).startswith(b"HTTP/1.1 400")

        reader, writer = held[0]  # and the refusal is counted
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: mlgate\r\n\r\n")
        scraped = await read_response(reader)
        refusals = re.search(rb"^mlgate_connections_refused_total (\S+)$", scraped, re.M)
        assert refusals is not None and float(refusals.group(1)) >= 1
        assert b"mlgate_connections_open 3.0" in scraped
    finally:
        for _, writer in held:
            writer.close()


async def test_a_closed_connection_frees_its_place_under_the_cap(service_process: ServiceFactory) -> None:
    service = service_process(MLGATE_MAX_CONNECTIONS="1")
    reader, writer = await admitted_connection(service)
    writer.close()
    reader, writer = await admitted_connection(service)
    writer.close()


async def test_at_the_cap_a_new_connection_takes_the_place_of_the_oldest_silent_one(
    service_process: ServiceFactory,
) -> None:
    """A review: 700 sockets sending nothing, from a client without a key, held a cap of
    500 for the head timeout, and every tenant's requests were 503."""
    service = service_process(MLGATE_MAX_CONNECTIONS="3", MLGATE_HEAD_TIMEOUT_S="60")
    kept_alive = await admitted_connection(service)  # has sent a whole request: kept longer
    silent = [await asyncio.open_connection("127.0.0.1", service.port) for _ in range(2)]
    await asyncio.sleep(0.3)  # the server has taken them
    try:
        async with raw_connection(service) as (reader, writer):
            writer.write(HEALTH)
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        assert await read_until_closed(silent[0][0]) == b""  # the oldest silent one
        reader, writer = kept_alive
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: mlgate\r\n\r\n")
        scraped = await read_response(reader)
        assert scraped.startswith(b"HTTP/1.1 200")
        evicted = re.search(rb"^mlgate_connections_evicted_total (\S+)$", scraped, re.M)
        assert evicted is not None and float(evicted.group(1)) >= 1
    finally:
        for _, writer in [kept_alive, *silent]:
            writer.close()


async def test_at_the_cap_the_connection_idle_the_longest_makes_room_when_none_is_silent(
    service_process: ServiceFactory,
) -> None:
    service = service_process(MLGATE_MAX_CONNECTIONS="2", MLGATE_HEAD_TIMEOUT_S="60")
    first = await admitted_connection(service)
    second = await admitted_connection(service)
    await asyncio.sleep(0.2)
    first[1].write(HEALTH)  # the first opened is the last used
    assert (await read_response(first[0])).startswith(b"HTTP/1.1 200")
    try:
        async with raw_connection(service) as (reader, writer):
            writer.write(HEALTH)
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
        assert await read_until_closed(second[0]) == b""  # the one idle the longest
        first[1].write(HEALTH)
        assert (await read_response(first[0])).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in (first, second):
            writer.close()


async def test_at_the_cap_a_connection_read_on_after_its_answer_makes_room_first(
    service_process: ServiceFactory,
) -> None:
    """A review: keyless requests declaring a megabyte they never sent were answered 401
    and read on for 10 s each (for their client to see the answer): counted busy, they
    held the cap, and every tenant got 503."""
    service = service_process(
        MLGATE_MAX_CONNECTIONS="2", MLGATE_HEAD_TIMEOUT_S="60", MLGATE_AUTH_DISABLED="false"
    )
    declared = [await asyncio.open_connection("127.0.0.1", service.port) for _ in range(2)]
    try:
        for reader, writer in declared:
            writer.write(
                b"POST /api/v2/ingest HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\n\r\n"
            )
            assert (await read_response(reader)).startswith(b"HTTP/1.1 401")
        async with raw_connection(service) as (reader, writer):
            writer.write(HEALTH)
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in declared:
            writer.close()


async def test_a_chunked_body_with_too_many_trailer_fields_is_refused(
    service_process: ServiceFactory,
) -> None:
    """A review: a trailer section, which the head limit does not see, held 1.9 MB a
    connection (128 fields of 8 KB, aiohttp's bounds); fields are now at most 64."""
    service = service_process()
    async with raw_connection(service) as (reader, writer):
        writer.write(
            b"POST /api/v2/predict HTTP/1.1\r\nHost: mlgate\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        )
        for i in range(70):
            writer.write(b"X-T%d: %s\r\n" % (i, b"a" * 100))
        writer.write(b"\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0], answer[:200]


def _gauge(scraped: bytes, name: bytes) -> float:
    found = re.search(rb"^" + name + rb" (\S+)$", scraped, re.M)
    assert found is not None, name
    return float(found.group(1))


async def connections_open_once_settled(service: ServiceProcess, cap: int, ssl: object = None) -> float:
    """``mlgate_connections_open`` once it is at most ``cap`` and the one a scrape's own
    connection may be making room with (its close on its way), or after ``GUARD_S``
    (the last read)."""
    opened = float("inf")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD_S
    while loop.time() < deadline:
        async with aiohttp.ClientSession() as session, session.get(f"{service.url}/metrics", ssl=ssl) as answer:
            if answer.status == 200:
                opened = _gauge(await answer.read(), b"mlgate_connections_open")
                if opened <= cap + 1:
                    return opened
        await asyncio.sleep(0.2)
    return opened


async def connections_open_now(service: ServiceProcess, ssl: object = None) -> float:
    """``mlgate_connections_open`` as one scrape reads it (on a connection of its own,
    which may have displaced one still closing)."""
    async with aiohttp.ClientSession() as session, session.get(f"{service.url}/metrics", ssl=ssl) as answer:
        assert answer.status == 200
        return _gauge(await answer.read(), b"mlgate_connections_open")


async def open_silently(port: int, count: int, ssl: object = None) -> list[asyncio.StreamWriter]:
    """``count`` connections opened at once, each sending nothing (those refused or
    closed at once are left out)."""

    async def one() -> asyncio.StreamWriter | None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)  # type: ignore[arg-type]
        except (ConnectionError, OSError):
            return None
        return writer

    return [writer for writer in await asyncio.gather(*(one() for _ in range(count))) if writer]


async def test_a_burst_of_silent_connections_leaves_no_more_than_the_cap_open(
    service_process: ServiceFactory,
) -> None:
    """A review: 300 connections opened at once against a cap of 20 left 150 open, and
    each burst more (each connection evicted again while its close was on its way
    counted as closing once more), until the open-files limit refused everyone."""
    service = service_process(MLGATE_MAX_CONNECTIONS="20", MLGATE_HEAD_TIMEOUT_S="60")
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):
            writers += await open_silently(service.port, 150)
            # The cap, and the silent one the scrape's own connection displaced.
            assert await connections_open_once_settled(service, 20) <= 21
    finally:
        for writer in writers:
            writer.close()
