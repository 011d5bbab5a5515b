"""Prediction routes: ``POST /api/v2/predict`` and the deprecated ``POST /api/v1/predict``.

Both run one code path, ``service.predict.flow``; v1 answers ``{"result": <number>}``,
the number v2 answers as ``prediction`` (v1's original schema), with deprecation headers on every answer of its path (``PATH_HEADERS``, added by the front
door).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from aiohttp import web

from mlgate.schemas.predict import (
    BatchPredictResponse,
    PredictAnswer,
    PredictBody,
    PredictRequest,
    PredictResponse,
    PredictV1Request,
    PredictV1Response,
)
from mlgate.service.http.codec import request_format, respond
from mlgate.service.http.context import arrived
from mlgate.service.http.routing import Route
from mlgate.service.predict.flow import (
    TIMEOUT_PARAMETER,
    read_payload,
    run_predict,
)

DEPRECATED_AT = datetime(2026, 1, 1, tzinfo=UTC)
SUNSET_AT = datetime(2027, 7, 1, tzinfo=UTC)
V2_PATH = "/api/v2/predict"
V1_PATH = "/api/v1/predict"
V1_HEADERS = {
    "Deprecation": f"@{int(DEPRECATED_AT.timestamp())}",
    "Sunset": format_datetime(SUNSET_AT, usegmt=True),
    "Link": '</api/v2/predict>; rel="successor-version"',
}
PATH_HEADERS = {V1_PATH: V1_HEADERS}


async def predict_v2(request: web.Request) -> web.Response:
    started = arrived(request)
    payload = await read_payload(request, PredictRequest, started)
    return respond(request, await run_predict(request, payload, started))


async def predict_v1(request: web.Request) -> web.Response:
    """Deprecated: ``{"features": [...]}`` -> ``{"result": <number>}``, the number v2
    answers as ``prediction`` for the row (class index or regression value). Every answer
    on its path, errors included, carries the deprecation headers (``PATH_HEADERS``,
    added by the front door)."""
    started = arrived(request)
    payload = await read_payload(request, PredictV1Request, started)
    return respond(request, v1_answer(await run_predict(request, payload, started)))


def v1_answer(answer: PredictResponse | BatchPredictResponse) -> PredictV1Response:
    """v1's answer to the row v2 answered with ``answer``."""
    assert isinstance(answer, PredictResponse)  # v1 bodies hold one row
    return PredictV1Response(result=answer.prediction)


ROUTES = [
    Route(
        "post",
        V2_PATH,
        predict_v2,
        "Predict one row (features) or several (instances)",
        "prediction",
        {200: PredictAnswer, 404: None, 504: None},
        request=PredictBody,
        scope="predict",
        body_media=request_format,
        parameters=[TIMEOUT_PARAMETER],
        description=(
            "Rows are batched with other requests on the model version's worker. With "
            "`instances` the answer is `{predictions: [{prediction, confidence}], model, "
            "model_version, request_id, latency_ms}`. "
            "`model_version` in the answer is the concrete version that served it. "
            "Unknown model or version: 404; a model that failed to load here: 503 with "
            "Retry-After; wrong feature count: 422; queue full: 503 "
            "with Retry-After; deadline passed while queued: 504."
        ),
    ),
    Route(
        "post",
        V1_PATH,
        predict_v1,
        "Predict one row (deprecated: use /api/v2/predict)",
        "prediction",
        {200: PredictV1Response, 404: None, 504: None},
        request=PredictV1Request,
        scope="predict",
        body_media=request_format,
        parameters=[TIMEOUT_PARAMETER],
        deprecated=True,
        description=(
            "Same code path as v2; `result` is what v2 answers as `prediction` (the class "
            "index or the regression value). Answers carry Deprecation, Sunset and Link headers."
        ),
    ),
]
