"""Whether a model's requests may share a run (``open_session``'s last answer): yes for
models whose outputs keep the input's rows, however the graph names the dimensions;
no for those whose outputs count something else, even where zeros hide it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from mlgate.workers.inference.model_config import _same_rows, open_session
from tests.onnx_models import model_of


def value(name: str, shape: list[Any], element: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, element, shape)


def constant(name: str, array: np.ndarray) -> Any:
    return numpy_helper.from_array(array, name)


def shares_batches(
    tmp_path: Path, inputs: list[Any], outputs: list[Any], nodes: list[Any], *inits: Any
) -> bool:
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    path = tmp_path / "model.onnx"
    path.write_bytes(model_of(graph).SerializeToString())
    return bool(open_session(path, 1)[3])


WEIGHTS = constant("W", np.ones((3, 2), np.float32))
MATMUL = helper.make_node("MatMul", ["x", "W"], ["y"])


def test_a_row_wise_model_with_unnamed_first_dimensions_shares(tmp_path: Path) -> None:
    assert shares_batches(
        tmp_path, [value("x", [None, 3])], [value("y", [None, 2])], [MATMUL], WEIGHTS
    )


def test_first_dimensions_named_apart_as_tf2onnx_names_them_share(tmp_path: Path) -> None:
    assert shares_batches(
        tmp_path, [value("x", ["unk__6", 3])], [value("y", ["unk__7", 2])], [MATMUL], WEIGHTS
    )


def test_two_inputs_each_with_a_name_of_its_own_share(tmp_path: Path) -> None:
    add = helper.make_node("Add", ["a", "b"], ["y"])
    inputs = [value("a", ["batch_a", 3]), value("b", ["batch_b", 3])]
    assert shares_batches(tmp_path, inputs, [value("y", ["batch_a", 3])], [add])


def test_a_free_feature_dimension_that_takes_only_one_size_still_shares(tmp_path: Path) -> None:
    """The probe puts rows on the first dimension only: 2 on the feature dimension
    failed against a bias of 3 and cost the model its batching (a review)."""
    add = helper.make_node("Add", ["x", "bias"], ["y"])
    bias = constant("bias", np.ones(3, np.float32))
    assert shares_batches(
        tmp_path, [value("x", ["batch", "f"])], [value("y", ["batch", 3])], [add], bias
    )


def test_a_flattened_output_does_not_share(tmp_path: Path) -> None:
    reshape = helper.make_node("Reshape", ["x", "shape"], ["y"])
    flat = constant("shape", np.array([-1], np.int64))
    assert not shares_batches(
        tmp_path, [value("x", ["batch", 3])], [value("y", ["batch"])], [reshape], flat
    )


def test_values_kept_by_a_bound_do_not_share_though_zeros_keep_one_a_row(tmp_path: Path) -> None:
    """Compress(x > [-1, 0]) keeps one value of a row of zeros, so a run of zeros kept
    its rows; a shared run whose count happened to match handed callers each other's
    values (a review)."""
    nodes = [
        helper.make_node("Greater", ["x", "bound"], ["above"]),
        helper.make_node("Reshape", ["above", "flat"], ["keep"]),
        helper.make_node("Compress", ["x", "keep"], ["y"]),
    ]
    inits = [
        constant("bound", np.array([-1.0, 0.0], np.float32)),
        constant("flat", np.array([-1], np.int64)),
    ]
    assert not shares_batches(
        tmp_path, [value("x", [None, 2])], [value("y", [None])], nodes, *inits
    )


@pytest.mark.parametrize("first", [1, "k"], ids=["fixed", "named"])
def test_an_output_of_a_fixed_count_does_not_share(tmp_path: Path, first: Any) -> None:
    total = helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1)
    assert not shares_batches(
        tmp_path, [value("x", ["batch", 3])], [value("y", [first, 1])], [total]
    )


def test_a_model_needing_two_of_a_free_dimension_loads_and_shares(tmp_path: Path) -> None:
    """A 2x2 kernel over free height and width: ones there failed the load (a review)."""
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    kernel = constant("w", np.ones((1, 1, 2, 2), np.float32))
    inputs, outputs = [value("x", ["N", 1, "H", "W"])], [value("y", ["N", 1, "h", "w"])]
    assert shares_batches(tmp_path, inputs, outputs, [conv], kernel)


def test_flattening_a_free_width_does_not_share(tmp_path: Path) -> None:
    """With a width of 1 the flattened output kept the rows: the model shared runs
    until its first shared run gave it away (a review)."""
    reshape = helper.make_node("Reshape", ["x", "shape"], ["y"])
    flat = constant("shape", np.array([-1], np.int64))
    assert not shares_batches(
        tmp_path, [value("x", ["N", "L"])], [value("y", ["n"])], [reshape], flat
    )


def test_a_model_mixing_the_rows_of_a_run_does_not_share(tmp_path: Path) -> None:
    """Each row less the run's mean keeps the row count, but a caller's answer was made
    of the others' rows (a review: [0, 0, 0, 0] alone, [-30, ...] beside 7 others)."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["y"]),
    ]
    assert not shares_batches(tmp_path, [value("x", ["N", 4])], [value("y", ["N", 4])], nodes)


def test_a_model_that_takes_one_row_at_a_time_loads_and_runs_alone(tmp_path: Path) -> None:
    reshape = helper.make_node("Reshape", ["x", "shape"], ["y"])
    one_row = constant("shape", np.array([1, 3], np.int64))
    assert not shares_batches(
        tmp_path, [value("x", ["N", 3])], [value("y", ["N", 3])], [reshape], one_row
    )


def test_rows_are_the_same_within_a_tenth_of_the_largest_value_at_their_place() -> None:
    """Quantization noise of a few hundredths is no mixing of rows; a value made of the
    others' is, however large the values beside it."""
    batched = [np.array([[1.0, 0.5, 9e4], [3.0, 4.0, 9e4]], np.float32)]
    assert _same_rows(batched, [np.array([[1.04, 0.52, 9e4]], np.float32)], 0)
    assert not _same_rows(batched, [np.array([[1.0, 0.0, 9e4]], np.float32)], 0)
    assert not _same_rows([np.array([[-30.0], [30.0]])], [np.array([[0.0]])], 0)
    infinite = [np.array([[np.inf, np.nan], [1.0, 2.0]])]
    assert _same_rows(infinite, [np.array([[np.inf, np.nan]])], 0)


def test_a_dynamically_quantized_model_shares(tmp_path: Path) -> None:
    """Its scale comes from the whole run, so a row alone differs by a few hundredths:
    it is batched as Triton batches it (a review: the first check refused it)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    weights = [
        constant("W1", (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)),
        constant("W2", (rng.standard_normal((128, 4)) * 0.1).astype(np.float32)),
    ]
    graph = helper.make_graph(nodes, "m", [value("x", ["N", 64])], [value("y", ["N", 4])], weights)
    plain, quantized = tmp_path / "plain.onnx", tmp_path / "quantized.onnx"
    plain.write_bytes(model_of(graph).SerializeToString())
    quantize_dynamic(str(plain), str(quantized), weight_type=QuantType.QInt8)
    assert open_session(quantized, 1)[3]


def test_a_large_output_beside_mixed_rows_hides_nothing(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["mixed"]),
        helper.make_node("Mul", ["x", "big"], ["large"]),
        helper.make_node("Concat", ["mixed", "large"], ["y"], axis=1),
    ]
    big = constant("big", np.array(5000.0, np.float32))
    outputs = [value("y", ["N", 8])]
    assert not shares_batches(tmp_path, [value("x", ["N", 4])], outputs, nodes, big)


def test_a_convolution_over_free_image_sizes_loads_and_shares(tmp_path: Path) -> None:
    """A 3x3 kernel takes no 2x2 image: the load tries larger ones (a review: such a
    model, fine in onnxruntime, failed to load)."""
    kernel = constant("K", np.ones((1, 1, 3, 3), np.float32))
    assert shares_batches(
        tmp_path,
        [value("x", ["N", 1, "H", "W"])],
        [value("y", ["N", 1, "h", "w"])],
        [helper.make_node("Conv", ["x", "K"], ["y"])],
        kernel,
    )


def test_a_model_reading_its_strings_as_numbers_loads(tmp_path: Path) -> None:
    assert shares_batches(
        tmp_path,
        [value("s", ["N", 1], TensorProto.STRING)],
        [value("y", ["N", 1])],
        [helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)],
    )


def test_a_failing_model_of_many_free_dimensions_fails_its_load_without_huge_probes(
    tmp_path: Path,
) -> None:
    """Its own error, not a MemoryError: a 4-D input at 224 would be 2.5e9 values (a
    review: 10 GB and 15 s for every load of such a model)."""
    shape = constant("shape", np.array([3, -1], np.int64))
    with pytest.raises(Exception, match="Reshape") as failed:
        shares_batches(
            tmp_path,
            [value("x", ["N", "a", "b", "c", "d"])],
            [value("y", [3, None])],
            [helper.make_node("Reshape", ["x", "shape"], ["y"])],
            shape,
        )
    assert not isinstance(failed.value, MemoryError)


def test_a_model_of_fixed_dimensions_over_the_probe_bound_still_loads(tmp_path: Path) -> None:
    """The bound is for the larger fallbacks only (a review: every probe skipped, the
    load failed with an empty AssertionError)."""
    assert not shares_batches(
        tmp_path,
        [value("x", [1, 3, 1200, 1200])],
        [value("y", [1, 3, 1200, 1200])],
        [helper.make_node("Relu", ["x"], ["y"])],
    )
