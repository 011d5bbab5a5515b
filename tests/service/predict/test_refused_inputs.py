"""An input the model itself refuses at run time (onnxruntime's INVALID_ARGUMENT: an
embedding id out of its table; or any other failure on values the model's known-good
feed does not share, as a Reshape whose shape follows the values) is that request's
422; the requests batched with it are answered, and the model's breaker stays closed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs

from mlgate.config import Settings
from tests.conftest import AppClientFactory
from tests.onnx_models import model_of, write_version

Client = TestClient[web.Request, web.Application]
TABLE = np.arange(20, dtype=np.float32).reshape(10, 2)  # ids 0..9


def write_embedding_model(root: Path) -> None:
    """``ids`` INT64 [N, 4] -> the sum of their rows of ``TABLE``: ``y`` FLOAT [N, 2]."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"]),
            helper.make_node("ReduceSum", ["rows", "axes"], ["y"], keepdims=0),
        ],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[
            numpy_helper.from_array(TABLE, "table"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    write_version(root, "emb", model_of(graph), {"kind": "regressor", "max_queue_delay_ms": 20})


@pytest.fixture
async def client(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    write_embedding_model(root)
    settings = make_settings(model_repository=str(root), default_model="emb", model_poll_interval_s=0)
    result: Client = await app_client(settings)
    return result


async def infer(client: Client, ids: list[int]) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": ids}]}
    answer = await client.post("/v2/models/emb/infer", json=body)
    return answer.status, await answer.json()


def expected(ids: list[int]) -> list[float]:
    return [float(value) for value in TABLE[ids].sum(axis=0)]


async def test_an_id_out_of_the_models_range_is_422_naming_the_models_refusal(client: Client) -> None:
    status, answer = await infer(client, [1, 2, 3, 999])
    assert status == 422, answer
    assert "could not compute this input" in answer["error"]
    assert "out of data bounds" in answer["error"]


async def test_requests_batched_with_a_refused_input_are_answered(client: Client) -> None:
    good = [[i % 10, (i + 1) % 10, 2, 3] for i in range(30)]
    calls = [infer(client, ids) for ids in good]
    calls.insert(15, infer(client, [1, 2, 3, 999]))
    answers = await asyncio.gather(*calls)
    refused = answers.pop(15)
    assert refused[0] == 422, refused
    for ids, (status, answer) in zip(good, answers, strict=True):
        assert status == 200, answer
        assert answer["outputs"][0]["data"] == expected(ids)


async def test_a_refused_input_writes_no_line_of_onnxruntimes_own_to_stderr(
    client: Client, capfd: pytest.CaptureFixture[str]
) -> None:
    """A review: each refused input also wrote onnxruntime's raw, coloured error line
    between the JSON log lines, so any client could fill the log with them; mlgate's
    own ``inference_input_refused`` line says it."""
    capfd.readouterr()
    for _ in range(3):
        status, _answer = await infer(client, [1, 2, 3, 999])
        assert status == 422
    assert "onnxruntime" not in capfd.readouterr().err


async def test_refused_inputs_never_open_the_models_breaker(client: Client) -> None:
    for _ in range(10):  # twice the breaker's default failures
        assert (await infer(client, [0, 0, 0, -999]))[0] == 422
    status, answer = await infer(client, [0, 1, 2, 3])
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == expected([0, 1, 2, 3])


def write_value_shaped_model(root: Path) -> None:
    """``x`` FLOAT [N, 4] -> itself, reshaped to ``[-1, 4]``; to ``[-1, 3]`` (which
    onnxruntime fails as ``FAIL``, not ``INVALID_ARGUMENT``) when a value is 100 or more."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
            helper.make_node("Less", ["largest", "hundred"], ["small"]),
            helper.make_node("Where", ["small", "by_four", "by_three"], ["shape"]),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        "shaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[
            numpy_helper.from_array(np.array(100, dtype=np.float32), "hundred"),
            numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "by_four"),
            numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "by_three"),
        ],
    )
    write_version(root, "shaped", model_of(graph), {"kind": "regressor", "max_queue_delay_ms": 20})


@pytest.fixture
async def shaped(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    write_value_shaped_model(root)
    settings = make_settings(model_repository=str(root), default_model="shaped", model_poll_interval_s=0)
    result: Client = await app_client(settings)
    return result


async def infer_shaped(client: Client, row: list[float]) -> tuple[int, dict[str, Any]]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row}]}
    answer = await client.post("/v2/models/shaped/infer", json=body)
    return answer.status, await answer.json()


async def test_values_the_model_fails_on_while_it_computes_its_known_good_feed_are_422(
    shaped: Client,
) -> None:
    assert (await infer_shaped(shaped, [1, 2, 3, 4]))[0] == 200  # it works
    status, answer = await infer_shaped(shaped, [1, 2, 3, 500])
    assert status == 422, answer
    assert "could not compute this input" in answer["error"]
    assert "cannot be reshaped" in answer["error"]
    assert "[ONNXRuntimeError]" not in answer["error"]


async def test_one_clients_failing_values_never_open_the_breaker_for_the_others(
    shaped: Client,
) -> None:
    assert (await infer_shaped(shaped, [0, 1, 2, 3]))[0] == 200  # it works
    for _ in range(10):  # twice the breaker's default failures
        assert (await infer_shaped(shaped, [500, 0, 0, 0]))[0] == 422
    status, answer = await infer_shaped(shaped, [1, 2, 3, 4])
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == [1, 2, 3, 4]


async def test_requests_batched_with_failing_values_are_answered(shaped: Client) -> None:
    assert (await infer_shaped(shaped, [0, 1, 2, 3]))[0] == 200  # it works
    good = [[float(i), 1, 2, 3] for i in range(30)]
    calls = [infer_shaped(shaped, row) for row in good]
    calls.insert(15, infer_shaped(shaped, [0, 0, 0, 700]))
    answers = await asyncio.gather(*calls)
    assert answers.pop(15)[0] == 422
    for row, (status, answer) in zip(good, answers, strict=True):
        assert status == 200, answer
        assert answer["outputs"][0]["data"] == row


async def test_a_model_that_answered_nothing_yet_is_at_fault_for_its_failures(shaped: Client) -> None:
    """Until it has answered a request, a model is not known to work: its failures are
    its own (500, counted), not the client's (a review: a model failing on every real
    value computed its warm-up's zeros, and clients were blamed forever)."""
    status, answer = await infer_shaped(shaped, [1, 2, 3, 500])
    assert status == 500, answer


async def test_a_refused_inputs_line_names_the_requests_own_id_not_the_bodys(client: Client) -> None:
    """A review: ``inference_input_refused`` named the body's ``id`` (anything a client
    writes) and not the X-Request-ID the answer and access line carry."""
    body = {
        "id": "the-body-id",
        "inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 999]}],
    }
    with capture_logs() as logs:
        answer = await client.post("/v2/models/emb/infer", json=body, headers={"X-Request-ID": "hdr-1"})
        assert answer.status == 422
    refused = [entry for entry in logs if entry["event"] == "inference_input_refused"]
    assert refused and all(entry["request_id"] == "hdr-1" for entry in refused)


async def test_a_batch_run_again_alone_names_its_requests(client: Client) -> None:
    """A review: ``inference_batch_failed_running_alone`` named none of its requests.
    Up to three bursts, until the refused input shares a batch (the first request of a
    burst runs alone)."""
    alone: list[dict[str, Any]] = []
    for _ in range(3):
        calls = [infer(client, [i % 10, 1, 2, 3]) for i in range(30)]
        calls.insert(15, infer(client, [1, 2, 3, 999]))
        with capture_logs() as logs:
            answers = await asyncio.gather(*calls)
        assert [status for status, _ in answers].count(422) == 1
        alone = [entry for entry in logs if entry["event"] == "inference_batch_failed_running_alone"]
        if alone:
            break
    assert alone
    for entry in alone:
        assert len(entry["request_ids"]) == entry["requests"]
        assert all(request_id for request_id in entry["request_ids"])
