"""Open Inference Protocol routes (KServe v2 / Triton HTTP), so stock clients work unchanged.

    GET  /v2                                          server metadata
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{model}[/versions/{version}]      model metadata
    GET  .../ready                                    200 when serving, else 404
    GET  .../config                                   the Triton-style config clients read
    GET  .../stats, /v2/models/stats                  Triton's statistics extension
    POST .../infer                                    JSON or binary tensors
    POST /v2/repository/index                         repository extension
    POST /v2/repository/models/{model}/load | /unload    audited (``protection.audit``)

Binary tensor extension: with ``Inference-Header-Content-Length: N`` the first N bytes
of the body are the JSON request and the rest holds, in input order, the raw
little-endian bytes of every input that declares ``parameters.binary_data_size``
(BYTES elements each prefixed by a 4-byte little-endian length). Outputs asked for
with ``parameters.binary_data`` (or request-level ``binary_data_output``) come back
the same way, the response carrying ``Inference-Header-Content-Length``.

Requests are checked against the model's metadata (input names, datatypes, shapes,
element counts): 422 on a mismatch, 404 for an unknown model or version. Errors are
``{"error": ...}`` documents (the problem middleware adds it under ``/v2/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from aiohttp import web

from mlgate.schemas.oip import (
    ConfigTensor,
    DynamicBatching,
    InferBatchStatistics,
    InferenceRequest,
    InferenceResponse,
    InferStatistics,
    Liveness,
    ModelConfig,
    ModelMetadata,
    ModelReadiness,
    ModelStatistics,
    ModelStatisticsResponse,
    Readiness,
    RepositoryIndexEntry,
    RepositoryIndexRequest,
    RepositoryModelRequest,
    ResponseOutput,
    ServerMetadata,
    StatisticDuration,
    TensorMetadata,
)
from mlgate.service import __version__
from mlgate.service.http.body import read_body
from mlgate.service.http.codec import (
    Format,
    decode,
    decode_json_non_finite,
    encode,
    json_encoder,
    media_format,
    preferred_format,
    respond,
)
from mlgate.service.http.compression import answer_coding, compress
from mlgate.service.http.context import REQUEST_ID, TENANT, WORK_BEGAN, arrived
from mlgate.service.http.errors import ApiError, BadRequest, NotFound, Unavailable
from mlgate.service.http.routing import Route
from mlgate.service.predict.flow import (
    MAX_TIMEOUT_MS,
    TIMEOUT_HEADER,
    TIMEOUT_PARAMETER,
    check_tensor_budget,
    deadline_in,
    resolve,
    sharing_tenant,
)
from mlgate.service.predict.tensors import (
    HEADER_LENGTH,
    classified,
    input_arrays,
    invalid,
    requested_outputs,
    to_binary,
    to_json,
)
from mlgate.service.protection.audit import Action, audit_request
from mlgate.service.state import DRAINING, DRIFT_MONITOR, MODEL_REPOSITORY, SETTINGS
from mlgate.workers.inference.batching import Duration, request_rows
from mlgate.workers.inference.model_config import PLATFORM, TensorSpec
from mlgate.workers.inference.repository import ModelLoadFailed, ModelNotFound, ModelVersion

EXTENSIONS = [
    "binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"
]


def _deadline(
    headers: Mapping[str, str], payload: InferenceRequest, started: float, default_ms: float
) -> float:
    """``X-Request-Timeout``, else the request's ``parameters.timeout`` (a positive
    integer of µs, as tritonclient sends it: 1 µs passes before the model is asked; at
    most the header's 600 s, else 400: a review's 10**400 was a 500, and 10**12, 11.6
    days, held a model for as long), else the default. A ``timeout`` that is no
    positive integer (``true``, ``0``) is no deadline of its own."""
    timeout_us = payload.parameters.get("timeout")
    # ``type() is int``: a bool is an int to isinstance, and ``true`` is no number of µs.
    if TIMEOUT_HEADER not in headers and type(timeout_us) is int and timeout_us > 0:
        if timeout_us > MAX_TIMEOUT_MS * 1000:
            raise BadRequest(
                f"parameters.timeout must be at most {MAX_TIMEOUT_MS * 1000} microseconds"
            )
        default_ms = timeout_us / 1000
    return deadline_in(headers, started, default_ms)


def _header_length(raw: str | None, body_length: int) -> int | None:
    """The JSON header's byte length from ``Inference-Header-Content-Length``, or None.

    ASCII digits only (``str.isdigit`` also takes ``²``), and no longer than a body
    length can be (``int`` refuses more than 4300 digits)."""
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20 and 0 < int(raw) <= body_length):
        raise BadRequest(f"{HEADER_LENGTH} must be the byte length of the JSON header within the body")
    return int(raw)


def body_format(content_type: str | None) -> Format:
    """JSON whatever the Content-Type, as Triton reads it: its own clients send
    ``application/octet-stream`` (the aio client even without binary tensors) and
    curl ``application/x-www-form-urlencoded``. msgpack, our extension, when declared."""
    return Format.MSGPACK if media_format(content_type) is Format.MSGPACK else Format.JSON


class InferBody(NamedTuple):
    """An infer request's body, decoded: the JSON (or msgpack) request and the bytes
    of its binary tensors (empty without the binary extension)."""

    payload: InferenceRequest
    binary: memoryview


async def decode_infer_body(
    body: bytes, headers: Mapping[str, str], loaded: ModelVersion
) -> InferBody:
    """The body of ``POST .../infer``: 400 / 422 as the app answers them."""
    header_length = _header_length(headers.get(HEADER_LENGTH), len(body))
    if header_length is not None:
        header = body[:header_length]
        await check_tensor_budget(header, loaded)
        return InferBody(decode_json_non_finite(header, InferenceRequest), memoryview(body)[header_length:])
    fmt = body_format(headers.get("Content-Type"))
    await check_tensor_budget(body, loaded, fmt)
    if fmt is Format.JSON:
        return InferBody(decode_json_non_finite(body, InferenceRequest), memoryview(b""))
    return InferBody(decode(body, InferenceRequest, fmt), memoryview(b""))


class BinaryAnswer(NamedTuple):
    """An answer in the binary tensor extension: the JSON header, then the blobs."""

    body: bytes
    header_length: int


async def answer_infer(
    app: web.Application,
    loaded: ModelVersion,
    request: InferBody,
    headers: Mapping[str, str],
    started: float,
    request_id: str,
    tenant: str | None,
) -> InferenceResponse | BinaryAnswer:
    """Infer ``request`` with ``loaded`` for ``tenant`` (None without keys): the
    route's work, for the app's handler and the express lane alike
    (service/process/express.py)."""
    payload, binary = request
    deadline = _deadline(headers, payload, started, float(app[SETTINGS].request_timeout_ms))
    tenant = sharing_tenant(app[SETTINGS], tenant)
    # Shed before building the tensors: under overload most requests end here. A row
    # first, since the shape is not checked against the data yet (a shape of 10^12
    # rows is the request's 422, not a 503 to retry); then the rows it holds.
    loaded.worker.check_room(1, deadline, tenant=tenant)
    feed = input_arrays(payload, binary, loaded)
    rows = request_rows(feed)
    if rows > app[SETTINGS].max_body_bytes:
        # Rows of no values (a shape [10**12, 0]): more than any body could carry rows
        # of, counted in the statistics, and shed with a 503 a retry never gets past
        # (a review). A request's 422.
        raise invalid(
            "inputs", f"{rows} rows of no values: more rows than a request may carry"
        )
    if rows > 1:
        loaded.worker.check_room(rows, deadline, tenant=tenant)
    outputs = requested_outputs(payload, loaded)
    results = await loaded.infer(
        feed, deadline, request_id=request_id, tenant=tenant
    )
    if len(feed) == 1:  # one feature matrix: what a model profile describes
        app[DRIFT_MONITOR].observe(loaded.model, "model", next(iter(feed.values())))

    tensors: list[ResponseOutput] = []
    blobs: list[bytes] = []
    for spec, binary_out, class_count in outputs:
        array = results[spec.name]
        datatype = spec.datatype
        if class_count is not None:
            labels = loaded.config.labels or ()
            array, datatype = classified(array, class_count, labels, loaded.worker.batches_rows), "BYTES"
        if binary_out:
            blob = to_binary(array, datatype)
            blobs.append(blob)
            tensors.append(
                ResponseOutput(
                    name=spec.name,
                    shape=list(array.shape),
                    datatype=datatype,
                    parameters={"binary_data_size": len(blob)},
                )
            )
        else:
            tensors.append(
                ResponseOutput(
                    name=spec.name,
                    shape=list(array.shape),
                    datatype=datatype,
                    data=to_json(array, datatype),
                )
            )
    answer = InferenceResponse(
        model_name=loaded.model, model_version=loaded.version, id=payload.id, outputs=tensors
    )
    if not blobs:
        return answer
    header = json_encoder.encode(answer)
    return BinaryAnswer(b"".join([header, *blobs]), len(header))


async def infer(request: web.Request) -> web.Response:
    started = arrived(request)
    loaded = resolve(
        request.app[MODEL_REPOSITORY],
        request.match_info["model"],
        request.match_info.get("version"),
    )
    body = await read_body(request, request.app[SETTINGS].max_body_bytes)
    decoded = await decode_infer_body(body, request.headers, loaded)
    answer = await answer_infer(
        request.app,
        loaded,
        decoded,
        request.headers,
        started,
        request[REQUEST_ID],
        request.get(TENANT),
    )
    body, content_type, headers = infer_answer(answer, request.headers)
    coding = answer_coding(request.headers.get("Accept-Encoding"), body)
    if coding is not None:
        body = await compress(body, coding)
        headers["Content-Encoding"] = coding
        headers["Vary"] = "Accept-Encoding"  # a shared cache must not give it to others
    # The content type first, as the express lane writes it.
    return web.Response(body=body, headers={"Content-Type": content_type, **headers})


def infer_answer(
    answer: InferenceResponse | BinaryAnswer, headers: Mapping[str, str]
) -> tuple[bytes, str, dict[str, str]]:
    """An infer answer's (body, content type, headers), before any compression: JSON
    or msgpack as ``Accept`` prefers, or the binary tensor extension's bytes."""
    if isinstance(answer, BinaryAnswer):
        return answer.body, "application/octet-stream", {HEADER_LENGTH: str(answer.header_length)}
    fmt = preferred_format(headers.get("Accept"))
    return encode(answer, fmt), fmt.value, {}


async def server_metadata(request: web.Request) -> web.Response:
    return respond(
        request, ServerMetadata(name="mlgate", version=__version__, extensions=EXTENSIONS)
    )


async def server_live(request: web.Request) -> web.Response:
    return respond(request, Liveness(live=True))


async def server_ready(request: web.Request) -> web.Response:
    """200 ready, else 400: the protocol's "4xx means false" (Triton answers 400), where
    mlgate's own ``/ready`` answers 503 for load balancers."""
    ready = request.app[MODEL_REPOSITORY].ready_for_any_model and not request.app[DRAINING].is_set()
    return respond(request, Readiness(ready=ready), status=200 if ready else 400)


def _tensors(specs: tuple[TensorSpec, ...]) -> list[TensorMetadata]:
    return [TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs]


async def model_statistics(request: web.Request) -> web.Response:
    """Triton's statistics extension: every serving version's, a model's or a version's."""
    repository = request.app[MODEL_REPOSITORY]
    model, version = request.match_info.get("model"), request.match_info.get("version")
    if model is None:
        versions = repository.serving()
    elif version is not None:
        versions = [resolve(repository, model, version)]
    else:
        versions = [each for each in repository.serving() if each.model == model]
        if not versions:
            resolve(repository, model, None)  # its 404 (or 503), named
    stats = [_statistics(each) for each in sorted(versions, key=lambda v: (v.model, int(v.version)))]
    return respond(request, ModelStatisticsResponse(model_stats=stats))


def _statistics(loaded: ModelVersion) -> ModelStatistics:
    stats = loaded.worker.stats

    def duration(counted: Duration) -> StatisticDuration:
        return StatisticDuration(count=counted.count, ns=counted.ns)

    none = StatisticDuration(count=0, ns=0)  # no response cache
    return ModelStatistics(
        name=loaded.model,
        version=loaded.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.rows_computed,
        execution_count=stats.batches,
        inference_stats=InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_input=duration(stats.compute_input),
            compute_infer=duration(stats.compute_infer),
            compute_output=duration(stats.compute_output),
            cache_hit=none,
            cache_miss=none,
        ),
        batch_stats=[
            InferBatchStatistics(
                batch_size=size,
                compute_input=duration(sized.compute_input),
                compute_infer=duration(sized.compute_infer),
                compute_output=duration(sized.compute_output),
            )
            for size, sized in sorted(stats.by_batch_size.items())
        ],
    )


async def model_metadata(request: web.Request) -> web.Response:
    repository = request.app[MODEL_REPOSITORY]
    model, version = request.match_info["model"], request.match_info.get("version")
    loaded = resolve(repository, model, version)
    return respond(
        request,
        ModelMetadata(
            name=model,
            versions=[loaded.version] if version else repository.versions(model),
            platform=PLATFORM,
            inputs=_tensors(loaded.inputs),
            outputs=_tensors(loaded.outputs),
        ),
    )


async def model_ready(request: web.Request) -> web.Response:
    """200 when the model (version) serves; 404 otherwise (one that failed to load
    too, where predicts get 503: here the answer is the protocol's "4xx means false")."""
    version = request.match_info.get("version")
    try:
        loaded = resolve(request.app[MODEL_REPOSITORY], request.match_info["model"], version)
    except Unavailable as exc:
        raise NotFound(exc.detail) from None
    return respond(request, ModelReadiness(name=loaded.model, version=version, ready=True))


async def model_config(request: web.Request) -> web.Response:
    loaded = resolve(
        request.app[MODEL_REPOSITORY],
        request.match_info["model"],
        request.match_info.get("version"),
    )
    batching = loaded.worker.batches_rows

    def tensors(specs: tuple[TensorSpec, ...]) -> list[ConfigTensor]:
        # Triton leaves the batch dimension out of dims when the model batches.
        return [
            ConfigTensor(
                name=s.name,
                data_type=f"TYPE_{s.datatype.replace('BYTES', 'STRING')}",
                dims=list(s.shape[1:] if batching else s.shape),
            )
            for s in specs
        ]

    return respond(
        request,
        ModelConfig(
            name=loaded.model,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=loaded.max_batch_size if batching else 0,
            input=tensors(loaded.inputs),
            output=tensors(loaded.outputs),
            dynamic_batching=DynamicBatching(
                max_queue_delay_microseconds=int(loaded.config.max_queue_delay_ms * 1000)
            )
            if batching
            else None,
        ),
    )


async def _optional_body(request: web.Request, type_: type[Any]) -> Any:
    body = await read_body(request, request.app[SETTINGS].max_body_bytes)
    fmt = body_format(request.headers.get("Content-Type"))
    return decode(body, type_, fmt) if body.strip() else type_()


async def repository_index(request: web.Request) -> web.Response:
    query: RepositoryIndexRequest = await _optional_body(request, RepositoryIndexRequest)
    entries = [
        RepositoryIndexEntry(
            name=e.name, version=e.version, state=e.state, reason=e.reason if e.version else None
        )
        for e in request.app[MODEL_REPOSITORY].index(ready_only=query.ready)
    ]
    return respond(request, entries)


def _audit_refusal(request: web.Request, action: Action, model: str, exc: Exception) -> None:
    """The audit event of a load or unload that did not happen, and why."""
    if isinstance(exc, ModelNotFound):
        outcome = "not_found"
    elif isinstance(exc, ModelLoadFailed):
        outcome = "failed"
    elif isinstance(exc, ApiError):
        outcome = "rejected"  # the body or its options, before anything was done
    else:
        outcome = f"failed: {type(exc).__name__}"
    audit_request(request, action, outcome, model=model)


async def repository_load(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    repository = request.app[MODEL_REPOSITORY]
    try:
        options: RepositoryModelRequest = await _optional_body(request, RepositoryModelRequest)
        if any(key == "config" or key.startswith("file:") for key in options.parameters):
            raise BadRequest(
                "mlgate loads models from its repository only; config and file overrides are not supported"
            )
        await repository.load(model)
    except Exception as exc:
        _audit_refusal(request, "model_load", model, exc)
        if isinstance(exc, ModelNotFound):
            raise NotFound(str(exc)) from None
        if isinstance(exc, ModelLoadFailed):
            request[WORK_BEGAN] = True  # the load was tried: its failure is its answer
            raise BadRequest(str(exc)) from None
        raise
    audit_request(
        request, "model_load", "loaded", model=model, model_version=repository.resolve(model).version
    )
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    try:
        await _optional_body(request, RepositoryModelRequest)
        await request.app[MODEL_REPOSITORY].unload(model)
    except Exception as exc:
        _audit_refusal(request, "model_unload", model, exc)
        if isinstance(exc, ModelNotFound):
            raise NotFound(str(exc)) from None
        raise
    audit_request(request, "model_unload", "unloaded", model=model)
    return web.Response(status=200)


_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"
INFER_PATHS = (f"{_MODEL}/infer", f"{_VERSION}/infer")
_OIP, _REPOSITORY = "open inference protocol", "model repository"


def _routes() -> list[Route]:
    infer_header = {
        "name": HEADER_LENGTH,
        "in": "header",
        "required": False,
        "schema": {"type": "integer"},
    }
    accept_encoding = {
        "name": "Accept-Encoding",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": (
            "gzip or deflate (RFC 9110 weights): the answer compressed in it, with "
            f"Content-Encoding, as Triton does ({HEADER_LENGTH} still counts the "
            "uncompressed JSON header)"
        ),
    }
    ops = [
        Route("get", "/v2", server_metadata, "OIP server metadata", _OIP, {200: ServerMetadata}, scope="any"),
        # Before ``/v2/models/{model}``, as Triton reads it: not a model named "stats".
        Route(
            "get",
            "/v2/models/stats",
            model_statistics,
            "Triton statistics of every serving model version",
            _OIP,
            {200: ModelStatisticsResponse},
            scope="predict",
        ),
        Route("get", "/v2/health/live", server_live, "OIP liveness", _OIP, {200: Liveness}),
        Route(
            "get", "/v2/health/ready", server_ready, "OIP readiness", _OIP, {200: Readiness, 400: Readiness}
        ),
    ]
    for base in (_MODEL, _VERSION):
        ops += [
            Route(
                "get",
                base,
                model_metadata,
                "OIP model metadata",
                _OIP,
                {200: ModelMetadata, 404: None},
                scope="predict",
            ),
            Route(
                "get",
                f"{base}/ready",
                model_ready,
                "OIP model readiness",
                _OIP,
                {200: ModelReadiness, 404: None},
                scope="predict",
            ),
            Route(
                "get",
                f"{base}/stats",
                model_statistics,
                "Triton statistics of a model's serving versions, or of one",
                _OIP,
                {200: ModelStatisticsResponse, 404: None},
                scope="predict",
            ),
            Route(
                "get",
                f"{base}/config",
                model_config,
                "Triton model configuration",
                _OIP,
                {200: ModelConfig, 404: None},
                scope="predict",
            ),
            Route(
                "post",
                f"{base}/infer",
                infer,
                "OIP inference: JSON tensors or the binary tensor extension",
                _OIP,
                {200: InferenceResponse, 404: None, 504: None},
                request=InferenceRequest,
                scope="predict",
                request_media=("application/json", "application/octet-stream", "application/msgpack", "application/x-msgpack"),
                parameters=[infer_header, accept_encoding, TIMEOUT_PARAMETER],
            ),
        ]
    for action, summary in (("load", "Load or reload a model"), ("unload", "Unload a model")):
        ops.append(
            Route(
                "post",
                f"/v2/repository/models/{{model}}/{action}",
                repository_load if action == "load" else repository_unload,
                summary,
                _REPOSITORY,
                {200: None, 404: None},
                request=RepositoryModelRequest,
                scope="admin",
                body_optional=True,
            )
        )
    ops.append(
        Route(
            "post",
            "/v2/repository/index",
            repository_index,
            "Repository index",
            _REPOSITORY,
            {200: list[RepositoryIndexEntry]},
            request=RepositoryIndexRequest,
            scope="admin",
            body_optional=True,
        )
    )
    return ops


ROUTES = _routes()
