"""Prediction wire types: ``POST /api/v2/predict`` and the deprecated ``/api/v1/predict``.

Inbound types are frozen, forbid unknown fields and carry their static bounds in
``Meta``; whether the feature count fits the model is checked against the model's
metadata by ``service.routes.predict`` (422 when it does not).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_FEATURES = 65_536
MAX_INSTANCES = 4096

# Only lengths are checked here: a name or version that no model has (however it is
# spelled) is an unknown model or version, 404, as the contract says.
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ModelVersion = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=32,
        description='"latest" or a concrete version number, as answered in model_version',
    ),
]
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Features = Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_FEATURES)]


class PredictRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One row as ``features`` or several as ``instances`` (exactly one of the two)."""

    features: Features | None = None
    instances: (
        Annotated[list[Features], msgspec.Meta(min_length=1, max_length=MAX_INSTANCES)] | None
    ) = None
    model: ModelName | None = None
    model_version: ModelVersion = "latest"
    request_id: RequestId | None = None

    def __post_init__(self) -> None:
        if (self.features is None) == (self.instances is None):
            raise ValueError("send exactly one of `features` or `instances`")


# The body as the document describes it: exactly one of the two, as ``__post_init__``
# holds it, which msgspec's schema of the struct cannot say (a review: ``{}`` and a
# body giving both were valid by the document, and each was refused 422).
PredictBody = Annotated[
    PredictRequest,
    msgspec.Meta(
        extra_json_schema={
            "oneOf": [
                {"required": ["features"], "properties": {"features": {"type": "array"}}},
                {"required": ["instances"], "properties": {"instances": {"type": "array"}}},
            ]
        }
    ),
]


class PredictTarget(msgspec.Struct, frozen=True, kw_only=True):
    """The model a predict body names, read without decoding its rows: under overload a
    request is shed on this alone. Not a validation: the full body is decoded after."""

    model: str | None = None
    model_version: str = "latest"


class PredictV1Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The deprecated v1 body: one row of features."""

    features: Features
    model: ModelName | None = None
    model_version: ModelVersion = "latest"
    request_id: RequestId | None = None


class Prediction(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Classifiers: the arg-max class and its probability (and its label when the
    model's config names them). Regressors: the value, with ``confidence`` null."""

    prediction: int | float
    confidence: float | None
    label: str | None = None


class PredictResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    prediction: int | float
    confidence: float | None
    model: str
    model_version: str
    request_id: str | None
    latency_ms: float
    label: str | None = None


class BatchPredictResponse(msgspec.Struct, frozen=True, kw_only=True):
    predictions: list[Prediction]
    model: str
    model_version: str
    request_id: str | None
    latency_ms: float


class PredictAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The v2 answer as the OpenAPI document describes it: a ``PredictResponse`` for
    ``features`` or a ``BatchPredictResponse`` for ``instances`` (msgspec cannot
    document a union of untagged Structs, so this one type carries both shapes)."""

    model: str
    model_version: str
    request_id: str | None
    latency_ms: float
    prediction: int | float | None = None
    confidence: float | None = None
    label: str | None = None
    predictions: list[Prediction] | None = None


class PredictV1Response(msgspec.Struct, frozen=True, kw_only=True):
    """The v1 answer old clients were written against: ``result`` is what v2 answers
    as ``prediction`` for the same row (the class index, or the regression value)."""

    result: int | float
