"""An input the model itself refuses at run time (onnxruntime's INVALID_ARGUMENT: an
embedding id out of its table) is that request's 422; the requests batched with it
are answered, and the model's breaker stays closed."""

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


async def test_refused_inputs_never_open_the_models_breaker(client: Client) -> None:
    for _ in range(10):  # twice the breaker's default failures
        assert (await infer(client, [0, 0, 0, -999]))[0] == 422
    status, answer = await infer(client, [0, 1, 2, 3])
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == expected([0, 1, 2, 3])
