"""Model configuration and metadata: config.json, tensor specs, opening a session.

``config.json`` (optional, next to the version directories)::

    {"max_batch_size": 64, "max_queue_delay_ms": 2.0, "kind": "classifier",
     "labels": ["no", "yes"], "version_policy": {"latest": 1}}

Input and output specs come from the ONNX graph as Open Inference Protocol datatypes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from mlgate.config import Settings
from mlgate.workers.regular_file import read_regular

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
PLATFORM = "onnxruntime_onnx"

# onnxruntime's element types -> Open Inference Protocol datatypes -> numpy dtypes.
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# Model directory names mlgate serves (``model_name_allowed``): any, as Triton serves
# any (a review: "my model" and "a+b" were ignored without a word), but no hidden
# directory, nothing that leaves the root (no separator; "." and ".." begin with a dot)
# and no control character, which would reach log lines and metric labels.
MODEL_NAME = re.compile(r"(?![.\s])[^/\\\x00-\x1f\x7f]{1,128}")


NAME_RULE = "at most 128 characters, no '/', '\\' or control character, not beginning with '.' or a space"


def model_name_allowed(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None

# LOADING: a version not serving yet whose load is under way (Triton says the same).
State = Literal["READY", "UNAVAILABLE", "LOADING"]
Kind = Literal["classifier", "regressor"]


class ModelConfigError(ValueError):
    """``config.json`` is unreadable or holds a value mlgate cannot use."""


class ModelConfigUnreadable(ModelConfigError):
    """``config.json`` could not be read (permissions, too many open files, I/O): an
    error of the moment, which a read later may not meet."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension


@dataclass(frozen=True, slots=True)
class ModelConfig:
    max_batch_size: int
    max_queue_delay_ms: float
    kind: Kind | None
    labels: tuple[str, ...] | None
    policy: Literal["latest", "all", "specific"]
    policy_value: tuple[int, ...]

    def select(self, versions: list[int]) -> list[int]:
        """The versions on disk this policy wants loaded."""
        ordered = sorted(versions)
        if self.policy == "all":
            return ordered
        if self.policy == "specific":
            return [v for v in ordered if v in self.policy_value]
        return ordered[-self.policy_value[0] :]


# Bounds of config.json's values: a batch onnxruntime can be asked for, and a wait
# shorter than any request's deadline could usefully be.
MAX_BATCH_SIZE = 65_536
MAX_QUEUE_DELAY_MS = 10_000


# Labels for a million classes take ~20 MB; more is no configuration.
MAX_CONFIG_BYTES = 32 * 1024 * 1024


def read_config(model_dir: Path, settings: Settings) -> ModelConfig:
    """``model_dir``'s config.json (its defaults without one); ``ModelConfigError`` for
    one that is not a regular file of at most ``MAX_CONFIG_BYTES`` of valid settings."""
    path = model_dir / CONFIG_FILE
    raw: object = {}
    if path.exists() or path.is_symlink():  # a link to nowhere, or to itself, is an error
        try:
            text = read_regular(path, MAX_CONFIG_BYTES, CONFIG_FILE).decode()
            raw = json.loads(text, parse_constant=_not_a_number)
        except OSError as exc:
            raise ModelConfigUnreadable(f"{CONFIG_FILE}: {exc}") from None
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise ModelConfigError(f"{CONFIG_FILE}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{CONFIG_FILE}: expected an object")
    known = {"max_batch_size", "max_queue_delay_ms", "kind", "labels", "version_policy"}
    if unknown := sorted(set(raw) - known):
        raise ModelConfigError(f"{CONFIG_FILE}: unknown fields {unknown}")
    batch = raw.get("max_batch_size", settings.inference_max_batch_size)
    delay = raw.get("max_queue_delay_ms", settings.inference_max_queue_delay_ms)
    kind = raw.get("kind")
    labels = raw.get("labels")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_BATCH_SIZE:
        raise ModelConfigError(
            f"{CONFIG_FILE}: max_batch_size must be an integer from 1 to {MAX_BATCH_SIZE}"
        )
    if (
        not isinstance(delay, int | float)
        or isinstance(delay, bool)
        or not 0 <= delay <= MAX_QUEUE_DELAY_MS
    ):
        raise ModelConfigError(
            f"{CONFIG_FILE}: max_queue_delay_ms must be a number from 0 to {MAX_QUEUE_DELAY_MS}"
        )
    if kind not in (None, "classifier", "regressor"):
        raise ModelConfigError(f"{CONFIG_FILE}: kind must be classifier or regressor")
    if labels is not None and not (
        isinstance(labels, list) and all(isinstance(label, str) for label in labels)
    ):
        raise ModelConfigError(f"{CONFIG_FILE}: labels must be a list of strings")
    policy, value = version_policy(raw.get("version_policy", {"latest": 1}))
    return ModelConfig(batch, float(delay), kind, tuple(labels) if labels else None, policy, value)


def _not_a_number(constant: str) -> None:
    """``json.loads`` takes ``NaN`` and ``Infinity``: not numbers a setting can be (a NaN
    delay crashed the model's worker on every batch)."""
    raise ValueError(f"{constant} is not a number JSON allows")


def _version_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def version_policy(raw: object) -> tuple[Literal["latest", "all", "specific"], tuple[int, ...]]:
    if raw == "all":
        return "all", ()
    if isinstance(raw, dict) and len(raw) == 1:
        n = raw.get("latest")
        if isinstance(n, int) and _version_number(n):
            return "latest", (n,)
        versions = raw.get("specific")
        if (
            isinstance(versions, list)
            and versions
            and all(_version_number(v) for v in versions)
            and len(set(versions)) == len(versions)
        ):
            return "specific", tuple(versions)
    raise ModelConfigError(
        f'{CONFIG_FILE}: version_policy must be {{"latest": N}}, "all" or {{"specific": [..]}}'
    )


def tensor_spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_DATATYPES.get(arg.type)
    if datatype is None:
        raise ValueError(f"{arg.name}: element type {arg.type} is not supported")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, datatype, shape)


def zeros(spec: TensorSpec, rows: int = 1, other: int = 1) -> np.ndarray:
    """A tensor of ``spec`` filled with zeros (strings "0"): ``rows`` along a free
    first dimension, ``other`` along any other free one."""
    return _filled(spec, _shape(spec, rows, other), None)


def varied(spec: TensorSpec, rows: int, other: int, seed: int) -> np.ndarray:
    """As ``zeros``, with values that differ (floats of a normal spread, integers and
    booleans of 0 and 1), for ``_rows_kept_for_varied_values``."""
    return _filled(spec, _shape(spec, rows, other), np.random.default_rng(seed))


def _shape(spec: TensorSpec, rows: int, other: int) -> tuple[int, ...]:
    return tuple((rows if i == 0 else other) if d < 0 else d for i, d in enumerate(spec.shape))


def _filled(spec: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator | None) -> np.ndarray:
    if spec.datatype == "BYTES":
        # "0", not "": a model that reads its strings as numbers (a Cast) takes it.
        return np.full(shape, "0", dtype=np.object_)
    dtype = NUMPY_DTYPES[spec.datatype]
    if rng is None:
        return np.zeros(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, shape).astype(dtype)


def _free_first_dimensions(session: ort.InferenceSession) -> bool:
    """Every input and output starts with a free dimension (named or not: tf2onnx
    names each one apart, ``unk__6`` and ``unk__7``, for the same rows)."""
    for arg in (*session.get_inputs(), *session.get_outputs()):
        first = arg.shape[0] if arg.shape else 0
        if isinstance(first, int) and first >= 0:  # fixed, or a scalar
            return False
    return True


def _rows_kept(answered: Sequence[np.ndarray], rows: int) -> bool:
    return all(np.ndim(value) and np.shape(value)[0] == rows for value in answered)


def _same_rows(together: Sequence[np.ndarray], alone: Sequence[np.ndarray], row: int) -> bool:
    """Row ``row`` of a run's outputs is, within a tenth, what the row alone answers:
    a tenth of the largest value at each place of the row across the run. Rows mixed
    by the model (each less the run's mean) differ by their own size; a dynamically
    quantized model, whose scale comes from the whole run, differs by a few hundredths
    and is batched as Triton batches it (a review: 4% at most). Per place, so that a
    large output beside a mixed one hides nothing (a review)."""
    for batched, single in zip(together, alone, strict=True):
        whole, theirs = np.asarray(batched), np.asarray(single)
        mine = whole[row : row + 1]
        if mine.shape != theirs.shape:
            return False
        if mine.dtype.kind in "fc":
            scale = np.where(np.isfinite(whole), np.abs(whole), 0.0).max(axis=0)
            with np.errstate(invalid="ignore", over="ignore"):
                close = np.abs(mine - theirs) <= 1e-5 + 0.1 * scale
            same = (mine == theirs) | (np.isnan(mine) & np.isnan(theirs))
            if not (close | same).all():
                return False
        elif not np.array_equal(mine, theirs):
            return False
    return True


def _rows_kept_for_varied_values(
    session: ort.InferenceSession,
    inputs: tuple[TensorSpec, ...],
    other: int,
    run_options: ort.RunOptions | None,
) -> bool:
    """Runs of 5 and 7 rows of varied values answer as many rows, and the first and
    last row of the 5 as each alone answers. Zeros alone say too little: a model
    keeping the values above a bound answered one per row of zeros, and a shared run
    whose count happened to match handed callers each other's values; a model
    taking each row less the batch's mean answered as many rows, each of them made of
    the others' (reviews). A run these values fail decides nothing (zeros then do)."""
    for rows, seed in ((5, 5), (7, 7)):
        feed = {s.name: varied(s, rows, other, seed) for s in inputs}
        answered = _run_or_none(session, feed, run_options)
        if answered is None:
            continue
        if not _rows_kept(answered, rows):
            return False
        if rows == 5:
            for row in (0, rows - 1):
                alone = {name: value[row : row + 1] for name, value in feed.items()}
                single = _run_or_none(session, alone, run_options)
                if single is not None and not _same_rows(answered, single, row):
                    return False
    return True


def _run_or_none(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], run_options: ort.RunOptions | None
) -> Sequence[np.ndarray] | None:
    """The run's outputs, or None if the model refuses these values (a probe's run
    decides nothing then); ended by ``run_options.terminate``, it raises."""
    try:
        answered: Sequence[np.ndarray] = session.run(None, feed, run_options)
    except Exception:
        if run_options is not None and run_options.terminate:
            raise
        return None
    return answered


# The load's runs, in turn until one succeeds: (rows, size of every other free
# dimension). Small first; then sizes a kernel or a window needs (a 3x3 convolution
# takes no 2x2 image), up to an image's usual 224.
PROBE_SHAPES = ((2, 2), (2, 1), (1, 2), (1, 1), (2, 8), (1, 32), (1, 224))
# The first SMALL_PROBES always run (a model's fixed dimensions make them as large as
# its rows are); a larger one of more values than this is not tried (a 4-D input at
# 224 is 2.5e9 values).
SMALL_PROBES = 4
MAX_PROBE_VALUES = 1 << 22


def quiet_run_options() -> ort.RunOptions:
    """Options for runs whose failures mlgate reports itself (a probe's values refused,
    a request's input refused: ``inference_input_refused``): onnxruntime writes none of
    its own error lines, which a client sending bad inputs could fill the log with."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def open_session(
    path: Path, threads: int, run_options: ort.RunOptions | None = None
) -> tuple[ort.InferenceSession, tuple[TensorSpec, ...], tuple[TensorSpec, ...], bool, dict[str, np.ndarray]]:
    """Create the session, read its metadata and warm it up with one run (ended early,
    failing, once ``run_options.terminate`` is set). Blocking.

    The last item: whether requests may share a run (``shares_batches``): every input
    and output has a free first dimension, a run of 2 rows of zeros answers 2 rows in
    every output, and so do runs of 5 and 7 rows of varied values, two of whose rows
    each answer alone as in the run (``_same_rows``). A free first dimension alone says too little: a
    flattening model's ``[n]`` or a detection model's ``[k, 2]`` has one too, and rows
    of merged requests could not be told apart in it (a review: each of 8 concurrent
    callers got all 8 callers' outputs). Other free dimensions are 2 in these runs (a
    flattening model then shows itself however many values a row has, a 2x2 kernel
    fits), else 1 (what a bias of 3 beside a free dimension takes), else larger
    (``PROBE_SHAPES``); a model that takes no 2 rows (its batch fixed in its graph)
    runs each request alone. The first run that succeeds is the warm-up; if none does,
    the last one's error is the load's. The last item: the warm-up's feed, which the
    model is known to compute (``InferenceWorker``'s ``known_good``)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = tuple(tensor_spec(arg) for arg in session.get_inputs())
    outputs = tuple(tensor_spec(arg) for arg in session.get_outputs())
    free_first = _free_first_dimensions(session)
    if run_options is None:
        run_options = quiet_run_options()
    # A probe's values refused is expected, and decided here: not onnxruntime's error
    # lines in the log at every load. A failed load raises with the model's message.
    run_options.log_severity_level = 4
    failure: Exception | None = None
    for tried, (rows, other) in enumerate(PROBE_SHAPES):
        values = sum(math.prod(_shape(spec, rows, other)) for spec in inputs)
        if tried >= SMALL_PROBES and values > MAX_PROBE_VALUES:
            continue  # a 4-D input at 224 would be 2.5e9 values (a review: 10 GB)
        try:
            feed = {spec.name: zeros(spec, rows, other) for spec in inputs}
            answered = session.run(None, feed, run_options)
        except Exception as exc:
            if run_options is not None and run_options.terminate:
                raise
            failure = exc
            continue
        kept = (
            free_first
            and rows == 2
            and _rows_kept(answered, 2)
            and _rows_kept_for_varied_values(session, inputs, other, run_options)
        )
        return session, inputs, outputs, kept, feed
    assert failure is not None
    raise failure


def file_fingerprint(*paths: Path) -> tuple[int, ...]:
    stamp: list[int] = []
    for path in paths:
        try:
            info = path.stat()
            stamp += [info.st_mtime_ns, info.st_size, info.st_ino]
        except OSError:  # gone, or a link to nowhere: read as absent (its reading fails)
            stamp += [0, 0, 0]
    return tuple(stamp)


def versions_on_disk(model_dir: Path) -> dict[int, Path]:
    """The version directories of ``model_dir``: named by a positive number in ASCII
    digits (``str.isdigit`` alone takes ``²``, which ``int`` refuses; ``0001`` is
    version 1). Two names of one number (``10`` and ``010``): the one written as the
    number is, else the first in name order, whatever order the directory lists them
    in. An entry that cannot be looked at (a symbolic link to itself) is passed over,
    never the whole model's error."""
    named: dict[int, list[str]] = {}
    with os.scandir(model_dir) as entries:
        for entry in entries:
            name = entry.name
            if not (name.isascii() and name.isdigit()) or int(name) == 0:
                continue
            try:
                model_file = Path(entry.path) / MODEL_FILE
                # A link to nowhere is a version whose file is broken (its load fails,
                # logged and counted, the previous load serving on), not one removed (a
                # review: a blob-store mount gone retired a serving version silently).
                if not entry.is_dir() or not (model_file.is_file() or model_file.is_symlink()):
                    continue
            except OSError:
                continue
            named.setdefault(int(name), []).append(name)
    found: dict[int, Path] = {}
    for number, names in named.items():
        name = str(number) if str(number) in names else min(names)
        found[number] = model_dir / name / MODEL_FILE
    return found


def row_of_scores(spec: TensorSpec) -> bool:
    """Whether ``spec`` may hold a row of values a row: ``[N, C]``, or ``[N, 1, C]``,
    which the REST answers read as ``[N, C]`` (a middle dimension the model leaves
    free is checked when it answers: a review saw ``[N, T, C]`` answer ``[N, 1, C]``)."""
    shape = spec.shape
    return len(shape) == 2 or len(shape) == 3 and shape[1] in (1, -1)


def _class_scores(spec: TensorSpec) -> bool:
    """A float matrix of two or more known columns a row: ``[N, C]`` or ``[N, 1, C]``."""
    shape = spec.shape
    one_row = len(shape) == 2 or len(shape) == 3 and shape[1] == 1
    return spec.datatype.startswith("FP") and one_row and shape[-1] >= 2


def guess_kind(outputs: tuple[TensorSpec, ...]) -> Kind:
    """A model without a ``kind`` in its ``config.json``: a classifier when its first
    output is a matrix of class scores, or a 1-D label (integers or strings) followed by
    one, as sklearn-onnx exports a classifier (a review: both answered their first
    score, or the label, as a regression value); else a regressor."""
    if not outputs:
        return "regressor"
    first = outputs[0]
    if _class_scores(first):
        return "classifier"
    labelled = len(first.shape) == 1 and (first.datatype.startswith(("INT", "UINT")) or first.datatype == "BYTES")
    if labelled and any(map(_class_scores, outputs[1:])):
        return "classifier"
    return "regressor"
