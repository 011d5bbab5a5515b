"""A model version that keeps failing trips its breaker: 503 with Retry-After at once.

Failing means failing its known-good feed too (the load's warm-up): a run that fails on
a request's values while the model computes that feed is the input's fault (422, not
counted). So the model here goes bad after its load, as one whose memory ran out
would: every run of its session fails from then on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from mlgate.config import Settings
from mlgate.service.state import MODEL_REPOSITORY
from tests.conftest import AppClientFactory
from tests.onnx_models import model_of


class GoneBad:
    """A session every run of which fails, as onnxruntime fails a run out of memory."""

    def run(self, *args: Any) -> NoReturn:
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : bad allocation")


def _model_failing_past_one_row() -> onnx.ModelProto:
    """[batch, 4] -> Reshape to [1, 4] -> Softmax: runs for one row, fails for more."""
    shape = numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["input", "shape"], ["flat"]),
            helper.make_node("Softmax", ["flat"], ["probabilities"], axis=-1),
        ],
        "fragile",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 4])],
        [shape],
    )
    return model_of(graph)


async def _gone_bad_client(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> Any:
    """The app serving ``fragile``, answered once, then gone bad (its breaker trips at
    the second failure)."""
    version_dir = tmp_path / "models" / "fragile" / "1"
    version_dir.mkdir(parents=True)
    onnx.save(_model_failing_past_one_row(), version_dir / "model.onnx")
    settings = make_settings(
        model_repository=str(tmp_path / "models"),
        default_model="fragile",
        model_breaker_fail_max=2,
        model_breaker_reset_s=30,
    )
    client = await app_client(settings)
    one_row = {"features": [0.1, 0.2, 0.3, 0.4]}
    assert (await client.post("/api/v2/predict", json=one_row)).status == 200

    worker = client.app[MODEL_REPOSITORY].resolve("fragile").worker
    worker._session = GoneBad()
    return client


async def test_failing_model_opens_its_breaker_and_answers_503_at_once(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    client = await _gone_bad_client(app_client, make_settings, tmp_path)
    one_row = {"features": [0.1, 0.2, 0.3, 0.4]}
    statuses = [(await client.post("/api/v2/predict", json=one_row)).status for _ in range(2)]
    assert statuses[0] == 500 and statuses[1] == 503  # the second failure trips it

    response = await client.post("/api/v2/predict", json=one_row)
    assert response.status == 503
    assert 0 < int(response.headers["Retry-After"]) <= 30
    assert response.content_type == "application/problem+json"


async def test_a_model_whose_breaker_is_open_is_listed_as_degraded_in_ready(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A review: ``/ready`` said nothing while every predict of the default model was
    refused. Listed, not unready: every host serving that model would leave at once."""
    client = await _gone_bad_client(app_client, make_settings, tmp_path)
    assert "degraded" not in await (await client.get("/ready")).json()
    for _ in range(2):
        await client.post("/api/v2/predict", json={"features": [0.1, 0.2, 0.3, 0.4]})
    response = await client.get("/ready")
    assert response.status == 200
    assert "fragile/1" in (await response.json())["degraded"]["models"]
