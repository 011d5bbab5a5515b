"""Classifiers exported as sklearn-onnx exports them, a 1-D ``label`` output before
the ``probabilities``: the REST routes answer from the class scores, never a 500."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from onnx import TensorProto, helper, numpy_helper

from mlgate.config import Settings
from tests.conftest import AppClientFactory
from tests.onnx_models import model_of, write_version

Client = TestClient[web.Request, web.Application]
ROW = [1.0, 4.0, 2.0, 3.0]  # class 1 by every score below


def write_classifier(root: Path, name: str, with_probabilities: bool) -> None:
    """``x`` [N, 4] -> ``label`` [N] (INT64 arg-max) and, if asked, ``probabilities``
    [N, 4] (softmax), in that order."""
    nodes = [helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])]
    if with_probabilities:
        nodes.append(helper.make_node("Softmax", ["x"], ["probabilities"], axis=1))
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4]))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outputs
    )
    write_version(root, name, model_of(graph), {"kind": "classifier"})


def write_sigmoid(root: Path, name: str) -> None:
    """``x`` [N, 4] -> ``p`` [N, 1], the sigmoid of the row's sum: a binary classifier
    as Keras and torch export one."""
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=1),
        helper.make_node("Sigmoid", ["sum"], ["p"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])],
    )
    write_version(root, name, model_of(graph), {"kind": "classifier", "labels": ["neg", "pos"]})


def write_unkinded_classifier(root: Path, name: str, label_first: bool) -> None:
    """No ``config.json``: its kind is guessed. ``x`` [N, 4] -> ``scores`` [N, 1, 4]
    (softmax), then ``emb`` [N, 4] (``-x``: another arg-max); or, ``label_first``, a 1-D
    ``label`` (INT64 arg-max) then ``scores``."""
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"], axis=1),
        helper.make_node("Unsqueeze", ["p", "axes"], ["scores"]),
    ]
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1, 4])
    if label_first:
        nodes.append(helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0))
        outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), scores]
    else:
        nodes.append(helper.make_node("Neg", ["x"], ["emb"]))
        outputs = [scores, helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs,
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    write_version(root, name, model_of(graph))


def write_classifier_of_many_outputs(root: Path, name: str, layout: str) -> None:
    """``x`` [N, 4] with ``kind: classifier`` and the softmax ``p`` among other outputs:
    ``steps`` [N, T, 4] (its middle dimension free: 1 when run) then an ``emb`` [N, 8];
    or a 1-D INT64 ``label``, then an INT64 matrix (``embi`` [N, 8], or ``label2d``
    [N, 1]), then ``p`` [N, 4]."""
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"], axis=1),
        helper.make_node("Concat", ["x", "x"], ["xx"], axis=1),
        helper.make_node("Neg", ["xx"], ["emb"]),
    ]
    tensor = helper.make_tensor_value_info
    initializers = [
        numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "rest"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
    ]
    if layout == "steps":
        # The shape made from the input's, so the model cannot know T is 1.
        nodes += [
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Slice", ["sx", "zero", "one"], ["n"]),
            helper.make_node("Concat", ["n", "rest"], ["shape"], axis=0),
            helper.make_node("Reshape", ["p", "shape"], ["steps"]),
        ]
        outputs = [tensor("steps", TensorProto.FLOAT, ["N", "T", 4]), tensor("emb", TensorProto.FLOAT, ["N", 8])]
    else:
        nodes += [
            helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0),
            helper.make_node("ArgMax", ["x"], ["label2d"], axis=1, keepdims=1),
            helper.make_node("Cast", ["emb"], ["embi"], to=TensorProto.INT64),
        ]
        matrix = tensor("embi", TensorProto.INT64, ["N", 8]) if layout == "int-matrix" else tensor(
            "label2d", TensorProto.INT64, ["N", 1]
        )
        outputs = [tensor("label", TensorProto.INT64, ["N"]), matrix, tensor("p", TensorProto.FLOAT, ["N", 4])]
    graph = helper.make_graph(
        nodes, name, [tensor("x", TensorProto.FLOAT, ["N", 4])], outputs, initializer=initializers
    )
    write_version(root, name, model_of(graph), {"kind": "classifier"})


@pytest.fixture
async def client(
    tmp_path: Path, app_client: AppClientFactory, make_settings: Callable[..., Settings]
) -> Client:
    root = tmp_path / "models"
    write_classifier(root, "sklearn", with_probabilities=True)
    write_classifier(root, "labels", with_probabilities=False)
    write_sigmoid(root, "binary")
    write_unkinded_classifier(root, "steps", label_first=False)
    write_unkinded_classifier(root, "labelled-steps", label_first=True)
    for layout in ("steps", "int-matrix", "label-matrix"):
        write_classifier_of_many_outputs(root, f"many-{layout}", layout)
    settings = make_settings(model_repository=str(root), default_model="sklearn", model_poll_interval_s=0)
    result: Client = await app_client(settings)
    return result


async def post(client: Client, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    answer = await client.post(path, json=body)
    return answer.status, await answer.json()


async def test_a_label_first_classifier_answers_the_arg_max_and_its_probability(client: Client) -> None:
    status, answer = await post(client, "/api/v2/predict", {"model": "sklearn", "features": ROW})
    assert status == 200, answer
    assert answer["prediction"] == 1
    assert 0.6 < answer["confidence"] < 0.7  # softmax of 4 against 1, 2, 3


async def test_a_label_first_classifier_answers_each_instance(client: Client) -> None:
    body = {"model": "sklearn", "instances": [ROW, [9.0, 0.0, 0.0, 0.0]]}
    status, answer = await post(client, "/api/v2/predict", body)
    assert status == 200, answer
    assert [p["prediction"] for p in answer["predictions"]] == [1, 0]


async def test_a_label_first_classifier_answers_v1(client: Client) -> None:
    status, answer = await post(client, "/api/v1/predict", {"model": "sklearn", "features": ROW})
    assert status == 200, answer
    assert answer == {"result": 1}


async def test_a_classifier_with_only_labels_answers_them_without_a_confidence(client: Client) -> None:
    status, answer = await post(client, "/api/v2/predict", {"model": "labels", "features": ROW})
    assert status == 200, answer
    assert (answer["prediction"], answer["confidence"]) == (1, None)


@pytest.mark.parametrize(
    ("row", "expected"), [([3.0, 2.0, 0.0, 0.0], (1, "pos")), ([-3.0, -2.0, 0.0, 0.0], (0, "neg"))]
)
async def test_a_binary_classifier_of_one_sigmoid_column_answers_the_likelier_class(
    client: Client, row: list[float], expected: tuple[int, str]
) -> None:
    status, answer = await post(client, "/api/v2/predict", {"model": "binary", "features": row})
    assert status == 200, answer
    assert (answer["prediction"], answer["label"]) == expected
    assert answer["confidence"] == pytest.approx(0.9933, abs=1e-4)  # sigmoid(5)
    status, v1 = await post(client, "/api/v1/predict", {"model": "binary", "features": row})
    assert (status, v1) == (200, {"result": expected[0]})


@pytest.mark.parametrize("model", ["steps", "labelled-steps"])
async def test_a_classifier_of_one_step_of_scores_answers_from_them_without_a_kind(
    client: Client, model: str
) -> None:
    """A review: an ``[N, 1, C]`` output was passed over for a later ``[N, 4]`` one (or
    the label answered, without a confidence) once such a model was guessed a
    classifier."""
    status, answer = await post(client, "/api/v2/predict", {"model": model, "features": ROW})
    assert status == 200, answer
    assert answer["prediction"] == 1
    assert 0.6 < answer["confidence"] < 0.7  # softmax of 4 against 1, 2, 3
    status, v1 = await post(client, "/api/v1/predict", {"model": model, "features": ROW})
    assert (status, v1) == (200, {"result": 1})


@pytest.mark.parametrize("layout", ["steps", "int-matrix", "label-matrix"])
async def test_a_classifier_answers_from_its_float_scores_among_other_outputs(
    client: Client, layout: str
) -> None:
    """A review: a free middle dimension, or an integer matrix before the scores, had
    the answer taken from another output (classes the model has not, or a 422)."""
    body = {"model": f"many-{layout}", "instances": [ROW, [9.0, 0.0, 0.0, 0.0]]}
    status, answer = await post(client, "/api/v2/predict", body)
    assert status == 200, answer
    [first, second] = answer["predictions"]
    assert (first["prediction"], second["prediction"]) == (1, 0)
    assert 0.6 < first["confidence"] < 0.7
