"""Predictor against a real mlgate serving the demo model (128 features, classifier)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from mlgate_client import BatchPrediction, Prediction, Predictor, SyncPredictor
from mlgate_client.errors import NotFound, PredictorClosed, UnexpectedAnswer, ValidationFailed

from tests.client.scripted import Scripted

ROW = [0.1] * 128


@pytest.fixture
def mlgate_url(service_process: Any) -> str:
    return str(service_process().url)


async def test_one_row_answers_a_typed_prediction(mlgate_url: str) -> None:
    async with Predictor(mlgate_url, timeout_ms=5000) as predictor:
        result = await predictor.predict(ROW, request_id="r-1")
    assert isinstance(result, Prediction)
    assert result.prediction in (0, 1) and result.label in ("negative", "positive")
    assert result.confidence is not None and 0.0 <= result.confidence <= 1.0
    assert (result.model, result.request_id) == ("demo", "r-1")
    assert result.model_version not in ("", "latest")


async def test_instances_answer_one_prediction_per_row_in_order(mlgate_url: str) -> None:
    async with Predictor(mlgate_url, timeout_ms=5000) as predictor:
        single = await predictor.predict([0.9] * 128)
        result = await predictor.predict_many([ROW, [0.9] * 128, ROW])
    assert isinstance(result, BatchPrediction) and len(result.predictions) == 3
    assert result.predictions[1].prediction == single.prediction
    assert result.predictions[0] == result.predictions[2]


async def test_unknown_model_and_wrong_row_length_are_typed_errors(mlgate_url: str) -> None:
    async with Predictor(mlgate_url, timeout_ms=5000) as predictor:
        with pytest.raises(NotFound):
            await predictor.predict(ROW, model="no-such-model")
        with pytest.raises(ValidationFailed) as raised:
            await predictor.predict([1.0, 2.0])
    assert "128" in raised.value.detail


def test_sync_predictor_answers_from_a_thread(mlgate_url: str) -> None:
    with SyncPredictor(mlgate_url, timeout_ms=5000) as predictor:
        assert predictor.predict(ROW).model == "demo"


async def test_a_closed_predictor_refuses_to_predict_and_opens_nothing(mlgate_url: str) -> None:
    predictor = Predictor(mlgate_url, timeout_ms=5000)
    await predictor.predict(ROW)
    await predictor.close()
    with pytest.raises(PredictorClosed):
        await predictor.predict(ROW)
    assert predictor._transport._session is None  # no session left for nobody to close


def test_a_closed_sync_predictor_says_so(mlgate_url: str) -> None:
    predictor = SyncPredictor(mlgate_url, timeout_ms=5000)
    predictor.close()
    with pytest.raises(PredictorClosed):
        predictor.predict(ROW)


@pytest.mark.parametrize(
    "body",
    [b"<html>captive portal</html>", b'{"hello": "world"}', b"[" * 100_000, b"null", b"[]", b'"abc"'],
    ids=["html", "json", "deep", "null", "array", "string"],
)
async def test_a_success_that_is_no_prediction_is_an_unexpected_answer(
    scripted: Scripted, body: bytes
) -> None:
    """A review: a proxy's 200 raised a bare KeyError (and a deeply nested body a
    RecursionError), not an MlgateError."""

    async def foreign(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    scripted.script = [foreign]
    async with Predictor(scripted.url) as predictor:
        with pytest.raises(UnexpectedAnswer):
            await predictor.predict([0.5] * 4)
        with pytest.raises(UnexpectedAnswer):
            await predictor.predict_many([[0.5] * 4])


async def test_a_deadline_longer_than_mlgate_takes_sends_mlgates_longest(mlgate_url: str) -> None:
    """A review: ``timeout_ms=700_000`` sent ``X-Request-Timeout: 700000``, and every
    predict failed 400; the header is capped at 600000 ms, the deadline still whole."""
    async with Predictor(mlgate_url, timeout_ms=700_000) as predictor:
        result = await predictor.predict(ROW)
    assert result.model == "demo"
