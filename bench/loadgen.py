"""The HTTP load generator: ``connections`` keep-alive connections posting msgpack batches.

Runs in its own process (``python -m bench.loadgen OPTIONS_JSON``). Bodies are encoded
once up front and used round-robin, each request's record ids stamped with its number;
each connection sends its next request as soon as the previous answer arrived (closed
loop). Requests that complete inside the
measurement window count for throughput and latency; every 202 counts for the
accepted total the orchestrator compares with what landed in Kafka.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import aiohttp
import msgspec

from bench.child import MEASURING, WINDOW_END, emit, run_child
from bench.payload import RequestBodies

HEADERS = {"Content-Type": "application/msgpack", "Accept": "application/json"}
MAX_ERRORS_KEPT = 5


class LoadOptions(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    connections: int
    warmup_s: float
    duration_s: float
    batches: int
    records: int
    dims: int
    api_key: str = ""
    # A fresh Idempotency-Key on every request, as a careful producer sends.
    idempotency_keys: bool = False
    seed: int = 0
    request_timeout_s: float = 30.0


class LoadResult(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    accepted_total: int
    duplicate_total: int
    requests_in_window: int
    accepted_in_window: int
    window_s: float
    body_bytes: int
    statuses: dict[str, int]
    latencies_ms: list[float]  # of the 202s completed in the window, sorted
    errors: list[str]


class _Accepted(msgspec.Struct):
    records_accepted: int
    records_duplicate: int = 0


_accepted = msgspec.json.Decoder(_Accepted)


async def generate_load(options: LoadOptions) -> LoadResult:
    bodies = RequestBodies(options.batches, options.records, options.dims, options.seed)
    headers = dict(HEADERS)
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    turn = itertools.count()
    statuses: dict[str, int] = {}
    errors: list[str] = []
    latencies: list[float] = []
    totals = dict.fromkeys(("requests", "accepted", "duplicate", "window_requests", "window_accepted"), 0)

    connector = aiohttp.TCPConnector(limit=options.connections)
    timeout = aiohttp.ClientTimeout(total=options.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        window_start = started + options.warmup_s
        window_end = window_start + options.duration_s

        async def connection() -> None:
            while time.perf_counter() < window_end:
                body = bodies.body(next(turn))
                sent_headers = (
                    {**headers, "Idempotency-Key": uuid.uuid4().hex}
                    if options.idempotency_keys
                    else headers
                )
                sent = time.perf_counter()
                status, accepted, duplicate = await _post(session, options.url, body, sent_headers, errors)
                done = time.perf_counter()
                statuses[status] = statuses.get(status, 0) + 1
                totals["requests"] += 1
                totals["accepted"] += accepted
                totals["duplicate"] += duplicate
                if window_start <= done <= window_end:
                    totals["window_requests"] += 1
                    totals["window_accepted"] += accepted
                    if status == "202":
                        latencies.append((done - sent) * 1000)
                if status != "202":
                    await asyncio.sleep(0.05)  # shed or failed: back off a little

        async def announce() -> None:
            await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
            emit(MEASURING)
            await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
            emit(WINDOW_END)

        await asyncio.gather(announce(), *(connection() for _ in range(options.connections)))

    return LoadResult(
        requests=totals["requests"],
        accepted_total=totals["accepted"],
        duplicate_total=totals["duplicate"],
        requests_in_window=totals["window_requests"],
        accepted_in_window=totals["window_accepted"],
        window_s=options.duration_s,
        body_bytes=bodies.body_bytes,
        statuses=statuses,
        latencies_ms=sorted(latencies),
        errors=errors,
    )


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytearray,
    headers: dict[str, str],
    errors: list[str],
) -> tuple[str, int, int]:
    """(status, records accepted, duplicates) of one request; status "error" when no
    answer came back."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status == 202:
                answer = _accepted.decode(payload)
                return "202", answer.records_accepted, answer.records_duplicate
            if len(errors) < MAX_ERRORS_KEPT:
                errors.append(f"{response.status}: {payload[:300]!r}")
            return str(response.status), 0, 0
    except (aiohttp.ClientError, TimeoutError) as exc:
        if len(errors) < MAX_ERRORS_KEPT:
            errors.append(repr(exc))
        return "error", 0, 0


if __name__ == "__main__":
    run_child(LoadOptions, generate_load)
