"""ONNX models that take as long as they are told: for tests of loads and runs that never
end. Demo-shaped (input [-1, 128] -> probabilities [-1, 2]); each run first loops
``trips`` times (a Loop that adds 0.0), where ``trips`` is a constant or, by default,
the largest input value: zeros (the warm-up run at load) are quick, a request of large
values runs for ever."""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, TensorProto, checker, helper, numpy_helper

from tests.onnx_models import model_of


def looping_model(trips: int | None = None) -> ModelProto:
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "zero"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1]),
        ],
        [numpy_helper.from_array(np.array([0.0], np.float32), "zero")],
    )
    if trips is None:
        count = [
            helper.make_node("ReduceMax", ["input"], ["largest"], keepdims=0),
            helper.make_node("Cast", ["largest"], ["trips"], to=TensorProto.INT64),
        ]
        constants = []
    else:
        count = []
        constants = [numpy_helper.from_array(np.array(trips, np.int64), "trips")]
    graph = helper.make_graph(
        [
            *count,
            helper.make_node("Loop", ["trips", "go", "start"], ["acc"], body=body),
            helper.make_node("MatMul", ["input", "weights"], ["scores"]),
            helper.make_node("Add", ["scores", "acc"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "looping",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 128])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [-1, 2])],
        [
            numpy_helper.from_array(np.zeros((128, 2), np.float32), "weights"),
            numpy_helper.from_array(np.array(True), "go"),
            numpy_helper.from_array(np.array([0.0], np.float32), "start"),
            *constants,
        ],
    )
    model = model_of(graph)
    checker.check_model(model)
    return model
