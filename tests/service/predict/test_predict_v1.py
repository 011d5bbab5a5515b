"""/api/v1/predict keeps the schema its clients were written against: ``{"result": <number>}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from tests.service_process import REPO

Client = TestClient[web.Request, web.Application]
DEMO_REPO = REPO / "models"


def features(seed: int) -> list[float]:
    row: list[float] = np.random.default_rng(seed).standard_normal(128).astype(np.float32).tolist()
    return row


async def test_v1_result_is_the_number_v2_answers_as_prediction(
    app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client: Client = await app_client(make_settings(model_repository=str(DEMO_REPO)))
    for seed in range(4):
        row = features(seed)
        v1 = await client.post("/api/v1/predict", json={"features": row})
        v2 = await client.post("/api/v2/predict", json={"features": row})
        assert v1.status == 200 and v2.status == 200
        body = await v1.json()
        assert body == {"result": (await v2.json())["prediction"]}
        assert isinstance(body["result"], int)  # the demo model classifies: a class index
        assert v1.headers["Deprecation"].startswith("@")


async def test_v1_result_is_a_number_in_msgpack_too(
    app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client: Client = await app_client(make_settings(model_repository=str(DEMO_REPO)))
    response = await client.post(
        "/api/v1/predict",
        data=msgspec.msgpack.encode({"features": features(9)}),
        headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert response.status == 200
    body = msgspec.msgpack.decode(await response.read())
    assert list(body) == ["result"] and isinstance(body["result"], int)


async def test_openapi_documents_the_v1_result_as_a_number(
    app_client: Any, make_settings: Callable[..., Settings]
) -> None:
    client: Client = await app_client(make_settings(model_repository=str(DEMO_REPO)))
    document = await (await client.get("/openapi.json")).json()
    answer = document["paths"]["/api/v1/predict"]["post"]["responses"]["200"]
    schema = answer["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    result = schema["properties"]["result"]
    assert {option.get("type") for option in result.get("anyOf", [result])} <= {"integer", "number"}
