"""A binary tensor reaches the model as the same values sent as JSON do: in an array of
its own, wherever its bytes begin in the body. onnxruntime takes other SIMD paths for a
buffer that is not aligned, and sums in another order (a review: tritonclient's
binary rows answered an ulp off what onnxruntime and the JSON request answer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from onnx import ModelProto, TensorProto, helper

from mlgate.config import Settings
from tests.conftest import AppClientFactory
from tests.onnx_models import model_of, write_version

Client = TestClient[web.Request, web.Application]
WIDTH = 37  # long enough for onnxruntime's vectorised sum, not a multiple of its lanes


def summing_model() -> ModelProto:
    """``x`` FLOAT [N, WIDTH] -> the sum of all its values, ``y`` FLOAT [1, 1]: rows
    are not kept, so each request runs alone, its input handed over as decoded."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1)],
        "total",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    return model_of(graph)


@pytest.fixture
async def client(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    write_version(root, "total", summing_model(), {"kind": "regressor"})
    settings = make_settings(model_repository=str(root), default_model="total", model_poll_interval_s=0)
    result: Client = await app_client(settings)
    return result


async def infer_binary(client: Client, row: np.ndarray, padding: int) -> Any:
    header = json.dumps(
        {
            "id": "x" * padding,  # moves where the tensor's bytes begin in the body
            "inputs": [
                {
                    "name": "x",
                    "shape": list(row.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": row.nbytes},
                }
            ],
        }
    ).encode()
    response = await client.post(
        "/v2/models/total/infer",
        data=header + row.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status == 200, await response.text()
    return (await response.json())["outputs"][0]["data"][0]


async def test_a_binary_tensor_is_computed_as_onnxruntime_computes_the_same_array(
    client: Client,
) -> None:
    rows = np.random.default_rng(7).normal(size=(8, 1, WIDTH)).astype(np.float32)
    session = ort.InferenceSession(
        summing_model().SerializeToString(), providers=["CPUExecutionProvider"])
    for row in rows:
        row = row.copy()  # an array of its own, as a caller of onnxruntime has
        expected = float(session.run(None, {"x": row})[0][0, 0])
        answers = {await infer_binary(client, row, padding) for padding in range(1, 65)}
        assert answers == {expected}
