"""A predict body built to be expensive costs the server little: a real ``mlgate serve``.

The schema allows 4096 instances of 65536 features, far more than a 16 MB body can
hold but far more than any model takes; the rows are counted against the model's
input width before they become Python objects. The server's peak RSS (``VmHWM``) is
read from /proc before and after.
"""

from __future__ import annotations

import asyncio
import io
import struct
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


def empty_arrays(count: int) -> bytes:
    """A msgpack array of ``count`` empty arrays: one byte each, a Python list each
    once decoded (~64 bytes)."""
    return b"\xdd" + struct.pack(">I", count) + b"\x90" * count


EMPTY_ARRAYS = 14_000_000  # 14 MB; decoded: ~900 MB


async def post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    async with session.post(url, data=io.BytesIO(body), headers=headers) as answer:
        return answer.status, await answer.read()


async def refused_beside_a_normal_predict(
    service: ServiceProcess, label: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes, int]:
    """(status, body) of the hostile request, and the peak RSS growth (KB) it caused,
    while a normal predict is answered beside it; printed as a row under ``label``."""
    normal = msgspec.json.encode({"instances": [GOOD_ROW] * 8})
    async with aiohttp.ClientSession() as session:
        assert await predict(session, service, normal, "json") == 200
        before = peak_rss_kb(service)
        (status, answer), answered = await asyncio.gather(
            post(session, f"{service.url}{path}", body, headers),
            predict(session, service, normal, "json"),
        )
        assert answered == 200
    grown = peak_rss_kb(service) - before
    print(f"\n| {label} | {status} | peak RSS +{grown / 1024:.0f} MB |")
    return status, answer, grown


def msgpack_infer_head(data: bytes) -> bytes:
    """An OIP request in msgpack whose one input's ``data`` is the msgpack ``data``."""
    head = msgspec.msgpack.encode({"name": "input", "shape": [1, 128], "datatype": "FP32"})
    tensor = bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("data") + data
    return b"\x81" + msgspec.msgpack.encode("inputs") + b"\x91" + tensor


async def test_a_msgpack_oip_body_of_empty_arrays_is_refused_before_it_is_decoded(
    service_process: ServiceFactory,
) -> None:
    service = service_process()
    body = msgpack_infer_head(empty_arrays(EMPTY_ARRAYS))
    status, answer, grown = await refused_beside_a_normal_predict(
        service, "msgpack OIP body of 14M empty arrays", "/v2/models/demo/infer", body,
        {"Content-Type": "application/msgpack"},
    )
    assert status == 422
    assert b"takes at most" in answer
    assert grown < OIP_RSS_GROWTH_BOUND_KB


async def test_a_binary_infer_header_of_millions_of_values_is_refused_before_it_is_decoded(
    service_process: ServiceFactory,
) -> None:
    service = service_process()
    values = 3_500_000
    header = msgspec.json.encode(
        {"inputs": [{"name": "input", "shape": [values // 128, 128], "datatype": "FP32", "data": [0.5] * values}]}
    )
    status, answer, grown = await refused_beside_a_normal_predict(
        service,
        "binary infer header of 3.5M values",
        "/v2/models/demo/infer",
        header,
        {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 422
    assert b"takes at most" in answer
    assert grown < OIP_RSS_GROWTH_BOUND_KB


async def test_a_msgpack_predict_naming_its_model_with_a_huge_array_is_refused_without_decoding_it(
    service_process: ServiceFactory,
) -> None:
    service = service_process()
    body = (
        b"\x82" + msgspec.msgpack.encode("features") + msgspec.msgpack.encode(GOOD_ROW)
        + msgspec.msgpack.encode("model") + empty_arrays(EMPTY_ARRAYS)
    )  # fmt: skip
    status, answer, grown = await refused_beside_a_normal_predict(
        service, "msgpack predict naming a model of 14M empty arrays", "/api/v2/predict", body,
        {"Content-Type": "application/msgpack"},
    )
    assert status == 422
    assert msgspec.json.decode(answer)["errors"][0]["loc"] == "model"
    assert grown < OIP_RSS_GROWTH_BOUND_KB


@pytest.mark.parametrize("nested", [True, False])
async def test_a_msgpack_oip_request_the_model_can_take_is_answered(
    service_process: ServiceFactory, nested: bool
) -> None:
    service = service_process()
    rows = [[0.25] * 128] * 200  # 200 KB of float64s: past the budget's threshold
    data = rows if nested else [value for row in rows for value in row]
    body = msgspec.msgpack.encode(
        {"inputs": [{"name": "input", "shape": [200, 128], "datatype": "FP32", "data": data}]}
    )
    async with aiohttp.ClientSession() as session:
        status, answer = await post(
            session, f"{service.url}/v2/models/demo/infer", body, {"Content-Type": "application/msgpack"}
        )
    assert status == 200, answer
    assert msgspec.json.decode(answer)["outputs"][0]["shape"][0] == 200
