"""A lean HTTP/1.1 load generator: keep-alive connections as bare asyncio protocols.

A load generator written with a full HTTP client (aiohttp's costs ~100 µs of CPU a
request) is slower than the servers it measures on a 2-core machine, so it, not the
server, sets the figure. This one sends pre-encoded requests and parses only the
status line and ``Content-Length`` of each answer: about wrk's rate on the HTTP floor,
yet it records every request's latency by status, and it can offer a fixed rate
(open loop), which wrk cannot.

- closed loop: ``connections`` connections, each sending its next request as soon as
  the answer to the previous one arrived;
- open loop: ``rate`` requests a second, each on an idle connection of a pool of
  ``connections``; a request falling due when none is idle is counted as dropped (the
  offered load the client could not deliver) rather than queued, so a slow server
  cannot slow the offered rate down.

``requests`` is a sequence used round-robin or a function of the request number (to
stamp record ids into each); ``on_body`` sees every answer's status and body (window
or not: what was acknowledged); ``stop_when`` ends a closed-loop run early, the
window closing then (a run of so many records rather than so many seconds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

_HEAD_END = b"\r\n\r\n"
_LENGTH = b"\r\ncontent-length:"
SETTLE_S = 1.0


@dataclass
class Tally:
    """What came back inside the measurement window."""

    window: tuple[float, float]
    statuses: dict[str, int] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    sent: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)

    def record(self, status: str, sent_at: float, now: float) -> None:
        if self.window[0] <= now <= self.window[1]:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.latencies_ms.setdefault(status, []).append((now - sent_at) * 1000)

    def error(self, message: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(message)


def encode_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self, on_answer: Callable[[Connection, str, float, bytes], None], tally: Tally) -> None:
        self.on_answer, self.tally = on_answer, tally
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.sent_at = 0.0
        self.busy = False
        self.lost = False  # the server closed it: open loop picks no more from it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.busy, self.sent_at = True, time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(_HEAD_END)) >= 0:
            head = bytes(self.buffer[:end]).lower() + b"\r\n"  # every header line ends so
            at = head.find(_LENGTH)
            length = int(head[at + len(_LENGTH) : head.find(b"\r\n", at + 2)]) if at >= 0 else 0
            total = end + len(_HEAD_END) + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + len(_HEAD_END) : total])
            del self.buffer[:total]
            self.busy = False
            self.on_answer(self, head[9:12].decode(), self.sent_at, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.tally.record("error", self.sent_at, time.perf_counter())
            self.tally.error(f"connection lost: {exc!r}")
        self.busy = True  # never picked again
        self.lost = True


async def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes] | Callable[[int], bytes],
    *,
    connections: int,
    warmup_s: float,
    duration_s: float,
    rate: float = 0.0,
    on_window: Callable[[str], None] | None = None,
    on_body: Callable[[str, bytes, float], None] | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> Tally:
    """Closed loop over ``connections`` (``rate`` 0) or open loop at ``rate`` req/s;
    ``on_window("measuring"|"window_end")`` marks the measurement window."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    tally = Tally((start + warmup_s, start + warmup_s + duration_s))
    turn = 0
    idle: list[Connection] = []
    stopping = False

    def next_request() -> bytes:
        nonlocal turn
        turn += 1
        tally.sent += 1
        return requests(turn) if callable(requests) else requests[turn % len(requests)]

    def on_answer(connection: Connection, status: str, sent_at: float, body: bytes) -> None:
        now = time.perf_counter()
        tally.record(status, sent_at, now)
        if on_body is not None:
            on_body(status, body, now)
        if stopping:
            return
        if rate:
            idle.append(connection)
        else:
            connection.send(next_request())

    pool: list[Connection] = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(
            lambda: Connection(on_answer, tally), host, port
        )
        pool.append(protocol)

    async def announce() -> None:
        await asyncio.sleep(max(0.0, tally.window[0] - time.perf_counter()))
        if on_window is not None:
            on_window("measuring")
        while (now := time.perf_counter()) < tally.window[1]:
            if stop_when is not None and stop_when():
                tally.window = (min(tally.window[0], now), now)
                break
            await asyncio.sleep(min(0.05, tally.window[1] - now))
        if on_window is not None:
            on_window("window_end")

    marks = asyncio.create_task(announce())
    if rate:
        idle.extend(pool)
        while (now := time.perf_counter()) < tally.window[1]:
            target = int((now - start) * rate)
            while tally.sent + tally.dropped < target:
                while idle and idle[-1].lost:
                    idle.pop()
                if idle:
                    idle.pop().send(next_request())
                else:
                    tally.dropped += 1
            await asyncio.sleep(0.0005)
    else:
        for connection in pool:
            connection.send(next_request())
    await marks
    stopping = True
    # Let what is in flight come back before hanging up (those answers are not
    # counted), so the server sees no disconnects mid-request.
    await asyncio.sleep(SETTLE_S)
    for connection in pool:
        if connection.transport is not None:
            connection.transport.close()
    return tally
