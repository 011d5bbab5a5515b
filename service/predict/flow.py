"""The predict flow shared by the REST routes (v2, v1) and the OIP routes.

Decode, resolve the model version (404), check the rows against the model's input
metadata (422), queue them on that version's batching worker with the request's
deadline (``X-Request-Timeout`` in ms, else ``request_timeout_ms``) and shape the
answer from its outputs. A full mailbox is 503 at once (while the default model's
mailbox is full, before the rows are even decoded) and a deadline that passes in the
queue is 504; both surface as ``workers.errors`` that the front door maps.

The rows are counted before they are decoded: a 16 MB body of small numbers would be
~8M Python floats (~350 MB and a second of loop CPU) before its 422. ``check_row_budget``
reads the body with its rows left raw (nothing allocated), resolves the model it names
and refuses more values than that model can take (``MAX_INSTANCES`` rows of its input
width): counted from commas in JSON (exact for arrays of numbers) and from the array
headers in msgpack.
"""

from __future__ import annotations

import asyncio
import math
import re
import struct
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TypeVar

import msgspec
import numpy as np
import simdjson
from aiohttp import web
from multidict import MultiMapping

from mlgate.config import Settings
from mlgate.schemas.oip import MAX_PARAMETERS
from mlgate.schemas.predict import (
    MAX_FEATURES,
    MAX_INSTANCES,
    BatchPredictResponse,
    Prediction,
    PredictRequest,
    PredictResponse,
    PredictTarget,
    PredictV1Request,
)
from mlgate.schemas.problem import FieldError
from mlgate.service.http.body import read_body
from mlgate.service.http.codec import (
    SIMDJSON_REFUSALS,
    Format,
    decode,
    json_outline,
    outline_refusal,
    raise_parser_misuse,
    request_format,
    structure_counts,
    top_level_length,
)
from mlgate.service.http.context import REQUEST_ID, TENANT
from mlgate.service.http.errors import (
    ApiError,
    BadRequest,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from mlgate.service.http.msgpack_count import count_objects
from mlgate.service.state import DRIFT_MONITOR, MODEL_REPOSITORY, SETTINGS
from mlgate.workers.inference.model_config import NUMPY_DTYPES, TensorSpec, row_of_scores
from mlgate.workers.inference.repository import (
    ModelNotFound,
    ModelRepository,
    ModelUnavailable,
    ModelVersion,
)

PayloadT = TypeVar("PayloadT", PredictRequest, PredictV1Request)
TIMEOUT_HEADER = "X-Request-Timeout"
# Below a millisecond no answer could arrive in time; such a header is a client bug.
MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 1, 600_000
# The header as the OpenAPI document describes it, on every route that reads it.
TIMEOUT_PARAMETER = {
    "name": TIMEOUT_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]{1,12}(\\.[0-9]{1,12})?$"},
    "description": (
        f"Deadline in milliseconds, from {MIN_TIMEOUT_MS:g} to {MAX_TIMEOUT_MS:g}: digits with an "
        "optional decimal part (no exponent, sign or separators); past it while queued or "
        "computing the answer is 504"
    ),
}
_FLOAT_INPUTS = ("FP16", "FP32", "FP64")
# A body holds at most one value per byte, and a decoded value costs ~40 bytes: below
# this size the decoding is bounded anyway (a few MB), and the row count is not
# worth a pass of its own on every request.
ROW_BUDGET_FROM_BYTES = 64 * 1024
# A decoded JSON or msgpack number in a list: a float object and the list's pointer.
PYTHON_FLOAT_BYTES = 32
# Up to this many classes a single row's best class is found in Python (``predictions``).
_PYTHON_ARGMAX_CLASSES = 64
# Values allowed before decoding for a model whose width is not fixed (or that takes no
# feature rows at all, which is a 422 later anyway): about 32 MB as Python floats.
UNSIZED_VALUE_BUDGET = 1 << 20
# Numbers an OIP request holds besides its tensors' data (shapes, parameters).
TENSOR_SLACK_VALUES = 1024
# Strings an OIP request may hold in one BYTES input: ~40 ms of decoding at most (a
# review: 1M empty strings in a 4 MB body held the loop for 0.67 s).
BYTES_VALUE_BUDGET = 65_536


class _RowsUndecoded(msgspec.Struct, frozen=True, kw_only=True):
    """A predict body with its rows and names left as raw bytes: decoding it allocates
    no row, and a name that is not a string (a msgpack array of 16M empty arrays, say)
    is not decoded either. Their types are checked by the full decoding that follows."""

    features: msgspec.Raw = msgspec.Raw()  # empty: absent (a JSON null is b"null")
    instances: msgspec.Raw = msgspec.Raw()
    model: msgspec.Raw = msgspec.Raw()
    model_version: msgspec.Raw = msgspec.Raw()


def _name(raw: msgspec.Raw, fmt: Format, absent: str | None) -> str | None | bool:
    """A name left raw by ``_RowsUndecoded``: the string (or None for a null),
    ``absent`` when the body has none, False when it is anything else (the full
    decoding's 422), read without decoding anything but a string."""
    if not raw:
        return absent
    module = msgspec.json if fmt is Format.JSON else msgspec.msgpack
    try:
        name: str | None = module.decode(raw, type=str | None)
    except msgspec.DecodeError:  # ValidationError is a DecodeError
        return False
    return name


def request_deadline(request: web.Request, started: float, default_ms: float) -> float:
    """The monotonic time by which the answer is due: ``X-Request-Timeout`` ms or default."""
    return deadline_in(request.headers, started, default_ms)


def deadline_in(headers: Mapping[str, str], started: float, default_ms: float) -> float:
    """``request_deadline`` from the request's headers."""
    timeout_ms = timeout_ms_in(headers, default_ms)
    if timeout_ms is None:
        raise BadRequest(
            f"{TIMEOUT_HEADER} must be a number of milliseconds in [{MIN_TIMEOUT_MS}, {MAX_TIMEOUT_MS}]"
        )
    return started + timeout_ms / 1000


_DECIMAL = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,12})?")


def timeout_ms_in(headers: Mapping[str, str], default_ms: float) -> float | None:
    """The request's ``X-Request-Timeout`` in ms, ``default_ms`` without one; None when
    it is not a number of milliseconds in range."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default_ms
    if isinstance(headers, MultiMapping) and len(headers.getall(TIMEOUT_HEADER)) > 1:
        return None  # two deadlines: which one was meant? (as ``5000, 0`` in one field)
    if _DECIMAL.fullmatch(raw) is None:  # ``float`` takes ``1_000``, ``١٢٣`` and ``nan``
        return None
    timeout_ms = float(raw)
    return timeout_ms if MIN_TIMEOUT_MS <= timeout_ms <= MAX_TIMEOUT_MS else None


def sharing_tenant(settings: Settings, tenant: str | None) -> str | None:
    """Whose share of a model's queue a request takes (``InferenceWorker.submit``):
    its tenant's, or nobody's without keys (every request is ``anonymous`` then, and
    no other tenant needs room kept)."""
    return None if settings.auth_disabled else tenant


def resolve(repository: ModelRepository, model: str, version: str | None) -> ModelVersion:
    """The serving version; 404 for a model or version the repository does not have,
    503 with Retry-After for one it has that failed to load in this process (another
    process, or this one once the file is fixed, may serve it: a client retries)."""
    try:
        return repository.resolve(model, version)
    except ModelUnavailable as exc:
        raise Unavailable(str(exc), retry_after_s=repository.settings.retry_after_s) from None
    except ModelNotFound as exc:
        raise NotFound(str(exc)) from None


def json_feature_row(parser: simdjson.Parser, body: bytes) -> np.ndarray | None:
    """The one row of a JSON body that is exactly ``{"features": [numbers]}``, as a
    float64 row parsed straight into an array by simdjson (``as_buffer``): 14 µs for
    768 numbers where msgspec's Python floats and ``np.fromiter`` take 35. None for
    anything else, decoded then as ever (the same numbers either way: both round each
    to the nearest float64; ``feature_rows`` casts them).

    What simdjson would take where msgspec does not is left out first: a nested array
    (``as_buffer`` flattens it; one ``[`` in the body allows none), a byte-order mark
    (the body must start with ``{``), other members, duplicate keys, an empty or
    oversized row. The parser's objects die here, so it can parse again."""
    first = body.find(b"[")  # memchr: bytes.count would take 4 µs over 15 KB
    if body[:1] != b"{" or first < 0 or body.find(b"[", first + 1) >= 0:
        return None
    document = features = None
    try:
        document = parser.parse(body)
        if not isinstance(document, simdjson.Object) or len(document) != 1:
            return None
        features = document.get("features")
        if not isinstance(features, simdjson.Array) or not 0 < len(features) <= MAX_FEATURES:
            return None
        return np.frombuffer(features.as_buffer(of_type="d"), dtype=np.float64).reshape(1, -1)
    except SIMDJSON_REFUSALS as exc:
        raise_parser_misuse(exc)
        return None
    finally:
        del document, features


def feature_rows(
    loaded: ModelVersion, values: list[list[float]] | np.ndarray, loc: str
) -> np.ndarray:
    """The rows as the model's input dtype; 422 when they do not fit its metadata.
    ``values``: lists of numbers, or a float64 matrix (``json_feature_row``)."""
    if (
        len(loaded.inputs) != 1
        or loaded.inputs[0].datatype not in _FLOAT_INPUTS
        or len(loaded.inputs[0].shape) != 2
        or not loaded.outputs
        or not loaded.outputs[0].shape  # a scalar: no row of answers to read
    ):
        raise ValidationFailed(
            f"model {loaded.model} does not take one row of float features; use /v2/models/{loaded.model}/infer",
            errors=[FieldError(loc="model", msg="not a feature-row model")],
        )
    spec = loaded.inputs[0]
    dtype = NUMPY_DTYPES[spec.datatype]
    try:
        # A value beyond the dtype's range becomes inf (caught below), not a warning.
        with np.errstate(over="ignore"):
            if isinstance(values, np.ndarray):
                rows = values.astype(dtype)
            elif len(values) == 1:  # the common single row: fromiter is twice asarray's speed
                rows = np.fromiter(values[0], dtype=dtype, count=len(values[0])).reshape(1, -1)
            else:
                rows = np.asarray(values, dtype=dtype)
    except ValueError:
        raise ValidationFailed(
            "every instance needs the same number of features", errors=[_ragged(values, loc)]
        ) from None
    fixed_rows = spec.shape[0]
    if fixed_rows >= 0 and rows.shape[0] != fixed_rows:
        # A model exported with its batch fixed takes that many rows at once: anything
        # else would fail in onnxruntime, and count against the model's breaker.
        raise ValidationFailed(
            f"model {loaded.model} version {loaded.version} takes {fixed_rows} rows at once, got {rows.shape[0]}",
            errors=[FieldError(loc=loc, msg=f"expected {fixed_rows} rows, got {rows.shape[0]}")],
        )
    expected = spec.shape[1]
    if expected >= 0 and rows.shape[1] != expected:
        raise ValidationFailed(
            f"model {loaded.model} version {loaded.version} takes {expected} features, got {rows.shape[1]}",
            errors=[FieldError(loc=loc, msg=f"expected {expected} features, got {rows.shape[1]}")],
        )
    if not np.isfinite(rows).all():
        row, column = (int(i) for i in np.argwhere(~np.isfinite(rows))[0])
        where = f"{loc}[{column}]" if loc == "features" else f"{loc}[{row}][{column}]"
        raise ValidationFailed(
            "features must be finite numbers within the model's input type",
            errors=[FieldError(loc=where, msg="NaN, infinite or out-of-range value")],
        )
    return rows


def _ragged(values: Sequence[Sequence[float]] | np.ndarray, loc: str) -> FieldError:
    """Where rows of different lengths first differ from the first row."""
    first = len(values[0])
    for index, row in enumerate(values):
        if len(row) != first:
            return FieldError(loc=f"{loc}[{index}]", msg=f"{len(row)} features where {loc}[0] has {first}")
    return FieldError(loc=loc, msg="rows of different lengths")


def answer_output(loaded: ModelVersion) -> str:
    """The output the REST routes answer from: a regressor's first; a classifier's
    first that is a float matrix of class scores, ``[N, C]`` or ``[N, 1, C]``
    (sklearn-onnx puts a 1-D ``label`` before its ``probabilities``), else its first
    matrix of any type, else its first. Reviews: an ``[N, 1, C]`` or ``[N, T, C]``
    output was passed over for a later ``[N, 5]`` embedding, and an integer matrix
    answered in place of the probabilities after it."""
    outputs = loaded.outputs
    if loaded.kind == "classifier":
        rows = [spec for spec in outputs if row_of_scores(spec)]
        for spec in rows:
            if spec.datatype.startswith("FP"):
                return spec.name
        if rows:
            return rows[0].name
    return outputs[0].name


def predictions(loaded: ModelVersion, scores: np.ndarray, rows: int) -> list[Prediction]:
    """One answer for each of the ``rows`` rows: 422 when the model answers another
    number of rows (its output is not one row per input row), or a value JSON cannot
    carry (an output that overflowed to infinity, or NaN). A classifier's row of scores
    in [0, 1] holds probabilities; a row with one outside holds logits, and its
    confidence is softmax's probability of the arg-max class."""
    if not scores.ndim or len(scores) != rows:
        raise _not_row_answers(loaded, f"answers {len(scores) if scores.ndim else 'a scalar'} rows for {rows}")
    if scores.ndim > 2:
        # [N, 1, C] is a row of scores a row; [N, 2, C] is not one answer a row.
        if math.prod(scores.shape[1:-1]) != 1:
            raise _not_row_answers(loaded, f"answers outputs of shape {list(scores.shape)}")
        scores = scores.reshape(len(scores), scores.shape[-1])
    if scores.ndim == 2 and not scores.shape[1]:
        raise _not_row_answers(loaded, f"answers no value a row (shape {list(scores.shape)})")
    if loaded.kind == "regressor" or scores.ndim == 1:
        # A classifier with only a 1-D output answers its labels: no confidence.
        values = scores.reshape(len(scores), -1)[:, 0]
        if values.dtype.kind not in "iufb":
            raise _not_row_answers(loaded, f"answers {scores.dtype} values, not numbers")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise _not_row_answers(loaded, "answered a value that is not a finite number")
        if loaded.kind == "regressor":
            return [Prediction(prediction=float(v), confidence=None) for v in values]
        return [Prediction(prediction=v, confidence=None) for v in values.tolist()]
    labels = loaded.config.labels or ()
    if scores.shape[1] == 1:
        return _binary(loaded, scores[:, 0], labels)
    if len(scores) == 1 and scores.ndim == 2 and scores.shape[1] <= _PYTHON_ARGMAX_CLASSES:
        # A single row of a few classes: Python's max and index take 0.4 µs where
        # numpy's argmax, max and two tolist take 1.6, on every single-row predict.
        row = scores[0].tolist()
        if math.isfinite(sum(row)):  # NaN orders differently in Python: numpy below
            best = max(row)
            c = row.index(best)  # the first maximum, as argmax
            confidence = float(best)  # an int or bool output too, as numpy's path
            if best > 1 or min(row) < 0:  # logits: softmax's probability of the best
                confidence = 1.0 / sum(math.exp(score - best) for score in row)
            return [
                Prediction(
                    prediction=c,
                    confidence=confidence,
                    label=labels[c] if c < len(labels) else None,
                )
            ]
    classes = scores.argmax(axis=1)
    confidences = scores.max(axis=1)
    if confidences.dtype.kind == "f" and not np.isfinite(confidences).all():
        raise _not_row_answers(loaded, "answered a score that is not a finite number")
    logits = (confidences > 1) | (scores.min(axis=1) < 0)
    if logits.any():
        # Scores outside [0, 1] are no probabilities: a classifier exported without its
        # softmax (a torch model's logits), whose arg-max's probability is softmax's
        # (a review: "confidence" answered the logit, -1.0 or 7.0).
        confidences = confidences.astype(np.float64)
        shifted = scores[logits].astype(np.float64) - confidences[logits, None]
        confidences[logits] = 1.0 / np.exp(shifted).sum(axis=1)
    return [
        Prediction(
            prediction=int(c),
            confidence=float(p),
            label=labels[c] if c < len(labels) else None,
        )
        for c, p in zip(classes.tolist(), confidences.tolist(), strict=True)
    ]


def _binary(loaded: ModelVersion, probabilities: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
    """A classifier's one score a row (a sigmoid, as Keras and torch export a binary
    classifier) is the probability of class 1: class 1 above 0.5, else class 0 (a tie
    to the lower class, as arg-max), with the probability of the class answered. The
    arg-max of that one column answered class 0 whatever the score (a review)."""
    if probabilities.dtype.kind != "f" or not ((probabilities >= 0) & (probabilities <= 1)).all():
        raise _not_row_answers(loaded, "answers one score a row that is not a probability in [0, 1]")
    answers = []
    for p in probabilities.tolist():
        c = 1 if p > 0.5 else 0
        answers.append(
            Prediction(
                prediction=c, confidence=p if c else 1.0 - p, label=labels[c] if c < len(labels) else None
            )
        )
    return answers


def _not_row_answers(loaded: ModelVersion, what: str) -> ValidationFailed:
    return ValidationFailed(
        f"model {loaded.model} version {loaded.version} {what}; "
        f"its outputs are served as they are by /v2/models/{loaded.model}/infer",
        errors=[FieldError(loc="model", msg=what)],
    )


async def run_predict(
    request: web.Request, payload: PredictRequest | PredictV1Request, started: float
) -> PredictResponse | BatchPredictResponse:
    """The one code path behind v2 and v1."""
    app = request.app  # a property that resolves the current app: once per request
    deadline = request_deadline(request, started, app[SETTINGS].request_timeout_ms)
    return await predict(
        app, payload, started, deadline, request[REQUEST_ID], request.get(TENANT)
    )


async def predict(
    app: web.Application,
    payload: PredictRequest | PredictV1Request,
    started: float,
    deadline: float,
    request_id: str,
    tenant: str | None,
) -> PredictResponse | BatchPredictResponse:
    """``run_predict`` once the request's deadline, id and tenant (None without keys)
    are known; the express lane (service/process/express.py) calls it without a
    ``web.Request``."""
    settings = app[SETTINGS]
    repository = app[MODEL_REPOSITORY]
    loaded = resolve(repository, payload.model or settings.default_model, payload.model_version)
    tenant = sharing_tenant(settings, tenant)
    instances = payload.instances if isinstance(payload, PredictRequest) else None
    # Shed before building the rows: under overload most requests end here.
    # Also for a request the door let through: it asked for one row, and a refusal
    # here is outside the model's breaker (inside it, aiobreaker would count the
    # excluded MailboxFull as a success and close a half-open breaker).
    loaded.worker.check_room(1 if instances is None else len(instances), deadline, tenant=tenant)
    if instances is not None:
        rows = feature_rows(loaded, instances, "instances")
    elif isinstance(payload.features, np.ndarray):  # parsed as a row already (the lane)
        rows = feature_rows(loaded, payload.features, "features")
    else:
        assert payload.features is not None
        rows = feature_rows(loaded, [payload.features], "features")
    # The worker's log lines about these rows name the request's X-Request-ID (a review
    # found a refused input logged under the body's id only); the answer echoes the
    # body's own id, when it gives one.
    answer_id = payload.request_id or request_id
    # The decoded lists (or row) stay alive (the payload) while the rows wait: count them.
    held = (
        payload.features.nbytes
        if isinstance(payload.features, np.ndarray)
        else rows.size * PYTHON_FLOAT_BYTES
    )
    outputs = await loaded.infer(
        rows, deadline, request_id=request_id, held_bytes=held, tenant=tenant
    )
    app[DRIFT_MONITOR].observe(loaded.model, "model", rows)  # never waits; drops when full
    answers = predictions(loaded, outputs[answer_output(loaded)], len(rows))
    latency_ms = round((time.monotonic() - started) * 1000, 3)
    if instances is not None:
        return BatchPredictResponse(
            predictions=answers,
            model=loaded.model,
            model_version=loaded.version,
            request_id=answer_id,
            latency_ms=latency_ms,
        )
    answer = answers[0]
    return PredictResponse(
        prediction=answer.prediction,
        confidence=answer.confidence,
        label=answer.label,
        model=loaded.model,
        model_version=loaded.version,
        request_id=answer_id,
        latency_ms=latency_ms,
    )


def shed_before_decoding(request: web.Request, body: bytes, fmt: Format, started: float) -> None:
    """Under overload, the 503 comes before the rows are decoded (for 768 JSON floats
    the decoding costs more than the rest of a shed request): when the default model's
    mailbox is full, read only which model the body names and, if it is that one, ask
    its worker for room now. Anything else (another model, a body that does not even
    parse) goes on to the full decoding and its usual answer."""
    app = request.app
    settings = app[SETTINGS]
    try:
        default = app[MODEL_REPOSITORY].resolve(settings.default_model)
    except ModelNotFound:
        return
    if not default.worker.mailbox_full:
        return
    try:
        target = decode(body, PredictTarget, fmt)
    except ApiError:
        return
    if (target.model or settings.default_model) == default.model and target.model_version in (
        "latest",
        default.version,
    ):
        deadline = request_deadline(request, started, settings.request_timeout_ms)
        default.worker.check_room(1, deadline, tenant=sharing_tenant(settings, request.get(TENANT)))


def check_row_budget(request: web.Request, body: bytes, fmt: Format) -> None:
    """422 when the body carries more values than its model could take, 404 when it
    names no model there is; both before any row is decoded."""
    undecoded = decode(body, _RowsUndecoded, fmt)
    if not (undecoded.features or undecoded.instances):
        return  # the full decoding says what is missing
    name = _name(undecoded.model, fmt, None)
    version = _name(undecoded.model_version, fmt, "latest")
    if not (isinstance(name, str | None) and isinstance(version, str)):
        loaded, width = None, None  # the full decoding answers 422 for these
    else:
        loaded = resolve(
            request.app[MODEL_REPOSITORY], name or request.app[SETTINGS].default_model, version
        )
        width = _fixed_width(loaded)
    for loc, raw in (("features", undecoded.features), ("instances", undecoded.instances)):
        if not raw:
            continue
        rows = 1 if loc == "features" else MAX_INSTANCES
        budget = (
            rows * width if width is not None else min(rows * MAX_FEATURES, UNSIZED_VALUE_BUDGET)
        )
        model = (
            f"model {loaded.model} version {loaded.version}" if loaded is not None else "the model"
        )
        sent = _msgpack_array_length(memoryview(raw)) if fmt is Format.MSGPACK else None
        if loc == "instances" and sent is not None and sent > MAX_INSTANCES:
            # Its rows stay unread: the count it states is the one to quote (a review:
            # the detail quoted rows times MAX_FEATURES as the values sent).
            raise ValidationFailed(
                f"{model} takes at most {MAX_INSTANCES} instances, got {sent}",
                errors=[FieldError(loc=loc, msg=f"more than {MAX_INSTANCES} instances")],
            )
        values = _value_count(raw, fmt, nested=loc == "instances")
        if values <= budget:
            continue
        if loc == "features" and width is not None:
            detail = f"{model} takes {width} features, got {values}"
        else:
            detail = f"{model} takes at most {budget} values in {loc}, got {values}"
        raise ValidationFailed(
            detail, errors=[FieldError(loc=loc, msg=f"more than {budget} values")]
        )


def _fixed_width(loaded: ModelVersion) -> int | None:
    if len(loaded.inputs) != 1 or len(loaded.inputs[0].shape) != 2:
        return None
    width = loaded.inputs[0].shape[1]
    return width if width > 0 else None


def _value_count(raw: msgspec.Raw, fmt: Format, nested: bool) -> int:
    """How many values an array (of arrays, when ``nested``) holds, without decoding
    them. JSON: commas plus one (exact for arrays of numbers, more for anything else,
    which fails the full decoding anyway). msgpack: from the array headers; nested, at
    most ``MAX_INSTANCES`` rows (``check_row_budget`` refuses more before)."""
    if fmt is Format.JSON:
        return bytes(raw).count(b",") + 1
    length = _msgpack_array_length(memoryview(raw))
    if length is None:
        return 0  # not an array: the full decoding fails at its first byte
    if not nested:
        return length
    total = 0
    for row in msgspec.msgpack.decode(raw, type=list[msgspec.Raw]):
        row_length = _msgpack_array_length(memoryview(row))
        total += 1 if row_length is None else row_length
    return total


def _msgpack_array_length(data: memoryview) -> int | None:
    """The length in the header of the msgpack array ``data`` starts with, if it does."""
    if not data:
        return None
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(data) >= 3:
        length: int = struct.unpack_from(">H", data, 1)[0]
        return length
    if first == 0xDD and len(data) >= 5:
        length = struct.unpack_from(">I", data, 1)[0]
        return length
    return None


# A JSON string, escapes included, or an unclosed one to the end: what
# ``_commas_outside_strings`` leaves out. Possessive, and never failing once begun, so
# one pass (a review: with a string left open, the pattern without ``\Z`` was tried
# again at every quote, each time to the end: 75 KB held the loop 10 s).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)


def _commas_outside_strings(body: bytes) -> int:
    return _JSON_STRING.sub(b"", body).count(b",") + 1


def input_value_budget(spec: TensorSpec) -> int:
    """The most values one input of a request may hold: ``MAX_INSTANCES`` rows of its
    shape, or ``UNSIZED_VALUE_BUDGET`` where a dimension past the batch is free; for
    strings (``BYTES``, each a Python object made on the event loop, ~0.6 µs) at most
    ``BYTES_VALUE_BUDGET``."""
    dims = spec.shape[1:]
    budget = UNSIZED_VALUE_BUDGET if any(dim < 0 for dim in dims) else MAX_INSTANCES * math.prod(dims)
    return min(budget, BYTES_VALUE_BUDGET) if spec.datatype == "BYTES" else budget


async def check_tensor_budget(
    body: bytes | memoryview, loaded: ModelVersion, fmt: Format = Format.JSON
) -> None:
    """422 when a body over ``ROW_BUDGET_FROM_BYTES`` holds more values than the model's
    inputs take at ``MAX_INSTANCES`` rows, before any of them is decoded (a 16 MB body
    of ``0,``, or of msgpack's one-byte empty arrays, would otherwise become 8M or 16M
    Python objects). JSON: commas bound the count from above; past the budget they
    are counted again outside strings (a BYTES tensor of sentences holds commas of its
    own), in a thread as msgpack's count is. msgpack: its objects
    are counted from the bytes (``count_objects``), scalars and containers each
    against the budget, in a thread: a body built to be slow to count (a step of
    Python per object, up to the budget) then slows the event loop, by the GIL's
    turns, rather than stopping it. The shapes and names of a request add a few."""
    if len(body) <= ROW_BUDGET_FROM_BYTES:
        return
    budget = TENSOR_SLACK_VALUES + sum(input_value_budget(spec) for spec in loaded.inputs)
    if fmt is Format.JSON:
        values = bytes(body).count(b",") + 1
        if values > budget and b'"' in body:
            loop = asyncio.get_running_loop()
            values = await loop.run_in_executor(None, _commas_outside_strings, bytes(body))
        holds = f"the body holds about {values}"
    elif len(body) <= budget:
        return  # a msgpack object takes a byte at least: no more objects than bytes
    else:
        loop = asyncio.get_running_loop()
        values = max(await loop.run_in_executor(None, count_objects, bytes(body), budget))
        holds = f"the body holds more than {budget}"
    if values > budget:
        raise ValidationFailed(
            f"model {loaded.model} version {loaded.version} takes at most {budget} values, {holds}",
            errors=[FieldError(loc="inputs", msg=f"more than {budget} values")],
        )
    if fmt is Format.JSON:
        # After the values' count, which costs no memory: the outline's tape takes
        # ~16 bytes a value (a review of it: 3.5M values took +107 MB before their 422).
        problem = json_outline(
            bytes(body),
            partial(_outline_problem, loaded),
            partial(_outline_problem_in_bytes, loaded),
            non_finite=True,
        )
        if problem is not None:
            loc, detail = problem
            raise ValidationFailed(
                f"model {loaded.model} version {loaded.version} {detail}",
                errors=[FieldError(loc=loc, msg=detail)],
            )


def _outline_problem(loaded: ModelVersion, document: object) -> tuple[str, str] | None:
    """(location, what is wrong) when an infer request's JSON (``json_outline``) holds
    more tensors than the model has, or a ``parameters`` map over ``MAX_PARAMETERS``:
    each an object msgspec would build before refusing the lot (a review: 250k inputs
    held the loop 0.4 s and took 250 MB; 1M parameters 0.25 s and 200 MB); or an
    object that cannot be outlined by its keys (``outline_refusal``)."""
    if not isinstance(document, simdjson.Object):
        return None
    if (refusal := outline_refusal(document)) is not None:
        return "body", f"takes no request of {refusal}"
    maps: list[tuple[str, object]] = [("parameters", document.get("parameters"))]
    for key, most in (("inputs", len(loaded.inputs)), ("outputs", len(loaded.outputs))):
        tensors = document.get(key)
        if not isinstance(tensors, simdjson.Array):
            continue
        if len(tensors) > most:
            return key, f"has {most} {key}, the request names {len(tensors)}"
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, simdjson.Object):
                continue
            if (refusal := outline_refusal(tensor)) is not None:
                return f"{key}[{index}]", f"takes no tensor of {refusal}"
            maps.append((f"{key}[{index}].parameters", tensor.get("parameters")))
    for loc, parameters in maps:
        if isinstance(parameters, simdjson.Object) and len(parameters) > MAX_PARAMETERS:
            return loc, f"takes at most {MAX_PARAMETERS} parameters a map, got {len(parameters)}"
    return None


def _outline_problem_in_bytes(loaded: ModelVersion, body: bytes) -> tuple[str, str] | None:
    """``_outline_problem`` for a body simdjson refuses (``NaN``, a number past 64
    bits), bounded from its bytes (``structure_counts``): no more objects than the
    request, its tensors and their ``parameters`` maps, and no more members than their
    fields and ``MAX_PARAMETERS`` entries a map."""
    text = body.strip()
    if text[:1] == b"{" and (fields := top_level_length(text)) > _REQUEST_FIELDS:
        # As ``outline_refusal`` on simdjson's path: a key given twice, or unknown.
        return "body", f"takes no request of {fields} members"
    objects, members = structure_counts(body)
    tensors = len(loaded.inputs) + len(loaded.outputs)
    if objects > 2 * (1 + tensors):
        return "inputs", f"has {tensors} inputs and outputs, the request holds {objects} objects"
    most = _REQUEST_FIELDS + tensors * _TENSOR_FIELDS + (1 + tensors) * MAX_PARAMETERS
    if members > most:
        return "parameters", f"takes at most {MAX_PARAMETERS} parameters a map, the request holds {members} members"
    return None


# An infer request's own fields (inputs, outputs, id, parameters), and a tensor's
# (name, shape, datatype, parameters, data).
_REQUEST_FIELDS, _TENSOR_FIELDS = 4, 5


async def read_payload(request: web.Request, type_: type[PayloadT], started: float) -> PayloadT:
    fmt = request_format(request)
    body = await read_body(request, request.app[SETTINGS].max_body_bytes)
    shed_before_decoding(request, body, fmt, started)
    if len(body) > ROW_BUDGET_FROM_BYTES:
        check_row_budget(request, body, fmt)
    return decode(body, type_, fmt)
