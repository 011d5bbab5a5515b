"""Prediction inputs feed the drift monitor of the model's profile."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlgate.config import Settings
from mlgate.service.state import DRIFT_MONITOR
from mlgate.workers.quality.profile import build_profile
from mlgate.workers.quality.profile_store import ProfileStore
from tests.conftest import AppClientFactory
from tests.service_process import REPO

DEMO = REPO / "models" / "demo"


def _profiled_demo(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    repository = tmp_path / "models"
    shutil.copytree(DEMO, repository / "demo")
    rng = np.random.default_rng(0)
    profile = build_profile(rng.standard_normal((2000, 128)), kind="model", name="demo")
    ProfileStore(tmp_path / "profiles", repository).save(profile)
    return make_settings(
        model_repository=str(repository), profiles_dir=str(tmp_path / "profiles"),
        drift_window_records=64,
    )


async def test_predicted_rows_are_scored_against_the_model_profile(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    client = await app_client(_profiled_demo(make_settings, tmp_path))
    rng = np.random.default_rng(0)
    for _ in range(8):
        instances = rng.standard_normal((8, 128)).tolist()
        response = await client.post("/api/v2/predict", json={"model": "demo", "instances": instances})
        assert response.status == 200, await response.text()
    await client.app[DRIFT_MONITOR].drained()
    response = await client.get("/api/v2/quality/models/demo")
    body = await response.json()
    assert (body["records_observed"], body["window"]["windows_completed"]) == (64, 1)


async def test_open_inference_protocol_rows_are_scored_too(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    client = await app_client(_profiled_demo(make_settings, tmp_path))
    rows = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    request = {
        "inputs": [
            {"name": "input", "shape": [16, 128], "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    response = await client.post("/v2/models/demo/infer", json=request)
    assert response.status == 200, await response.text()
    await client.app[DRIFT_MONITOR].drained()
    body = await (await client.get("/api/v2/quality/models/demo")).json()
    assert body["records_observed"] == 16
