"""Models exported without a free batch dimension on the REST predict routes: a row
count the model cannot take, or an output with no rows, is the request's 422, never a
500 counted against the model's breaker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from onnx import TensorProto, helper

from mlgate.config import Settings
from tests.conftest import AppClientFactory
from tests.onnx_models import model_of, write_version

Client = TestClient[web.Request, web.Application]
ROW = [1.0, 2.0, 3.0, 4.0]


def write_model(root: Path, name: str, nodes: list[Any], output_shape: list[int | str]) -> None:
    """``name``: input ``x`` of [1, 4] (fixed) or [N, 4], through ``nodes`` to ``y``."""
    input_shape: list[int | str] = [1, 4] if name == "fixed" else ["N", 4]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
    )
    write_version(root, name, model_of(graph), {"kind": "regressor"})


@pytest.fixture
async def client(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    write_model(root, "fixed", [helper.make_node("Identity", ["x"], ["y"])], [1, 4])
    write_model(root, "allsum", [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [])
    # [N, 4] -> [N, 0]: x[:, 0:0]
    empty_rows = [
        helper.make_node("Constant", [], ["zero"], value_ints=[0]),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Slice", ["x", "zero", "zero", "one"], ["y"]),
    ]
    write_model(root, "nothing", empty_rows, ["N", 0])
    settings = make_settings(model_repository=str(root), default_model="fixed", model_poll_interval_s=0)
    result: Client = await app_client(settings)
    return result


async def predict(client: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = await client.post("/api/v2/predict", json=body)
    return answer.status, await answer.json()


async def test_a_model_with_its_batch_fixed_answers_the_rows_it_takes(client: Client) -> None:
    status, answer = await predict(client, {"model": "fixed", "features": ROW})
    assert status == 200, answer
    assert answer["prediction"] == 1.0


async def test_more_rows_than_a_fixed_batch_takes_are_422(client: Client) -> None:
    status, problem = await predict(client, {"model": "fixed", "instances": [ROW, ROW]})
    assert status == 422
    assert "takes 1 rows at once, got 2" in problem["detail"]
    assert problem["errors"][0]["loc"] == "instances"


async def test_refused_row_counts_never_open_the_model_breaker(client: Client) -> None:
    for _ in range(10):  # twice the breaker's default failures
        assert (await predict(client, {"model": "fixed", "instances": [ROW, ROW]}))[0] == 422
    status, answer = await predict(client, {"model": "fixed", "features": ROW})
    assert status == 200, answer


@pytest.mark.parametrize("path", ["/api/v2/predict", "/api/v1/predict"])
async def test_a_model_answering_a_scalar_is_not_a_feature_row_model(client: Client, path: str) -> None:
    answer = await client.post(path, json={"model": "allsum", "features": ROW})
    problem = await answer.json()
    assert answer.status == 422
    assert problem["errors"][0]["loc"] == "model"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v2/predict", {"model": "nothing", "features": ROW}),
        ("/api/v2/predict", {"model": "nothing", "instances": [ROW, ROW]}),
        ("/api/v1/predict", {"model": "nothing", "features": ROW}),
    ],
)
async def test_a_model_answering_no_value_a_row_is_422_not_500(
    client: Client, path: str, body: dict[str, Any]
) -> None:
    answer = await client.post(path, json=body)
    problem = await answer.json()
    assert answer.status == 422, problem
    assert "answers no value a row" in problem["detail"]
