"""Build the demo model shipped in ``models/demo``: a small deterministic MLP.

128 float inputs -> 64 hidden units (ReLU) -> 2-class softmax. Input ``input``
``[-1, 128]`` FP32, output ``probabilities`` ``[-1, 2]``. Weights come from a fixed
numpy seed, so running this script again writes the same bytes.

    python models/make_demo_model.py            # writes models/demo/1/model.onnx

``build_mlp`` is reused by the tests and the benchmark for other sizes and seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_SIZES = (128, 64, 2)
DEMO_SEED = 20240501
# Old enough for every onnxruntime mlgate supports.
OPSET = 17
IR_VERSION = 8


def build_mlp(
    sizes: Sequence[int] = DEMO_SIZES,
    *,
    seed: int = DEMO_SEED,
    name: str = "demo",
    input_name: str = "input",
    output_name: str = "probabilities",
) -> onnx.ModelProto:
    """An MLP with ReLU between layers and a softmax at the end, He-initialised."""
    if len(sizes) < 2:
        raise ValueError("an MLP needs at least an input and an output size")
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = input_name
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    for index, (fan_in, fan_out) in enumerate(layers):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"mm{index}"]))
        nodes.append(helper.make_node("Add", [f"mm{index}", f"b{index}"], [f"z{index}"]))
        current = f"z{index}"
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{index}"]))
            current = f"h{index}"
    nodes.append(helper.make_node("Softmax", [current], [output_name], axis=-1))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mlgate",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def main() -> None:
    demo = Path(__file__).resolve().parent / "demo"
    write_model(build_mlp(), demo / "1" / "model.onnx")
    config = {
        "kind": "classifier",
        "labels": ["negative", "positive"],
        "max_batch_size": 64,
        "max_queue_delay_ms": 2.0,
        "version_policy": {"latest": 1},
    }
    (demo / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {demo}")


if __name__ == "__main__":
    main()
