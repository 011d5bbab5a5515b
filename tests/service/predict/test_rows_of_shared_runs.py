"""Models whose outputs have a free first dimension that does not count the input's
rows (a flattened output, a detection model's hits): requests never share a run on
them, so no caller gets another's outputs."""

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
CALLERS = 8


def write_model(
    root: Path, name: str, nodes: list[Any], output_shape: list[int | str], **consts: np.ndarray
) -> None:
    """Input ``x`` of ``["batch", 3]`` through ``nodes`` to ``y`` of ``output_shape``."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(value, const) for const, value in consts.items()],
    )
    write_version(root, name, model_of(graph), {"max_batch_size": 64, "max_queue_delay_ms": 50})


@pytest.fixture
async def client(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    # Declares its output's first dimension as the input's, but flattens: 3 values a row.
    write_model(
        root,
        "flat",
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        ["batch"],
        shape=np.array([-1], np.int64),
    )
    # The values above 0.5, as many as there are, whatever the rows: a count of its own.
    write_model(
        root,
        "hits",
        [
            helper.make_node("Greater", ["x", "threshold"], ["above"]),
            helper.make_node("Reshape", ["above", "shape"], ["above_flat"]),
            helper.make_node("Compress", ["x", "above_flat"], ["y"]),
        ],
        ["hits"],
        threshold=np.array(0.5, np.float32),
        shape=np.array([-1], np.int64),
    )
    settings = make_settings(
        model_repository=str(root), default_model="flat", model_poll_interval_s=0
    )
    result: Client = await app_client(settings)
    return result


async def infer(client: Client, model: str, row: list[float]) -> list[float]:
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": row}]}
    answer = await client.post(f"/v2/models/{model}/infer", json=body)
    assert answer.status == 200, await answer.text()
    outputs: list[float] = (await answer.json())["outputs"][0]["data"]
    return outputs


@pytest.mark.parametrize("model", ["flat", "hits"])
async def test_concurrent_callers_each_get_the_outputs_of_their_own_row(
    client: Client, model: str
) -> None:
    rows = [[float(10 * caller + 1), 0.0, float(10 * caller + 3)] for caller in range(CALLERS)]
    answers = await asyncio.gather(*(infer(client, model, row) for row in rows))
    for row, outputs in zip(rows, answers, strict=True):
        assert outputs == (row if model == "flat" else [value for value in row if value > 0.5])


@pytest.mark.parametrize("model", ["flat", "hits"])
async def test_such_a_model_is_served_without_batching(client: Client, model: str) -> None:
    answer = await client.get(f"/v2/models/{model}/config")
    config = await answer.json()
    assert config["max_batch_size"] == 0, config
