"""What a model without a ``kind`` in its ``config.json`` is served as, read from its
outputs (``guess_kind``)."""

from __future__ import annotations

import pytest

from mlgate.workers.inference.model_config import TensorSpec, guess_kind


def spec(datatype: str, *shape: int, name: str = "y") -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, shape=shape)


@pytest.mark.parametrize(
    "outputs",
    [
        (spec("FP32", -1, 3),),
        (spec("FP32", -1, 1, 3),),
        (spec("INT64", -1, name="label"), spec("FP32", -1, 3, name="probabilities")),
        (spec("BYTES", -1, name="label"), spec("FP64", -1, 2, name="probabilities")),
    ],
    ids=["scores", "scores-of-one-step", "sklearn-int-label-first", "sklearn-string-label-first"],
)
def test_a_model_answering_class_scores_is_a_classifier(outputs: tuple[TensorSpec, ...]) -> None:
    assert guess_kind(outputs) == "classifier"


@pytest.mark.parametrize(
    "outputs",
    [
        (),
        (spec("FP32", -1),),
        (spec("FP32", -1, 1),),
        (spec("FP32", -1, 2, 3),),  # a sequence of scores, not one row of them
        (spec("FP32", -1, -1),),  # columns unknown
        (spec("INT64", -1, 3),),
        (spec("INT64", -1), spec("FP32", -1, 1)),
        (spec("FP32", -1), spec("FP32", -1, 3)),  # a value first, then other outputs
    ],
    ids=["none", "one-value", "one-column", "steps", "free-columns", "integers", "label-and-one-score", "value-first"],
)
def test_any_other_model_is_a_regressor(outputs: tuple[TensorSpec, ...]) -> None:
    assert guess_kind(outputs) == "regressor"
