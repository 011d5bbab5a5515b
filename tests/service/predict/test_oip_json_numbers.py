"""Numbers of OIP JSON tensors. In: those numpy cannot read in one dtype (integers of
2^63 and up beside smaller ones, integer literals of 2^64 and up) are served exactly
when they fit the datatype, else the request's 422. Out: NaN and infinities are
written as Triton writes them (``NaN``, ``Infinity``, ``-Infinity``), never ``null``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from onnx import TensorProto, helper

from mlgate.config import Settings
from tests.conftest import AppClientFactory
from tests.onnx_models import model_of, write_version

Client = TestClient[web.Request, web.Application]
TYPES = {
    "UINT64": TensorProto.UINT64,
    "INT64": TensorProto.INT64,
    "FP64": TensorProto.DOUBLE,
    "BOOL": TensorProto.BOOL,
}


def write_identity(root: Path, datatype: str) -> None:
    name = datatype.lower()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TYPES[datatype], ["batch", 3])],
        [helper.make_tensor_value_info("y", TYPES[datatype], ["batch", 3])],
    )
    write_version(root, name, model_of(graph))


@pytest.fixture
async def client(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    for datatype in TYPES:
        write_identity(root, datatype)
    settings = make_settings(model_repository=str(root), default_model="fp64")
    result: Client = await app_client(settings)
    return result


async def infer(client: Client, datatype: str, data: list[Any]) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": datatype, "data": data}]}
    answer = await client.post(f"/v2/models/{datatype.lower()}/infer", json=body)
    return answer.status, await answer.json()


async def test_uint64_values_beside_its_maximum_are_served_exactly(client: Client) -> None:
    data = [0, 2**64 - 1, 1]
    status, answer = await infer(client, "UINT64", data)
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == data


async def test_uint64_beyond_its_maximum_is_422(client: Client) -> None:
    status, answer = await infer(client, "UINT64", [0, 2**64, 1])
    assert status == 422
    assert "out of range for UINT64" in answer["error"]


async def test_int64_beside_a_value_past_its_maximum_is_422(client: Client) -> None:
    status, answer = await infer(client, "INT64", [-1, 2**63, 1])
    assert status == 422
    assert "out of range for INT64" in answer["error"]


async def test_a_decimal_beside_a_large_integer_is_422_for_an_integer_datatype(
    client: Client,
) -> None:
    status, answer = await infer(client, "UINT64", [0.5, 2**64 - 1, 1])
    assert status == 422
    assert "do not fit datatype UINT64" in answer["error"]


async def test_an_fp64_integer_literal_of_2_to_the_64_is_read_as_that_float(
    client: Client,
) -> None:
    status, answer = await infer(client, "FP64", [2**64, 1, -(2**70)])
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == [float(2**64), 1.0, float(-(2**70))]


async def test_a_bool_tensor_holding_an_integer_past_64_bits_is_422(client: Client) -> None:
    """It reached the integer datatypes' reading and failed there: a 500 (a review)."""
    status, answer = await infer(client, "BOOL", [0, 2**64, 1])
    assert status == 422
    assert "do not fit datatype BOOL" in answer["error"]


async def test_an_integer_literal_beyond_every_float_is_422(client: Client) -> None:
    status, answer = await infer(client, "FP64", [10**400, 1, 2])
    assert status == 422
    assert "out of range for FP64" in answer["error"]


def binary_fp64_request(values: list[float]) -> tuple[bytes, dict[str, str]]:
    """A binary FP64 input (JSON cannot carry non-finite numbers in), answered in JSON."""
    blob = np.array(values, np.float64).tobytes()
    tensor = {"name": "x", "shape": [1, 3], "datatype": "FP64"}
    header = msgspec.json.encode(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}
    )
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


async def test_non_finite_outputs_are_written_as_triton_writes_them(client: Client) -> None:
    body, headers = binary_fp64_request([float("inf"), float("-inf"), float("nan")])
    answer = await client.post("/v2/models/fp64/infer", data=body, headers=headers)
    assert answer.status == 200
    text = await answer.text()
    assert '"data":[Infinity,-Infinity,NaN]' in text
    data = json.loads(text)["outputs"][0]["data"]  # as tritonclient reads it
    assert data[:2] == [float("inf"), float("-inf")] and np.isnan(data[2])


async def test_non_finite_outputs_are_floats_in_a_msgpack_answer(client: Client) -> None:
    body, headers = binary_fp64_request([float("inf"), 1.5, float("nan")])
    headers["Accept"] = "application/msgpack"
    answer = await client.post("/v2/models/fp64/infer", data=body, headers=headers)
    assert answer.status == 200
    data = msgspec.msgpack.decode(await answer.read())["outputs"][0]["data"]
    assert data[:2] == [float("inf"), 1.5]
    assert np.isnan(data[2])


async def test_a_replay_keeps_non_finite_outputs_in_the_format_the_repeat_accepts(
    client: Client,
) -> None:
    """Replays are written again in the repeat's format: the NaN of a msgpack answer
    became null in JSON, and a JSON answer with NaN could not be read for msgpack."""
    body, headers = binary_fp64_request([float("inf"), 1.5, float("-inf")])
    as_msgpack = {**headers, "Idempotency-Key": "k1", "Accept": "application/msgpack"}
    first = await client.post("/v2/models/fp64/infer", data=body, headers=as_msgpack)
    again = await client.post(
        "/v2/models/fp64/infer", data=body, headers={**headers, "Idempotency-Key": "k1"}
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content_type == "application/json"
    assert '"data":[Infinity,1.5,-Infinity]' in await again.text()
    as_json = {**headers, "Idempotency-Key": "k2"}
    await client.post("/v2/models/fp64/infer", data=body, headers=as_json)
    back = await client.post(
        "/v2/models/fp64/infer", data=body, headers={**as_json, "Accept": "application/msgpack"}
    )
    assert back.content_type == "application/msgpack"
    data = msgspec.msgpack.decode(await back.read())["outputs"][0]["data"]
    assert data == msgspec.msgpack.decode(await first.read())["outputs"][0]["data"]


async def test_an_oip_error_replayed_as_json_is_sent_as_the_protocol_sends_errors(
    client: Client,
) -> None:
    bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "UINT64", "data": [0, 2**64, 1]}]}
    keyed = {"Idempotency-Key": "k3"}
    first = await client.post(
        "/v2/models/uint64/infer", json=bad, headers={**keyed, "Accept": "application/msgpack"}
    )
    assert first.status == 422
    again = await client.post("/v2/models/uint64/infer", json=bad, headers=keyed)
    assert (again.status, again.content_type) == (422, "application/json")
    assert "out of range for UINT64" in (await again.json())["error"]


async def test_non_finite_literals_in_json_inputs_are_read_as_triton_reads_them(client: Client) -> None:
    """tritonclient writes a NaN of a JSON tensor as ``NaN`` (rapidjson), and Triton
    reads it: a review saw it refused 400 "not valid json"."""
    body = b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [NaN, Infinity, -Infinity]}]}'
    response = await client.post(
        "/v2/models/fp64/infer", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 200, await response.text()
    data = json.loads(await response.read())["outputs"][0]["data"]
    assert np.isnan(data[0]) and data[1:] == [math.inf, -math.inf]


async def test_a_non_finite_literal_in_an_integer_tensor_is_422(client: Client) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "INT64", "data": [1, NaN, 3]}]}'
    response = await client.post("/v2/models/int64/infer", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 422, await response.text()
    assert "error" in await response.json()


async def test_a_malformed_body_holding_a_nan_literal_is_still_400(client: Client) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [NaN, 1, 2]'
    response = await client.post("/v2/models/fp64/infer", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert "error" in await response.json()


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"[NaN, 1e400, 2]", 422), (b'[NaN, 1, 2], "parameters": {"s": "a\\ud800b"}', 400)],
    ids=["number-out-of-range", "lone-surrogate"],
)
async def test_a_nan_literal_does_not_let_through_what_any_body_is_refused_for(
    client: Client, data: bytes, status: int
) -> None:
    """A review: beside a NaN, 1e400 was read as infinity, and a lone surrogate reached
    the model."""
    body = b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": ' + data + b"}]}"
    response = await client.post("/v2/models/fp64/infer", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status, await response.text()
