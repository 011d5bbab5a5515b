"""Answers from a model's scores: one row of a few classes is read in Python, and
reads exactly as numpy's argmax and max read it."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mlgate.service.http.errors import ValidationFailed
from mlgate.service.predict.flow import BYTES_VALUE_BUDGET, input_value_budget, predictions
from mlgate.workers.inference.model_config import TensorSpec


def classifier(labels: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(
        kind="classifier", config=SimpleNamespace(labels=labels), model="m", version="1"
    )


def regressor() -> Any:
    return SimpleNamespace(kind="regressor", config=SimpleNamespace(labels=()), model="m", version="1")


def as_numpy_reads_it(scores: np.ndarray, labels: tuple[str, ...]) -> list[tuple[int, float, str | None]]:
    """The arg-max and its probability: the score in a row of probabilities, softmax's
    in a row of logits (a score outside [0, 1])."""
    wide = scores.astype(np.float64)
    softmax = np.exp(wide - wide.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    logits = (wide < 0).any(axis=1) | (wide > 1).any(axis=1)
    best = np.where(logits, softmax.max(axis=1), wide.max(axis=1))
    return [
        (c, p, labels[c] if c < len(labels) else None)
        for c, p in zip(scores.argmax(axis=1).tolist(), best.tolist(), strict=True)
    ]


def read(answers: list[Any]) -> list[tuple[int, float, str | None]]:
    return [(a.prediction, a.confidence, a.label) for a in answers]


@pytest.mark.parametrize("classes", [2, 3, 10, 64, 65])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_a_single_row_is_answered_as_numpy_answers_it(classes: int, kind: str) -> None:
    rng = np.random.default_rng(classes)
    labels = tuple(f"c{i}" for i in range(classes // 2))  # some classes have no label
    for _ in range(50):
        if kind == "logits":
            scores = rng.standard_normal((1, classes)).astype(np.float32)
        else:
            scores = rng.dirichlet(np.ones(classes), size=1).astype(np.float32)
        answered = read(predictions(classifier(labels), scores, 1))
        expected = as_numpy_reads_it(scores, labels)
        assert [(c, label) for c, _, label in answered] == [(c, label) for c, _, label in expected]
        assert [p for _, p, _ in answered] == pytest.approx([p for _, p, _ in expected], rel=1e-6)


def test_a_row_of_logits_is_answered_softmaxs_probability_of_its_best_class() -> None:
    """A review: a classifier exported without its softmax answered its logit, -1.0 or
    7.0, as the "probability" the contract promises."""
    scores = np.array([[-1.0, -2.0], [5.0, 7.0], [0.2, 0.7]], dtype=np.float32)
    answers = read(predictions(classifier(), scores, 3))
    assert [c for c, _, _ in answers] == [0, 1, 1]
    assert [p for _, p, _ in answers] == pytest.approx(
        [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2)), 0.7], rel=1e-6
    )
    single = read(predictions(classifier(), scores[1:2], 1))
    assert single[0][1] == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-9)


def test_a_single_score_column_is_the_probability_of_class_one() -> None:
    """A review: a sigmoid output (Keras' and torch's binary classifier) was read by
    arg-max over one column, class 0 whatever the score."""
    scores = np.array([[0.993], [0.0067], [0.5], [1.0], [0.0]], dtype=np.float64)
    answers = read(predictions(classifier(("neg", "pos")), scores, 5))
    assert [(c, label) for c, _, label in answers] == [
        (1, "pos"), (0, "neg"), (0, "neg"), (1, "pos"), (0, "neg")
    ]
    assert [p for _, p, _ in answers] == pytest.approx([0.993, 0.9933, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("score", [1.5, -0.1, math.nan, math.inf])
def test_a_single_score_column_that_is_not_a_probability_is_422(score: float) -> None:
    with pytest.raises(ValidationFailed, match="not a probability"):
        predictions(classifier(), np.array([[0.5], [score]], dtype=np.float32), 2)


def test_a_tie_is_won_by_the_first_class_as_argmax_does() -> None:
    scores = np.array([[0.25, 0.75, 0.75]], dtype=np.float32)
    assert read(predictions(classifier(("a", "b", "c")), scores, 1)) == [(1, 0.75, "b")]


@pytest.mark.parametrize("row", [[0.5, math.nan], [math.nan, 0.5], [math.inf, 0.1]])
def test_a_row_whose_scores_are_not_finite_is_422_not_a_null_confidence(row: list[float]) -> None:
    with pytest.raises(ValidationFailed, match="not a finite number"):
        predictions(classifier(), np.array([row], dtype=np.float32), 1)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_regression_value_that_is_not_finite_is_422_not_a_null_prediction(value: float) -> None:
    with pytest.raises(ValidationFailed, match="not a finite number"):
        predictions(regressor(), np.array([[1.0], [value]], dtype=np.float32), 2)


def test_fewer_answers_than_rows_is_422() -> None:
    with pytest.raises(ValidationFailed, match="answers 1 rows for 2"):
        predictions(regressor(), np.array([[3.0]], dtype=np.float32), 2)


def test_a_classifier_with_only_labels_answers_them_without_a_confidence() -> None:
    answers = predictions(classifier(), np.array([2, 0], dtype=np.int64), 2)
    assert read(answers) == [(2, None, None), (0, None, None)]


def test_the_confidence_of_a_class_from_integer_scores_is_a_number_with_a_point() -> None:
    [answer] = predictions(classifier(), np.array([[0, 1, 0]], dtype=np.int64), 1)
    assert (answer.prediction, answer.confidence) == (1, 1.0)
    assert isinstance(answer.confidence, float)
    [votes] = predictions(classifier(), np.array([[0, 3, 1]], dtype=np.int64), 1)
    assert votes.prediction == 1 and isinstance(votes.confidence, float)


def test_a_classifier_answering_n_1_c_scores_reads_a_row_of_scores_a_row() -> None:
    scores = np.array([[[0.1, 0.7, 0.2]], [[0.6, 0.3, 0.1]]], dtype=np.float32)
    assert [(a.prediction, a.confidence) for a in predictions(classifier(), scores, 2)] == [
        (1, pytest.approx(0.7)),
        (0, pytest.approx(0.6)),
    ]


def test_a_classifier_answering_more_than_a_row_of_scores_a_row_is_422() -> None:
    with pytest.raises(ValidationFailed, match=r"answers outputs of shape \[1, 2, 3\]"):
        predictions(classifier(), np.zeros((1, 2, 3), dtype=np.float32), 1)


@pytest.mark.parametrize("shape", [(-1, -1), (-1, 4096)])
def test_a_strings_input_takes_at_most_the_strings_budget(shape: tuple[int, ...]) -> None:
    """A review: 1M, or 16.7M, strings were the budget of such inputs, each a Python
    object made on the event loop."""
    assert input_value_budget(TensorSpec("s", "BYTES", shape)) == BYTES_VALUE_BUDGET
    assert input_value_budget(TensorSpec("x", "FP32", shape)) > BYTES_VALUE_BUDGET
