"""A scripted stand-in for mlgate's HTTP answers: what the client does with each answer,
without a server that must be coaxed into giving it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgpack
from aiohttp import web

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Scripted:
    """Answers requests from ``script`` in turn (the last one repeats) and keeps them."""

    url: str = ""
    script: list[Answer] = field(default_factory=list)
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((dict(request.headers), await request.read()))
        answer = self.script[min(len(self.seen), len(self.script)) - 1]
        return await answer(request)


def problem(status: int, retry_after: str | None = None) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {"Retry-After": retry_after} if retry_after else {}
        return web.json_response(
            {"type": "about:blank", "title": "scripted", "status": status, "detail": "scripted"},
            status=status, headers=headers, content_type="application/problem+json",
        )

    return answer


async def accepted(request: web.Request) -> web.StreamResponse:
    records = msgpack.unpackb(await request.read())["records"]
    return web.json_response(
        {"tracking_id": "t", "records_accepted": len(records), "records_rejected": 0,
         "records_duplicate": 0, "errors": []},
        status=202,
    )


async def hang_up(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    return web.Response()
