"""The OIP routes in process: tensor parsing (bad headers and values are 4xx, never 500),
body formats and readiness."""

from __future__ import annotations

import io
import json
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
from mlgate.service.predict import flow, tensors
from mlgate.service.state import DRAINING
from tests.onnx_models import model_of, write_version
from tests.service_process import REPO

Client = TestClient[web.Request, web.Application]
DEMO_REPO = REPO / "models"
WIDTH = 128


@pytest.fixture
async def demo_client(app_client: Any, make_settings: Callable[..., Settings]) -> Client:
    client: Client = await app_client(make_settings(model_repository=str(DEMO_REPO)))
    return client


def binary_request() -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, WIDTH],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": WIDTH * 4},
                }
            ]
        }
    ).encode()
    return header + b"\x00" * (WIDTH * 4), len(header)


async def test_binary_request_with_a_valid_header_length_is_answered(demo_client: Client) -> None:
    body, header_length = binary_request()
    response = await demo_client.post(
        "/v2/models/demo/infer", data=body, headers={"Inference-Header-Content-Length": str(header_length)}
    )
    assert response.status == 200


async def test_non_ascii_digit_header_length_is_400(demo_client: Client) -> None:
    body, _ = binary_request()
    response = await demo_client.post(
        "/v2/models/demo/infer", data=body, headers={"Inference-Header-Content-Length": "\xb2"}
    )
    assert response.status == 400
    assert "error" in await response.json()


async def test_header_length_of_thousands_of_digits_is_400(demo_client: Client) -> None:
    body, _ = binary_request()
    response = await demo_client.post(
        "/v2/models/demo/infer", data=body, headers={"Inference-Header-Content-Length": "9" * 5000}
    )
    assert response.status == 400


async def test_json_value_beyond_the_fp32_range_is_422(demo_client: Client) -> None:
    tensor = {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [1e300] + [0.0] * (WIDTH - 1)}
    response = await demo_client.post("/v2/models/demo/infer", json={"inputs": [tensor]})
    assert response.status == 422
    assert "out of range" in (await response.json())["error"]


@pytest.mark.parametrize(
    "content_type",
    ["application/octet-stream", "application/x-www-form-urlencoded", None],
    ids=["triton-aio-client", "curl-default", "none"],
)
async def test_json_infer_body_is_read_whatever_its_content_type(
    demo_client: Client, content_type: str | None
) -> None:
    # Triton reads these bodies as JSON; its aio client and curl -d send them like this.
    tensor = {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}
    headers = {"Content-Type": content_type} if content_type else {}
    response = await demo_client.post(
        "/v2/models/demo/infer",
        data=json.dumps({"inputs": [tensor]}).encode(),
        headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    assert response.status == 200
    assert (await response.json())["outputs"][0]["shape"] == [1, 2]


async def test_msgpack_infer_body_is_read_when_declared(demo_client: Client) -> None:
    tensor = {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}
    response = await demo_client.post(
        "/v2/models/demo/infer",
        data=msgspec.msgpack.encode({"inputs": [tensor]}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert response.status == 200


async def test_server_ready_is_4xx_while_not_ready(demo_client: Client) -> None:
    assert (await demo_client.get("/v2/health/ready")).status == 200
    demo_client.app[DRAINING].set()
    response = await demo_client.get("/v2/health/ready")
    assert response.status == 400  # the protocol: 4xx means not ready; Triton answers 400
    assert await response.json() == {"ready": False}


async def warm(client: Client) -> None:
    """A few answered rows: the worker then knows how long a batch takes."""
    for _ in range(3):
        body = {"inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}]}
        assert (await client.post("/v2/models/demo/infer", json=body)).status == 200


@pytest.mark.parametrize("rows", [100_000, 10**12])
async def test_a_shape_the_data_does_not_fill_is_422_however_many_rows_it_claims(
    demo_client: Client, rows: int
) -> None:
    """Not a 503 "cannot answer before the deadline": the request can never succeed."""
    await warm(demo_client)
    body = {"inputs": [{"name": "input", "shape": [rows, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}]}
    response = await demo_client.post("/v2/models/demo/infer", json=body)
    assert response.status == 422
    assert "needs" in (await response.json())["error"]


async def test_a_binary_tensor_smaller_than_its_shape_is_422_however_many_rows_it_claims(
    demo_client: Client,
) -> None:
    await warm(demo_client)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [10**8, WIDTH],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": WIDTH * 4},
                }
            ]
        }
    ).encode()
    response = await demo_client.post(
        "/v2/models/demo/infer",
        data=header + b"\x00" * (WIDTH * 4),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status == 422


@pytest.fixture
async def not_client(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> Client:
    """A BOOL model: ``Not`` of [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Not", ["x"], ["y"])],
        "not",
        [helper.make_tensor_value_info("x", TensorProto.BOOL, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.BOOL, ["N", 3])],
    )
    write_version(tmp_path / "models", "not", model_of(graph))
    settings = make_settings(model_repository=str(tmp_path / "models"), default_model="not")
    client: Client = await app_client(settings)
    return client


async def test_a_binary_bool_tensor_reads_any_non_zero_byte_as_true(not_client: Client) -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}
            ]
        }
    ).encode()
    response = await not_client.post(
        "/v2/models/not/infer",
        data=header + b"\x02\x00\x01",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status == 200
    assert (await response.json())["outputs"][0]["data"] == [False, True, False]


@pytest.fixture
async def strings_client(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> Client:
    """A BYTES model: ``Identity`` of [N, 1] strings."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["o"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 1])],
        [helper.make_tensor_value_info("o", TensorProto.STRING, ["N", 1])],
    )
    write_version(tmp_path / "models", "strings", model_of(graph))
    settings = make_settings(model_repository=str(tmp_path / "models"), default_model="strings")
    client: Client = await app_client(settings)
    return client


async def post_binary_strings(client: Client, shape: list[int], blob: bytes) -> tuple[int, Any]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": shape,
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    response = await client.post(
        "/v2/models/strings/infer",
        data=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    return response.status, await response.json()


async def test_a_binary_bytes_tensor_past_the_models_value_budget_is_422_before_decoding(
    strings_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4096 rows of one string at most: more are refused by their declared shape before
    any is made a Python string (16 MB of empty strings were 4M of them, decoded on
    the event loop)."""
    decoded: list[int] = []
    monkeypatch.setattr(tensors, "_from_binary", lambda *args: decoded.append(1))
    count = 5000
    status, answer = await post_binary_strings(strings_client, [count, 1], b"\x00\x00\x00\x00" * count)
    assert status == 422, answer
    assert "takes at most 4096 values in input 's'" in answer["error"]
    assert decoded == []


async def test_a_binary_bytes_tensor_with_more_elements_than_its_shape_is_422(
    strings_client: Client,
) -> None:
    status, answer = await post_binary_strings(strings_client, [2, 1], b"\x00\x00\x00\x00" * 3000)
    assert status == 422, answer
    assert "needs 2 BYTES elements, the binary data holds more" in answer["error"]


async def test_a_binary_bytes_tensor_within_its_shape_is_answered(strings_client: Client) -> None:
    blob = b"".join(len(word).to_bytes(4, "little") + word for word in (b"ab", b"c"))
    status, answer = await post_binary_strings(strings_client, [2, 1], blob)
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == ["ab", "c"]


async def post_json(client: Client, path: str, body: Any) -> Any:
    """A large JSON body, as aiohttp's client wants it sent (not raw bytes)."""
    data = io.BytesIO(json.dumps(body).encode())
    return await client.post(path, data=data, headers={"Content-Type": "application/json"})


async def test_json_strings_holding_commas_do_not_count_as_values_against_the_budget(
    strings_client: Client,
) -> None:
    """A review: 4,000 sentences of 54 commas each (a 1.2 MB body) were 422 "the body
    holds about 216,000 values" against the model's 4,096 strings."""
    sentences = [["word, " * 54] for _ in range(4000)]
    body = {"inputs": [{"name": "s", "shape": [4000, 1], "datatype": "BYTES", "data": sentences}]}
    response = await post_json(strings_client, "/v2/models/strings/infer", body)
    assert response.status == 200, await response.text()
    assert (await response.json())["outputs"][0]["data"][:2] == ["word, " * 54] * 2


async def test_json_strings_past_the_budget_are_still_422_before_decoding(
    strings_client: Client,
) -> None:
    body = {"inputs": [{"name": "s", "shape": [9000, 1], "datatype": "BYTES", "data": [["a,b"]] * 9000}]}
    response = await post_json(strings_client, "/v2/models/strings/infer", body)
    assert response.status == 422
    assert "takes at most 5120 values, the body holds about 9" in (await response.json())["error"]


TENSOR = {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}


@pytest.mark.parametrize(
    ("body", "loc", "detail"),
    [
        ({"inputs": [{**TENSOR, "shape": [1, 1], "data": [0.5]}] * 20_000}, "inputs", "has 1 inputs, the request names 20000"),
        (
            {"inputs": [TENSOR], "outputs": [{"name": "probabilities"}] * 30_000},
            "outputs",
            "has 1 outputs, the request names 30000",
        ),
        (
            {"inputs": [{**TENSOR, "parameters": {f"p{i}": i for i in range(40_000)}}]},
            "inputs[0].parameters",
            "takes at most 256 parameters a map, got 40000",
        ),
        (
            {"inputs": [TENSOR], "parameters": {f"p{i}": "x" for i in range(40_000)}},
            "parameters",
            "takes at most 256 parameters a map, got 40000",
        ),
    ],
    ids=["inputs", "outputs", "input-parameters", "request-parameters"],
)
async def test_a_json_infer_body_of_more_tensors_or_parameters_than_allowed_is_422_before_decoding(
    demo_client: Client, body: dict[str, Any], loc: str, detail: str
) -> None:
    """A review: msgspec builds a list or map whole before checking its length; 250k
    inputs held the loop 0.4 s and took 250 MB before their 422."""
    response = await post_json(demo_client, "/v2/models/demo/infer", body)
    assert response.status == 422
    answer = await response.json()
    assert answer["error"] == f"model demo version 1 {detail}"
    assert answer["errors"] == [{"loc": loc, "msg": detail}]


async def test_a_large_json_infer_body_holding_nan_is_answered_as_a_small_one_is(demo_client: Client) -> None:
    """A review: over 64 KB, the outline refused NaN (which tritonclient writes and
    Triton reads) as no JSON at all: 400 where a small body was answered."""
    data = [0.123456789] * (WIDTH * 64)
    data[5] = float("nan")
    body = {"inputs": [{**TENSOR, "shape": [64, WIDTH], "data": data}]}
    response = await post_json(demo_client, "/v2/models/demo/infer", body)
    assert response.status == 200, await response.text()


async def test_a_large_json_infer_body_holding_nan_is_still_outlined_before_decoding(
    demo_client: Client,
) -> None:
    """A review: with a NaN (which simdjson refuses) and a string escape, the outline
    gave way and 500k parameters reached msgspec."""
    data = [0.5] * WIDTH
    data[0] = float("nan")
    parameters = {f"p{i}": i for i in range(6000)}
    body = {"id": "café123", "inputs": [{**TENSOR, "data": data, "parameters": parameters}]}
    response = await post_json(demo_client, "/v2/models/demo/infer", body)
    assert response.status == 422
    assert "parameters a map, the request holds" in (await response.json())["error"]


async def test_a_version_written_with_leading_zeros_names_that_version(demo_client: Client) -> None:
    """A review: ``versions/01`` was 404 where Triton (and a directory named 01) serves 1."""
    response = await post_json(demo_client, "/v2/models/demo/versions/01/infer", {"inputs": [TENSOR]})
    assert response.status == 200, await response.text()
    assert (await response.json())["model_version"] == "1"
    metadata = await demo_client.get("/v2/models/demo/versions/001")
    assert metadata.status == 200


async def test_a_large_json_infer_body_giving_a_key_twice_is_422_before_decoding(demo_client: Client) -> None:
    """A review: the outline read the first of two ``parameters`` and msgspec built
    the 500k of the second."""
    parameters = ",".join(f'"p{i}":{i}' for i in range(6000))
    tensor = json.dumps(TENSOR)
    body = f'{{"inputs":[{tensor}],"parameters":{{}},"parameters":{{{parameters}}}}}'.encode()
    response = await demo_client.post(
        "/v2/models/demo/infer", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    )
    assert response.status == 422
    assert "the key 'parameters' given twice" in (await response.json())["error"]


async def test_a_large_json_infer_body_with_nan_giving_a_key_twice_is_422_as_without(
    demo_client: Client,
) -> None:
    """A review: the same body was 422 without a NaN and 200 with one."""
    parameters = ",".join(f'"p{i}":{i}' for i in range(6000))
    tensor = json.dumps({**TENSOR, "data": [float("nan")] + [0.5] * (WIDTH - 1)})
    body = f'{{"id":"a","id":"b","inputs":[{tensor}],"parameters":{{}},"parameters":{{{parameters}}}}}'.encode()
    response = await demo_client.post(
        "/v2/models/demo/infer", data=io.BytesIO(body), headers={"Content-Type": "application/json"}
    )
    assert response.status == 422
    assert "takes no request of 5 members" in (await response.json())["error"]


async def test_a_small_json_infer_body_with_too_many_parameters_is_422(demo_client: Client) -> None:
    body = {"inputs": [TENSOR], "parameters": {f"p{i}": 1 for i in range(300)}}
    response = await post_json(demo_client, "/v2/models/demo/infer", body)
    assert response.status == 422
    assert "Expected `object` of length <= 256" in (await response.json())["error"]


@pytest.fixture
async def unbatched_client(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> Client:
    """Models without a batch dimension to share (``max_batch_size`` 0): ``mixed``
    takes ``x`` [-1, 4] and ``k`` [1] (``y = x * k``), ``scalar`` takes ``x`` [] (``y = 2x``),
    ``triple`` ``x`` [3] (``y = x``)."""
    root = tmp_path / "models"
    mixed = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    write_version(root, "mixed", model_of(mixed))
    scalar = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    write_version(root, "scalar", model_of(scalar))
    triple = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "triple",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    write_version(root, "triple", model_of(triple))
    settings = make_settings(model_repository=str(root), default_model="mixed")
    client: Client = await app_client(settings)
    return client


async def test_an_unbatched_model_takes_inputs_of_different_first_dimensions(
    unbatched_client: Client,
) -> None:
    body = {
        "inputs": [
            {"name": "x", "shape": [3, 4], "datatype": "FP32", "data": list(range(12))},
            {"name": "k", "shape": [1], "datatype": "FP32", "data": [2]},
        ]
    }
    response = await unbatched_client.post("/v2/models/mixed/infer", json=body)
    assert response.status == 200, await response.text()
    output = (await response.json())["outputs"][0]
    assert output["shape"] == [3, 4]
    assert output["data"] == [2.0 * value for value in range(12)]


async def test_a_model_taking_a_scalar_is_served(unbatched_client: Client) -> None:
    config = await (await unbatched_client.get("/v2/models/scalar/config")).json()
    assert config["max_batch_size"] == 0
    body = {"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [1.5]}]}
    response = await unbatched_client.post("/v2/models/scalar/infer", json=body)
    assert response.status == 200, await response.text()
    output = (await response.json())["outputs"][0]
    assert output["shape"] == [] and output["data"] == [3.0]


async def test_an_unbatched_models_statistics_count_a_request_as_one_inference(
    unbatched_client: Client,
) -> None:
    """As Triton counts a model without batching: a request of 3 values is one."""
    body = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}
    for _ in range(2):
        response = await unbatched_client.post("/v2/models/triple/infer", json=body)
        assert response.status == 200, await response.text()
    stats = await (await unbatched_client.get("/v2/models/triple/stats")).json()
    [model] = stats["model_stats"]
    assert model["inference_count"] == 2
    assert model["execution_count"] == 2
    assert [entry["batch_size"] for entry in model["batch_stats"]] == [1]


@pytest.fixture
async def wide_client(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> Client:
    """``wide``: 80 inputs ``f0``..``f79`` of [N, 1], concatenated into ``y`` [N, 80],
    as a tabular model exported with one input per column."""
    root = tmp_path / "models"
    names = [f"f{index}" for index in range(80)]
    graph = helper.make_graph(
        [helper.make_node("Concat", names, ["y"], axis=1)],
        "wide",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1]) for name in names],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 80])],
    )
    write_version(root, "wide", model_of(graph), {"kind": "regressor"})
    client: Client = await app_client(make_settings(model_repository=str(root), default_model="wide"))
    return client


async def test_a_model_of_more_than_64_inputs_is_served(wide_client: Client) -> None:
    body = {
        "inputs": [
            {"name": f"f{index}", "shape": [1, 1], "datatype": "FP32", "data": [float(index)]}
            for index in range(80)
        ]
    }
    response = await wide_client.post("/v2/models/wide/infer", json=body)
    assert response.status == 200, await response.text()
    assert (await response.json())["outputs"][0]["data"] == [float(index) for index in range(80)]


async def test_an_output_asked_for_twice_is_422(demo_client: Client) -> None:
    """Each repeat was the whole tensor again: 4,096 repeats made a 766 KB request's
    answer 164 MB, built on the event loop (a review)."""
    body = {
        "inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}],
        "outputs": [{"name": "probabilities"}] * 2,
    }
    response = await demo_client.post("/v2/models/demo/infer", json=body)
    assert response.status == 422, await response.text()
    assert "asked for twice" in (await response.json())["error"]


@pytest.mark.parametrize("timeout_us", [10**400, 10**12, 600_000_001])
async def test_a_timeout_parameter_past_the_headers_range_is_400(
    demo_client: Client, timeout_us: int
) -> None:
    """As ``X-Request-Timeout`` past 600,000 ms (a review: 10**400 was a 500, and
    10**12 µs, 11.6 days, held a model that long)."""
    body = json.dumps(
        {
            "parameters": {"timeout": timeout_us},
            "inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}],
        }
    )
    response = await demo_client.post("/v2/models/demo/infer", data=body)
    assert response.status == 400, await response.text()
    assert "parameters.timeout" in (await response.json())["error"]


async def test_an_infer_id_longer_than_256_characters_is_echoed(demo_client: Client) -> None:
    body = {
        "id": "r" * 1000,
        "inputs": [{"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}],
    }
    response = await demo_client.post("/v2/models/demo/infer", json=body)
    assert response.status == 200, await response.text()
    assert (await response.json())["id"] == "r" * 1000


async def test_server_ready_does_not_wait_for_the_rest_routes_default_model(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    """Triton's readiness follows the repository's models: a repository without the
    REST routes' default model (``demo`` unless set) is ready for the protocol, while
    mlgate's own ``/ready`` says what is missing."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    write_version(tmp_path / "models", "only", model_of(graph))
    client: Client = await app_client(make_settings(model_repository=str(tmp_path / "models"), default_model="demo"))
    response = await client.get("/v2/health/ready")
    assert response.status == 200
    assert await response.json() == {"ready": True}
    assert (await client.get("/ready")).status == 503


def test_commas_are_counted_outside_strings_in_one_pass_whatever_the_quotes() -> None:
    """A review: a quote left open before 25,000 escaped quotes made the count retry at
    each of them, to the end of the body: 10 s of the event loop for 75 KB. Here 3 MB of
    it (hours, counted that way)."""
    assert flow._commas_outside_strings(b'"' + b'\\",' * 1_000_000) == 1
    assert flow._commas_outside_strings(b'["a,b", "c\\",d", 1, 2]') == 4
    assert flow._commas_outside_strings(b'["x", "open, to the end\\') == 2


async def test_server_ready_is_false_while_no_model_serves(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    (tmp_path / "models").mkdir()
    client: Client = await app_client(make_settings(model_repository=str(tmp_path / "models")))
    response = await client.get("/v2/health/ready")
    assert response.status == 400
    assert await response.json() == {"ready": False}


def test_classification_breaks_ties_by_the_lower_index_and_puts_nan_last() -> None:
    """A review: equal probabilities came back highest index first, NaN first."""
    equal = tensors.classified(np.full((1, 5), 0.2, dtype=np.float32), 3, (), batched=True)
    assert equal.tolist() == [[b"0.200000:0", b"0.200000:1", b"0.200000:2"]]
    with_nan = tensors.classified(np.array([[np.nan, 0.5, 0.9]], dtype=np.float32), 3, ("a", "b"), batched=True)
    assert with_nan.tolist() == [[b"0.900000:2", b"0.500000:1:b", b"nan:0:a"]]
    assert tensors.classified(np.array([3, 1, 3], dtype=np.uint8), 2, (), batched=False).tolist() == [b"3:0", b"3:2"]


def test_classification_of_no_rows_is_no_rows() -> None:
    """A review: a request of 0 rows asking for classes was a 500 (numpy cannot infer
    -1 in a reshape of size 0)."""
    assert tensors.classified(np.zeros((0, 4), dtype=np.float32), 2, (), batched=True).shape == (0, 2)


@pytest.fixture
async def two_free_dims_client(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> Client:
    """``Neg`` of FP32 [a, b]: both dimensions free, as a text model's [batch, tokens]."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    write_version(tmp_path / "models", "dyn", model_of(graph))
    settings = make_settings(model_repository=str(tmp_path / "models"), default_model="dyn")
    client: Client = await app_client(settings)
    return client


@pytest.mark.parametrize("shape", [[0, 2**61], [2**63 - 1, 0], [10**12, 0]])
async def test_a_shape_of_no_values_that_no_request_could_hold_is_422(
    two_free_dims_client: Client, shape: list[int]
) -> None:
    """A review: [0, 2**61] was a 500 with a traceback in the error log (numpy cannot
    shape it), and [10**12, 0] a 503 to retry that no retry gets past."""
    body = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}
    response = await two_free_dims_client.post("/v2/models/dyn/infer", json=body)
    assert response.status == 422, await response.text()
    assert "error" in await response.json()
    answered = await two_free_dims_client.post(
        "/v2/models/dyn/infer",
        json={"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]},
    )
    assert answered.status == 200


async def test_the_server_names_the_model_configuration_extension(demo_client: Client) -> None:
    """A review: ``/config`` is served, and a client checking for it was told it is not."""
    extensions = (await (await demo_client.get("/v2")).json())["extensions"]
    assert "model_configuration" in extensions


@pytest.mark.parametrize(
    "data",
    [
        [1.5, True] + [0.0] * (WIDTH - 2),
        [7, False] + [0] * (WIDTH - 2),
        [[0.5, True] + [0.0] * (WIDTH - 2)],
    ],
    ids=["beside-floats", "beside-integers", "nested"],
)
async def test_a_json_boolean_among_numbers_of_a_numeric_tensor_is_422(
    demo_client: Client, data: list[Any]
) -> None:
    """A review: numpy read ``[1.5, true]`` as ``[1.5, 1.0]`` and the model computed it,
    where a tensor of booleans only was refused (and Triton refuses both)."""
    tensor = {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": data}
    response = await demo_client.post("/v2/models/demo/infer", json={"inputs": [tensor]})
    assert response.status == 422, await response.text()
    assert "do not fit datatype FP32" in (await response.json())["error"]


async def test_numbers_zero_and_one_in_a_numeric_tensor_are_numbers(demo_client: Client) -> None:
    tensor = {"name": "input", "shape": [1, WIDTH], "datatype": "FP32", "data": [[0, 1.0] * (WIDTH // 2)]}
    response = await demo_client.post("/v2/models/demo/infer", json={"inputs": [tensor]})
    assert response.status == 200, await response.text()


@pytest.fixture
async def one_at_a_time_client(
    tmp_path: Path, app_client: Any, make_settings: Callable[..., Settings]
) -> Client:
    """``Identity`` of FP32 [N, 3] with ``max_batch_size`` 1: it never shares a run."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    write_version(tmp_path / "models", "single", model_of(graph), {"max_batch_size": 1})
    settings = make_settings(model_repository=str(tmp_path / "models"), default_model="single")
    client: Client = await app_client(settings)
    return client


async def test_classification_of_a_model_described_without_batching_is_of_the_whole_tensor(
    one_at_a_time_client: Client,
) -> None:
    """A review: a ``max_batch_size`` 1 model's config says 0 (no batching), yet its
    classification was row by row, where Triton classifies such a model's whole tensor."""
    config = await (await one_at_a_time_client.get("/v2/models/single/config")).json()
    assert config["max_batch_size"] == 0
    body = {
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 6, 5, 4]}],
        "outputs": [{"name": "y", "parameters": {"classification": 1}}],
    }
    response = await one_at_a_time_client.post("/v2/models/single/infer", json=body)
    assert response.status == 200, await response.text()
    [output] = (await response.json())["outputs"]
    assert output["shape"] == [1]
    assert output["data"] == ["6.000000:3"]
