"""Prediction inputs feed the drift monitor of the model's profile."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from config import Settings
from service.appkeys import DRIFT_MONITOR
from tests.conftest import AppClientFactory
from workers.profile_store import ProfileStore
from workers.quality_profile import build_profile

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"


async def test_predicted_rows_are_scored_against_the_model_profile(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(DEMO, repository / "demo")
    rng = np.random.default_rng(0)
    profile = build_profile(rng.standard_normal((2000, 128)), kind="model", name="demo")
    ProfileStore(tmp_path / "profiles", repository).save(profile)
    settings = make_settings(
        model_repository=str(repository), profiles_dir=str(tmp_path / "profiles"),
        drift_window_records=64,
    )
    client = await app_client(settings)
    for _ in range(8):
        instances = rng.standard_normal((8, 128)).tolist()
        response = await client.post("/api/v2/predict", json={"model": "demo", "instances": instances})
        assert response.status == 200, await response.text()
    await client.app[DRIFT_MONITOR].drained()
    response = await client.get("/api/v2/quality/models/demo")
    body = await response.json()
    assert (body["records_observed"], body["window"]["windows_completed"]) == (64, 1)
