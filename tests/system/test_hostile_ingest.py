"""A JSON ingest batch built to be expensive costs the server bounded memory, leaves
little of it behind and does not stop other clients: a real ``mlgate serve``.

15 MB of features written as ``0,`` are 7.6M numbers: parsed at once (simdjson) into
one matrix, or record by record into Python floats. The server's peak RSS
(``VmHWM``) and its RSS after (``VmRSS``) are read from /proc.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
import msgspec

from tests.conftest import ServiceFactory
from tests.service_process import ServiceProcess

RECORDS, VALUES_PER_RECORD = 3_700, 2_048  # 7.6M zeros: just under the 16 MB body limit
PEAK_GROWTH_BOUND_KB = 450 * 1024  # measured in process: ~275 MB (msgspec's path: ~305)
LEFT_BEHIND_BOUND_KB = 120 * 1024  # measured: ~30 MB (a parser keeping its buffers: ~210)
GOOD_ROW = [0.25] * 128


def status_kb(service: ServiceProcess, field: str) -> int:
    for line in Path(f"/proc/{service.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc status")


def hostile_batch() -> bytes:
    features = "[" + ",".join(["0"] * VALUES_PER_RECORD) + "]"
    record = '{"features":' + features + "}"
    return ('{"source":"flood","records":[' + ",".join([record] * RECORDS) + "]}").encode()


async def test_a_huge_json_batch_of_short_numbers_costs_bounded_memory_and_leaves_little(
    service_process: ServiceFactory,
) -> None:
    service = service_process(MLGATE_FEATURE_DIMS="2048")
    normal = msgspec.json.encode({"instances": [GOOD_ROW] * 8})
    body = hostile_batch()
    async with aiohttp.ClientSession() as session:

        async def post(path: str, data: bytes) -> int:
            async with session.post(
                f"{service.url}{path}",
                data=io.BytesIO(data),
                headers={"Content-Type": "application/json"},
            ) as answer:
                await answer.read()
                return answer.status

        assert await post("/api/v2/predict", normal) == 200  # warm: model, codecs
        peak_before, before = status_kb(service, "VmHWM"), status_kb(service, "VmRSS")

        hostile, answered = await asyncio.gather(
            post("/api/v2/ingest", body), post("/api/v2/predict", normal)
        )

        assert hostile == 202  # every record written
        assert answered == 200
        left_behind = status_kb(service, "VmRSS") - before
    grown = status_kb(service, "VmHWM") - peak_before
    print(
        f"\n| huge JSON ingest batch (15 MB, 7.6M numbers) | {hostile} | peak RSS +{grown / 1024:.0f} MB"
        f" | left behind +{left_behind / 1024:.0f} MB |"
    )
    assert grown < PEAK_GROWTH_BOUND_KB
    assert left_behind < LEFT_BEHIND_BOUND_KB


EMPTY_RECORDS = 5_000_000  # "{}," each: 15 MB, and a Python object each once decoded
COUNTED_GROWTH_BOUND_KB = 220 * 1024  # measured: ~160 MB (simdjson's tape); before the count ~280 MB and ~1 s


async def test_a_json_batch_of_millions_of_empty_records_is_refused_before_they_are_built(
    service_process: ServiceFactory,
) -> None:
    """A review: 5M ``{}`` records in 15 MB held the loop a second and took 250 MB
    before their 422 (msgspec builds a JSON array whole before checking its length)."""
    service = service_process()
    normal = msgspec.json.encode({"instances": [GOOD_ROW] * 8})
    body = b'{"source":"flood","records":[' + b",".join([b"{}"] * EMPTY_RECORDS) + b"]}"
    async with aiohttp.ClientSession() as session:

        async def post(path: str, data: bytes) -> tuple[int, bytes]:
            async with session.post(
                f"{service.url}{path}", data=io.BytesIO(data), headers={"Content-Type": "application/json"}
            ) as answer:
                return answer.status, await answer.read()

        assert (await post("/api/v2/predict", normal))[0] == 200  # warm: model, codecs
        peak_before = status_kb(service, "VmHWM")
        (status, answer), (answered, _) = await asyncio.gather(
            post("/api/v2/ingest", body), post("/api/v2/predict", normal)
        )
    grown = status_kb(service, "VmHWM") - peak_before
    print(f"\n| JSON batch of 5M empty records (15 MB) | {status} | peak RSS +{grown / 1024:.0f} MB |")
    assert status == 422
    assert f"at most 10000 records, got {EMPTY_RECORDS}".encode() in answer
    assert answered == 200
    assert grown < COUNTED_GROWTH_BOUND_KB
