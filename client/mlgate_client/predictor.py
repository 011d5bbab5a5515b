"""Predictor: ``POST /api/v2/predict`` for one row or many, under one deadline.

The deadline (``timeout_ms``) covers every attempt: each attempt tells the server what
is left of it in ``X-Request-Timeout`` (so the server answers 504 rather than compute
a late answer) and retries follow ``retry.RetryPolicy`` only while time remains.
Answers come back as ``Prediction`` / ``BatchPrediction``; errors as ``ApiError``
subclasses (``NotFound`` for an unknown model or version, ``ValidationFailed`` for a
wrong feature count, ``DeadlineExceeded`` when no answer came within the deadline) or
``TransportError``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import msgpack

from mlgate_client.errors import (
    DeadlineExceeded,
    MlgateError,
    PredictorClosed,
    TransportError,
    UnexpectedAnswer,
)
from mlgate_client.records import Features
from mlgate_client.retry import RetryPolicy, call_with_retries
from mlgate_client.transport import Transport

PREDICT_PATH = "/api/v2/predict"
ANSWER_GRACE_S = 0.2  # past the deadline, how long the server's own 504 may take to arrive
MAX_REQUEST_TIMEOUT_MS = 600_000  # the most X-Request-Timeout mlgate takes
log = logging.getLogger("mlgate_client.predictor")


@dataclass(frozen=True, slots=True)
class RowPrediction:
    """One row's answer: a classifier's arg-max class and its probability (and label),
    or a regressor's value with ``confidence`` None."""

    prediction: int | float
    confidence: float | None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Prediction(RowPrediction):
    model: str = ""
    model_version: str = ""
    request_id: str | None = None
    latency_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class BatchPrediction:
    predictions: list[RowPrediction]
    model: str
    model_version: str
    request_id: str | None
    latency_ms: float


def _row(document: dict[str, Any]) -> RowPrediction:
    return RowPrediction(document["prediction"], document.get("confidence"), document.get("label"))


@contextlib.contextmanager
def _read_as_answer(document: Any) -> Iterator[None]:
    """A success whose body is not a prediction (a proxy's 200, a captive portal's
    page) is ``UnexpectedAnswer``, an ``MlgateError``, not a ``KeyError`` (a review)."""
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UnexpectedAnswer(f"unexpected predict answer: {document!r:.200}") from exc


def _plain_rows(rows: Any) -> Any:
    return rows.tolist() if hasattr(rows, "tolist") else rows


class Predictor:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        model_version: str = "latest",
        timeout_ms: float = 1000.0,
        retry: RetryPolicy | None = None,
        connections: int = 32,
    ) -> None:
        self.model = model
        self.model_version = model_version
        self.timeout_ms = timeout_ms
        self._retry = retry or RetryPolicy(initial_backoff_s=0.02, max_backoff_s=1.0)
        self._transport = Transport(url, api_key, connections=connections)
        self._closed = False

    async def predict(
        self,
        features: Features,
        *,
        model: str | None = None,
        model_version: str | None = None,
        request_id: str | None = None,
        timeout_ms: float | None = None,
    ) -> Prediction:
        """One row's prediction."""
        document = await self._call(
            {"features": _plain_rows(features)}, model, model_version, request_id, timeout_ms
        )
        with _read_as_answer(document):
            row = _row(document)
            return Prediction(
                row.prediction, row.confidence, row.label,
                model=document["model"], model_version=document["model_version"],
                request_id=document.get("request_id"), latency_ms=document.get("latency_ms", 0.0),
            )

    async def predict_many(
        self,
        instances: Sequence[Features] | Any,
        *,
        model: str | None = None,
        model_version: str | None = None,
        request_id: str | None = None,
        timeout_ms: float | None = None,
    ) -> BatchPrediction:
        """Several rows in one request (``instances``), answered in order."""
        rows = [_plain_rows(row) for row in _plain_rows(instances)]
        document = await self._call({"instances": rows}, model, model_version, request_id, timeout_ms)
        with _read_as_answer(document):
            return BatchPrediction(
                [_row(row) for row in document["predictions"]],
                document["model"], document["model_version"],
                document.get("request_id"), document.get("latency_ms", 0.0),
            )

    async def _call(
        self,
        request: dict[str, Any],
        model: str | None,
        model_version: str | None,
        request_id: str | None,
        timeout_ms: float | None,
    ) -> dict[str, Any]:
        if self._closed:
            raise PredictorClosed("closed: it asks no more predictions")
        if model or self.model:
            request["model"] = model or self.model
        request["model_version"] = model_version or self.model_version
        if request_id is not None:
            request["request_id"] = request_id
        body = msgpack.packb(request)
        budget_s = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1000

        async def attempt(remaining_s: float) -> dict[str, Any]:
            headers = {
                "Content-Type": "application/msgpack",
                # mlgate takes 1 to 600000 ms (400 otherwise); a longer budget still
                # covers the retries.
                "X-Request-Timeout": str(min(MAX_REQUEST_TIMEOUT_MS, max(1, int(remaining_s * 1000)))),
            }
            answer = await self._transport.post(
                PREDICT_PATH, body, headers, remaining_s + ANSWER_GRACE_S
            )
            if not isinstance(answer.document, dict):
                raise UnexpectedAnswer(f"unexpected predict answer: {answer.document!r:.200}")
            return answer.document

        def on_retry(retry: int, error: MlgateError, delay_s: float) -> None:
            log.info(
                "mlgate_client.retry",
                extra={"path": PREDICT_PATH, "retry": retry, "error": str(error),
                       "delay_s": round(delay_s, 3)},
            )

        deadline = time.monotonic() + budget_s
        try:
            return await call_with_retries(attempt, self._retry, on_retry, timeout_s=budget_s)
        except TransportError as exc:
            if isinstance(exc.__cause__, TimeoutError) and time.monotonic() >= deadline:
                # No answer within the deadline: the deadline's error, as if the server
                # had said it (a 504), not a transport failure.
                problem = {"title": "Deadline exceeded", "status": 504,
                           "detail": f"no answer within {budget_s * 1000:g} ms ({exc})"}
                raise DeadlineExceeded(504, problem) from exc
            raise

    async def close(self) -> None:
        self._closed = True
        await self._transport.close()

    async def __aenter__(self) -> Predictor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
