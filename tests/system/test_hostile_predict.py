"""A predict body built to be expensive costs the server little: a real ``mlgate serve``.

The schema allows 4096 instances of 65536 features, far more than a 16 MB body can
hold but far more than any model takes; the rows are counted against the model's
input width before they become Python objects. The server's peak RSS (``VmHWM``) is
read from /proc before and after.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import aiohttp
import msgspec
import pytest

from tests.conftest import ServiceFactory
from tests.service_process import ServiceProcess

ROWS, VALUES_PER_ROW = 4096, 2000  # 8.2M zeros: just under the 16 MB body limit
RSS_GROWTH_BOUND_KB = 150 * 1024  # before the bound: ~600 MB
GOOD_ROW = [0.25] * 128
OIP_RSS_GROWTH_BOUND_KB = 60 * 1024  # the body and one copy of it; decoded: ~110 MB more  # the demo model takes 128 features


def hostile_body(fmt: str) -> bytes:
    row = [0] * VALUES_PER_ROW
    body = {"instances": [row] * ROWS}
    if fmt == "json":
        return msgspec.json.encode(body)
    return msgspec.msgpack.encode(body)


def peak_rss_kb(service: ServiceProcess) -> int:
    for line in Path(f"/proc/{service.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


async def predict(session: aiohttp.ClientSession, service: ServiceProcess, body: bytes, fmt: str) -> int:
    content_type = "application/json" if fmt == "json" else "application/msgpack"
    async with session.post(
        f"{service.url}/api/v2/predict", data=io.BytesIO(body), headers={"Content-Type": content_type}
    ) as answer:
        await answer.read()
        return answer.status


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_a_huge_predict_body_is_refused_before_its_rows_are_built(
    service_process: ServiceFactory, fmt: str
) -> None:
    service = service_process()
    normal = msgspec.json.encode({"instances": [GOOD_ROW] * 8})
    async with aiohttp.ClientSession() as session:
        assert await predict(session, service, normal, "json") == 200  # warm: model, codecs
        before = peak_rss_kb(service)

        hostile, answered = await asyncio.gather(
            predict(session, service, hostile_body(fmt), fmt),
            predict(session, service, normal, "json"),
        )

        assert 400 <= hostile < 500
        assert answered == 200
    grown = peak_rss_kb(service) - before
    print(f"\n| huge predict body ({fmt}) | {hostile} | peak RSS +{grown / 1024:.0f} MB |")
    assert grown < RSS_GROWTH_BOUND_KB


async def test_a_predict_body_with_too_many_features_names_the_expected_count(
    service_process: ServiceFactory,
) -> None:
    service = service_process()
    body = msgspec.json.encode({"features": [0.5] * 60_000})
    async with aiohttp.ClientSession() as session, session.post(
        f"{service.url}/api/v2/predict", data=body, headers={"Content-Type": "application/json"}
    ) as answer:
        problem = await answer.json(content_type=None)
    assert answer.status == 422
    assert "128 features" in problem["detail"]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_a_batch_the_model_can_take_passes_the_row_count(service_process: ServiceFactory, fmt: str) -> None:
    service = service_process()
    rows = [[0.25] * 128] * 40  # msgpack: array16 headers for the batch and each row
    body = msgspec.json.encode({"instances": rows}) if fmt == "json" else msgspec.msgpack.encode({"instances": rows})
    async with aiohttp.ClientSession() as session:
        assert await predict(session, service, body, fmt) == 200


async def test_a_huge_oip_infer_body_is_refused_before_its_tensor_is_built(
    service_process: ServiceFactory,
) -> None:
    service = service_process()
    values = 3_500_000  # "0.5," each: 14 MB, and a float object each once decoded (~110 MB)
    hostile = msgspec.json.encode(
        {"inputs": [{"name": "input", "shape": [values // 128, 128], "datatype": "FP32", "data": [0.5] * values}]}
    )
    normal = msgspec.json.encode({"instances": [GOOD_ROW] * 8})
    async with aiohttp.ClientSession() as session:
        assert await predict(session, service, normal, "json") == 200
        before = peak_rss_kb(service)

        async def infer() -> tuple[int, bytes]:
            async with session.post(
                f"{service.url}/v2/models/demo/infer",
                data=io.BytesIO(hostile),
                headers={"Content-Type": "application/json"},
            ) as answer:
                return answer.status, await answer.read()

        (status, body), answered = await asyncio.gather(
            infer(), predict(session, service, normal, "json")
        )

        assert status == 422 and b"error" in body
        assert answered == 200
    grown = peak_rss_kb(service) - before
    print(f"\n| huge OIP infer body (14 MB) | {status} | peak RSS +{grown / 1024:.0f} MB |")
    assert grown < OIP_RSS_GROWTH_BOUND_KB
