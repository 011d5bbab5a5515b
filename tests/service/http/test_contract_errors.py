"""Undecodable bodies are 400 on every body-carrying route, even where msgspec meets a
schema error before the syntax error; well-formed bodies that break the schema stay 422."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from mlgate.config import Settings
from mlgate.service.http.front_door import as_api_error
from mlgate.workers.errors import InputRefused
from tests.conftest import AppClientFactory
from tests.service_process import REPO

Client = TestClient[web.Request, web.Application]
JSON = "application/json"
MSGPACK = "application/msgpack"
BODY_ROUTES = [
    "/api/v2/ingest",
    "/api/v2/predict",
    "/api/v1/predict",
    "/v2/models/demo/infer",
    "/v2/repository/models/demo/load",
    "/v2/repository/models/demo/unload",
    "/v2/repository/index",
]
# Each reaches a schema error (an unknown or mistyped field, an array for an object, a
# key that is no string) before the bytes that make it no JSON / msgpack at all.
UNDECODABLE = {
    "unknown-field-then-garbage": (JSON, b'{"source": "x", "records": [ this is not json'),
    "array-then-garbage": (JSON, b"[1, this is not json"),
    "wrong-type-then-garbage": (JSON, b'{"inputs": 5, "parameters": {"a": [ nope'),
    "well-formed-then-trailing-garbage": (JSON, b'{"sauce": 1} and then some'),
    "invalid-utf8-after-a-schema-error": (JSON, b'{"sauce": 1, "x": "\xff\xfe"}'),
    "msgpack-unused-opcode": (MSGPACK, bytes([0x82, 0xC1, 0xC1, 0xC1])),
    "msgpack-truncated": (MSGPACK, bytes([0x82, 0xA5]) + b"sauce" + bytes([0x92, 0x01])),
}


@pytest.fixture
async def client(app_client: AppClientFactory, make_settings: Callable[..., Settings]) -> Client:
    return await app_client(make_settings(model_repository=str(REPO / "models"), feature_dims=(4,)))


def error_message(route: str, document: dict[str, object]) -> object:
    return document["error"] if route.startswith("/v2/") else document["detail"]


@pytest.mark.parametrize("route", BODY_ROUTES)
@pytest.mark.parametrize("case", list(UNDECODABLE))
async def test_an_undecodable_body_is_400_even_when_a_schema_error_comes_first(
    client: Client, route: str, case: str
) -> None:
    media_type, body = UNDECODABLE[case]
    response = await client.post(route, data=body, headers={"Content-Type": media_type})
    assert response.status == 400, await response.text()
    document = await response.json()
    assert document["status"] == 400
    assert "not valid" in str(error_message(route, document))


@pytest.mark.parametrize("route", BODY_ROUTES)
@pytest.mark.parametrize("media_type", [JSON, MSGPACK])
async def test_a_well_formed_body_that_breaks_the_schema_stays_422(
    client: Client, route: str, media_type: str
) -> None:
    document = {"sauce": [1, 2, "three"], "nested": {"a": None}}
    encode = msgspec.msgpack.encode if media_type == MSGPACK else msgspec.json.encode
    response = await client.post(route, data=encode(document), headers={"Content-Type": media_type})
    assert response.status == 422, await response.text()
    assert (await response.json())["status"] == 422


def test_an_input_the_model_could_not_compute_is_a_422_with_errors() -> None:
    """A review: the 422 of an input onnxruntime refused at run time had no ``errors``."""
    error = as_api_error(InputRefused("model demo/1 could not compute this input: bad reshape"))
    assert error.status == 422
    assert [(e.loc, e.msg) for e in error.errors] == [("body", "the model could not compute this input")]
