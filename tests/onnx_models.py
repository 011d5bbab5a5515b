"""Small ONNX models the tests build from nodes, and their place in a model repository
(``<root>/<model>/<version>/model.onnx`` beside ``<root>/<model>/config.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from onnx import GraphProto, ModelProto, helper

from models.make_demo_model import IR_VERSION, OPSET


def model_of(graph: GraphProto) -> ModelProto:
    """``graph`` as a model of the opset and IR version of mlgate's demo model (ones
    the installed onnxruntime runs)."""
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def write_version(
    root: Path, name: str, model: ModelProto, config: dict[str, Any] | None = None, version: int = 1
) -> Path:
    """``model`` as version ``version`` of ``name`` in the repository at ``root``, with
    ``config`` as its ``config.json`` if given; the model file's path."""
    directory = root / name / str(version)
    directory.mkdir(parents=True)
    path = directory / "model.onnx"
    path.write_bytes(model.SerializeToString())
    if config is not None:
        (root / name / "config.json").write_text(json.dumps(config))
    return path
