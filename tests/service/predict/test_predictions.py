"""Answers from a model's scores: one row of a few classes is read in Python, and
reads exactly as numpy's argmax and max read it."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from mlgate.service.predict.flow import predictions


def classifier(labels: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(kind="classifier", config=SimpleNamespace(labels=labels))


def as_numpy_reads_it(scores: np.ndarray, labels: tuple[str, ...]) -> list[tuple[int, float, str | None]]:
    return [
        (c, p, labels[c] if c < len(labels) else None)
        for c, p in zip(scores.argmax(axis=1).tolist(), scores.max(axis=1).tolist(), strict=True)
    ]


def read(answers: list[Any]) -> list[tuple[int, float, str | None]]:
    return [(a.prediction, a.confidence, a.label) for a in answers]


@pytest.mark.parametrize("classes", [1, 2, 3, 10, 64, 65])
def test_a_single_row_is_answered_as_numpy_answers_it(classes: int) -> None:
    rng = np.random.default_rng(classes)
    labels = tuple(f"c{i}" for i in range(classes // 2))  # some classes have no label
    for _ in range(50):
        scores = rng.standard_normal((1, classes)).astype(np.float32)
        assert read(predictions(classifier(labels), scores)) == as_numpy_reads_it(scores, labels)


def test_a_tie_is_won_by_the_first_class_as_argmax_does() -> None:
    scores = np.array([[0.25, 0.75, 0.75]], dtype=np.float32)
    assert read(predictions(classifier(("a", "b", "c")), scores)) == [(1, 0.75, "b")]


@pytest.mark.parametrize("row", [[0.5, math.nan], [math.nan, 0.5], [math.inf, 0.1]])
def test_a_row_that_is_not_finite_is_read_by_numpy(row: list[float]) -> None:
    scores = np.array([row], dtype=np.float32)
    answers = read(predictions(classifier(), scores))
    expected = as_numpy_reads_it(scores, ())
    assert [a[0] for a in answers] == [e[0] for e in expected]
    assert np.array_equal([a[1] for a in answers], [e[1] for e in expected], equal_nan=True)


def test_the_confidence_of_a_class_from_integer_scores_is_a_number_with_a_point() -> None:
    [answer] = predictions(classifier(), np.array([[0, 3, 1]], dtype=np.int64))
    assert (answer.prediction, answer.confidence) == (1, 3.0)
    assert isinstance(answer.confidence, float)
