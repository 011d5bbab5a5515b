"""Open Inference Protocol tensors: JSON and binary-extension data to numpy and back.

Binary tensor extension: with ``Inference-Header-Content-Length: N`` the first N bytes
of the body are the JSON request and the rest holds, in input order, the raw
little-endian bytes of every input that declares ``parameters.binary_data_size``
(BYTES elements each prefixed by a 4-byte little-endian length). Outputs asked for
with ``parameters.binary_data`` (or request-level ``binary_data_output``) go back the
same way. Every input is checked against the model's metadata (names, datatypes,
shapes, element counts): a mismatch is 422 with the failing location.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np

from mlgate.schemas.oip import (
    InferenceRequest,
    RequestInput,
    RequestOutput,
)
from mlgate.schemas.problem import FieldError
from mlgate.service.http.codec import NonFinite
from mlgate.service.http.errors import BadRequest, ValidationFailed
from mlgate.service.predict.flow import input_value_budget
from mlgate.workers.inference.model_config import NUMPY_DTYPES, TensorSpec
from mlgate.workers.inference.repository import ModelVersion

HEADER_LENGTH = "Inference-Header-Content-Length"
# A binary tensor's values start on this boundary, as numpy's own arrays do.
ALIGNMENT = 64
# Which JSON value kinds (numpy's, after np.asarray) each target kind accepts.
_ACCEPTED_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}


def invalid(loc: str, msg: str) -> ValidationFailed:
    return ValidationFailed(msg, errors=[FieldError(loc=loc, msg=msg)])


def _shape_fits(shape: list[int], spec: tuple[int, ...]) -> bool:
    return len(shape) == len(spec) and all(
        d < 0 or d == s for s, d in zip(shape, spec, strict=True)
    )


def _from_json(tensor: RequestInput, data: list[Any], loc: str) -> np.ndarray:
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        flat = np.array(data, dtype=np.object_).reshape(-1)
        if not all(isinstance(value, str) for value in flat):
            raise invalid(f"{loc}.data", "BYTES data must be strings")
        array = flat
    else:
        dtype = NUMPY_DTYPES[tensor.datatype]
        try:
            raw = np.asarray(data)
        except ValueError:
            raise invalid(f"{loc}.data", "nested data is ragged") from None
        big = raw.dtype.kind == "O" or (raw.dtype.kind == "f" and dtype.kind in "iu")
        if raw.size and dtype.kind in "iuf" and big:
            raw = _big_integers(data, raw, dtype, tensor.datatype, f"{loc}.data")
        if raw.size and raw.dtype.kind not in _ACCEPTED_KINDS[dtype.kind]:
            raise invalid(f"{loc}.data", f"values do not fit datatype {tensor.datatype}")
        if raw.size and raw.dtype.kind in "iuf" and _holds_booleans(data, raw):
            raise invalid(f"{loc}.data", f"values do not fit datatype {tensor.datatype}")
        if raw.size and dtype.kind in "iu":
            limits = np.iinfo(dtype)
            if raw.min() < limits.min or raw.max() > limits.max:
                raise invalid(f"{loc}.data", f"values out of range for {tensor.datatype}")
        with np.errstate(over="ignore"):
            array = raw.astype(dtype).reshape(-1)
        if dtype.kind == "f" and (np.isinf(array) & np.isfinite(raw).reshape(-1)).any():
            raise invalid(f"{loc}.data", f"values out of range for {tensor.datatype}")
    if array.size != count:
        raise invalid(f"{loc}.data", f"shape {tensor.shape} needs {count} values, got {array.size}")
    return _shaped(array, tensor.shape, loc)


def _holds_booleans(data: list[Any], raw: np.ndarray) -> bool:
    """Whether JSON ``true`` or ``false`` stand among the numbers numpy read ``raw`` from
    (as 1 and 0: a review saw ``[1.5, true]`` fed to an FP32 model as ``[1.5, 1.0]``,
    where all booleans were refused, and so does Triton). Looked for only when some
    value reads 0 or 1, in ``data`` written again as JSON, where only a boolean is
    spelled with a ``t`` or an ``f`` (numbers are digits, a point, an exponent; a
    non-finite float ``null``): in C, where a walk of the values in Python held the
    loop 2 s for an all-zero batch of images (a review)."""
    if not ((raw == 0) | (raw == 1)).any():
        return False
    text = _json_text(data)
    return b"t" in text or b"f" in text


_json_text = msgspec.json.Encoder().encode


def _big_integers(
    data: list[Any], raw: np.ndarray, dtype: np.dtype[Any], datatype: str, loc: str
) -> np.ndarray:
    """``raw`` as numpy read JSON numbers, read again where it could not keep integers
    exactly: those of 2^63 and up beside smaller ones (read as float64, rounded) or of
    2^64 and up (Python objects). Integers for an integer datatype are read exactly (a
    review: UINT64's maximum beside a 0 was refused), any number for a float one is
    rounded as one float literal would be; anything else is left for the caller to
    refuse."""
    values = np.asarray(data, dtype=np.object_)
    numbers = values.reshape(-1)
    if dtype.kind == "f":
        if not all(type(value) in (int, float) for value in numbers):
            return raw
        try:
            return np.array(numbers.tolist(), dtype=np.float64).reshape(values.shape)
        except OverflowError:  # an integer literal beyond every float
            raise invalid(loc, f"values out of range for {datatype}") from None
    if not all(type(value) is int for value in numbers):
        return raw
    limits = np.iinfo(dtype)
    if min(numbers) < limits.min or max(numbers) > limits.max:
        raise invalid(loc, f"values out of range for {datatype}")
    return np.array(numbers.tolist(), dtype=dtype).reshape(values.shape)


def _from_binary(tensor: RequestInput, data: memoryview, loc: str) -> np.ndarray:
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        # Each element is a Python string: no more are made than the shape declares
        # (checked against the model's budget before this), however many the bytes hold.
        values: list[str] = []
        position = 0
        while position < len(data):
            if len(values) == count:
                raise invalid(
                    f"{loc}.parameters.binary_data_size",
                    f"shape {tensor.shape} needs {count} BYTES elements, the binary data holds more",
                )
            length = int.from_bytes(data[position : position + 4], "little")
            position += 4
            if position + length > len(data):
                raise invalid(f"{loc}.parameters", "BYTES element runs past its binary data")
            try:
                values.append(bytes(data[position : position + length]).decode())
            except UnicodeDecodeError:
                raise invalid(
                    f"{loc}.parameters", "BYTES elements must be UTF-8 for ONNX strings"
                ) from None
            position += length
        array = np.array(values, dtype=np.object_)
    else:
        dtype = NUMPY_DTYPES[tensor.datatype]
        if len(data) != count * dtype.itemsize:
            raise invalid(
                f"{loc}.parameters.binary_data_size",
                f"shape {tensor.shape} of {tensor.datatype} needs {count * dtype.itemsize} bytes, got {len(data)}",
            )
        if dtype == np.bool_:
            # A byte each, any non-zero byte true (as C and Triton read it): numpy
            # would keep the byte as it is, and a 2 is neither True nor False to a model.
            array = np.frombuffer(data, dtype=np.uint8) != 0
        else:
            array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
            if array.ctypes.data % ALIGNMENT:
                # Where the header ends decides where the values begin, and
                # onnxruntime sums an unaligned buffer in another order: the same
                # row answered an ulp apart as binary and as JSON (a review).
                array = array.copy()
    if array.size != count:
        raise invalid(f"{loc}.data", f"shape {tensor.shape} needs {count} values, got {array.size}")
    return _shaped(array, tensor.shape, loc)


def input_arrays(
    payload: InferenceRequest, binary: memoryview, loaded: ModelVersion
) -> dict[str, np.ndarray]:
    """Every input as an array, checked against the model's metadata."""
    specs = {spec.name: spec for spec in loaded.inputs}
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(payload.inputs):
        loc = f"inputs[{index}]"
        spec = specs.get(tensor.name)
        if spec is None:
            raise invalid(
                f"{loc}.name",
                f"unexpected input {tensor.name!r}; {loaded.model} takes {sorted(specs)}",
            )
        if tensor.name in feed:
            raise invalid(f"{loc}.name", f"input {tensor.name!r} appears twice")
        if tensor.datatype != spec.datatype:
            raise invalid(
                f"{loc}.datatype",
                f"input {tensor.name!r} is {spec.datatype}, got {tensor.datatype}",
            )
        if not _shape_fits(tensor.shape, spec.shape):
            raise invalid(
                f"{loc}.shape",
                f"input {tensor.name!r} has shape {list(spec.shape)}, got {tensor.shape}",
            )
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise BadRequest("the shared-memory extension is not supported")
        size = tensor.parameters.get("binary_data_size")
        if size is not None and tensor.datatype == "BYTES":
            budget = input_value_budget(spec)
            if math.prod(tensor.shape) > budget:
                # Counted before decoding: a 16 MB tensor of empty strings would be
                # 4M Python objects, decoded one by one on the event loop.
                raise invalid(
                    f"{loc}.shape",
                    f"model {loaded.model} version {loaded.version} takes at most {budget} "
                    f"values in input {tensor.name!r}, got shape {tensor.shape}",
                )
        if size is not None:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or tensor.data is not None
            ):
                raise invalid(
                    f"{loc}.parameters.binary_data_size", "a byte count, and no data alongside"
                )
            if offset + size > len(binary):
                raise BadRequest("the binary data is shorter than the inputs' binary_data_size")
            feed[tensor.name] = _from_binary(tensor, binary[offset : offset + size], loc)
            offset += size
        elif tensor.data is not None:
            feed[tensor.name] = _from_json(tensor, tensor.data, loc)
        else:
            raise invalid(
                f"{loc}.data", f"input {tensor.name!r} has neither data nor binary_data_size"
            )
    if offset != len(binary):
        raise BadRequest("the binary data is longer than the inputs' binary_data_size")
    if missing := sorted(specs.keys() - feed.keys()):
        raise invalid("inputs", f"missing inputs {missing}")
    if not loaded.worker.shares_batches:
        # Its requests run alone (its ``max_batch_size`` is 0): the shapes pass as
        # given, as Triton passes them to a model without batching.
        return feed
    if len({array.shape[0] if array.ndim else None for array in feed.values()}) != 1:
        raise invalid("inputs", "every input needs the same batch size")
    if any(array.ndim == 0 for array in feed.values()):
        raise invalid("inputs", "inputs without a batch dimension are not supported")
    return feed


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in array.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype].newbyteorder("<")).tobytes()


def to_json(array: np.ndarray, datatype: str) -> list[Any]:
    if datatype == "BYTES":
        return [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    flat = array.reshape(-1)
    values: list[Any] = flat.tolist()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        for index in np.flatnonzero(~np.isfinite(flat)).tolist():
            values[index] = NonFinite(values[index])
    return values


class Wanted(NamedTuple):
    """An output the request asked for: binary or JSON, and, with the classification
    extension, how many of each row's classes."""

    spec: TensorSpec
    binary: bool
    class_count: int | None = None


def requested_outputs(payload: InferenceRequest, loaded: ModelVersion) -> list[Wanted]:
    specs = {spec.name: spec for spec in loaded.outputs}
    default_binary = payload.parameters.get("binary_data_output") is True
    wanted = payload.outputs or [RequestOutput(name=spec.name) for spec in loaded.outputs]
    chosen: list[Wanted] = []
    named: set[str] = set()
    for index, output in enumerate(wanted):
        spec = specs.get(output.name)
        if spec is None:
            raise invalid(
                f"outputs[{index}].name",
                f"unexpected output {output.name!r}; {loaded.model} has {sorted(specs)}",
            )
        if output.name in named:
            # Each repeat would be the whole tensor again: 4,096 of one output made a
            # 766 KB request's answer 164 MB (a review).
            raise invalid(f"outputs[{index}].name", f"output {output.name!r} is asked for twice")
        named.add(output.name)
        if any(key.startswith("shared_memory") for key in output.parameters):
            raise BadRequest("the shared-memory extension is not supported")
        count = output.parameters.get("classification")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise invalid(f"outputs[{index}].parameters.classification", "a count of classes, 1 or more")
        if count is not None and spec.datatype in ("BYTES", "BOOL"):
            raise invalid(
                f"outputs[{index}].parameters.classification",
                f"output {spec.name!r} is {spec.datatype}: only numbers are classified",
            )
        chosen.append(Wanted(spec, output.parameters.get("binary_data", default_binary) is True, count))
    return chosen


def classified(array: np.ndarray, count: int, labels: Sequence[str], batched: bool) -> np.ndarray:
    """Triton's classification extension: each row's ``count`` largest values (the
    whole tensor's, for a model without batching), largest first, as
    ``"value:index[:label]"`` strings, the value as C++'s ``std::to_string`` writes it
    (six decimals for a float): shape ``[rows, count]``, or ``[count]``."""
    if batched and array.ndim:
        rows = array.reshape(array.shape[0], math.prod(array.shape[1:]))  # -1 fails for 0 rows
    else:
        rows = array.reshape(1, array.size)
    kept = min(count, rows.shape[1])
    floats = rows.dtype.kind == "f"
    # Largest first, ties by the lower index (as Triton's sort gives them), NaN last:
    # a stable ascending sort of the columns reversed, read backwards.
    keys = np.where(np.isnan(rows), -np.inf, rows) if floats else rows
    backwards = np.argsort(keys[:, ::-1], axis=1, kind="stable")[:, ::-1]
    order = (rows.shape[1] - 1 - backwards)[:, :kept]
    out = np.empty(order.shape, dtype=object)
    for row, indexes in enumerate(order.tolist()):
        values = rows[row, indexes].tolist()
        for column, (index, value) in enumerate(zip(indexes, values, strict=True)):
            text = f"{value:f}:{index}" if floats else f"{value}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            out[row, column] = text.encode()
    return out if batched and array.ndim else out.reshape(kept)


def _shaped(array: np.ndarray, shape: Sequence[int], loc: str) -> np.ndarray:
    """``array`` in ``shape``, of as many values: 422 for a shape numpy cannot hold
    (an empty tensor of a dimension past 2**62, ``[0, 2**61]``), a 500 and an error
    line's traceback on every such request (a review)."""
    try:
        return array.reshape(shape)
    except ValueError as exc:
        raise invalid(f"{loc}.shape", f"shape {list(shape)} cannot be held: {exc}") from None
