"""The express lane: the common predict and ingest requests served at the connection,
without aiohttp's ``Request``, its task per request, the middleware chain and
``Response``.

On one core the app's path costs ~145 µs for a small model's single-row predict, of
which the predict itself (decode, rows, batching, answer) is about a third; the rest
is machinery every request pays. The lane runs the routes' own code (``flow.predict``;
``routes.ingest.ingest_batch``: decode, validate, dedup, durable write, audit) with
only what they need around it.

It takes a request the door (service/process/door.py) let through when:
- it is a ``POST`` over HTTP/1.1 to ``/api/v2/predict`` or ``/api/v1/predict`` whose
  body names no model (the door's condition), is at most ``ROW_BUDGET_FROM_BYTES`` and
  decodes into the route's schema (for a model with room); or to ``/api/v2/ingest``
  with a body of at most ``MAX_BODY_BYTES``; or to an Open Inference Protocol
  ``.../infer`` of a served model with a body of at most ``MAX_BODY_BYTES``, decoded
  (JSON, msgpack or binary tensors) after the rate limit and answered by the route's
  own ``decode_infer_body`` and ``answer_infer``, whose errors are the app's;
- its ``Content-Type`` is JSON or msgpack (or absent; any, for an infer), and it has
  no ``Content-Encoding``, ``Expect`` or ``Idempotency-Key``;
- it is the last request read from its connection (pipelined ones behind it go to
  the app, after it);
- and the door's conditions hold: a complete body, an idle connection, a key known
  now with the route's scope, a valid ``X-Request-Timeout`` (predict), not draining.

Anything else goes to the app, which answers it with its precise error; so does a
predict body that does not decode. An ingest's decoding errors are the route's own
(``ingest_batch`` raises them). What the lane does as the app does, with the app's
own functions: rate limits (``RateLimiter.check``; its RateLimit fields on every
answer, 429 when over), errors as problem documents, v1's answer and deprecation
headers, the request metrics, the access log line, ``Connection: close`` while
draining. Its answers carry the headers aiohttp's would (``Date``, ``Server``).

While a request is in the lane its connection is not read (so nothing behind it is
answered first) and its keep-alive timer is stopped; graceful shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import http
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import simdjson
import structlog
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11, RawRequestMessage

from mlgate.schemas.oip import InferenceResponse
from mlgate.schemas.predict import PredictRequest, PredictV1Request
from mlgate.service.http.codec import Format, encode, media_format, preferred_format
from mlgate.service.http.compression import answer_coding, compress
from mlgate.service.http.errors import ApiError
from mlgate.service.http.front_door import (
    CLIENT_CLOSED_REQUEST,
    REQUEST_ID_HEADER,
    RequestIds,
    access_log,
    as_api_error,
    error_log,
    logs_requests,
    problem_document,
    problem_headers,
)
from mlgate.service.predict.flow import ROW_BUDGET_FROM_BYTES, json_feature_row, predict, resolve
from mlgate.service.protection.api_keys import ApiKey
from mlgate.service.protection.audit import Caller
from mlgate.service.protection.middleware import over_limit
from mlgate.service.routes.ingest import PATH as INGEST_PATH
from mlgate.service.routes.ingest import ingest_batch
from mlgate.service.routes.oip import (
    INFER_PATHS,
    BinaryAnswer,
    answer_infer,
    decode_infer_body,
    infer_answer,
)
from mlgate.service.routes.predict import V1_PATH, V2_PATH, v1_answer
from mlgate.service.state import (
    DRAINING,
    INGEST_PIPELINE,
    METRICS,
    MODEL_REPOSITORY,
    RATE_LIMITER,
    SETTINGS,
)
from mlgate.workers.breaker import BreakerOpen
from mlgate.workers.errors import WorkerError

if TYPE_CHECKING:
    from aiohttp import web

    from mlgate.workers.inference.batching import InferenceWorker

Count = Callable[[str, int, float], None]
# An OIP infer's (route template, model, version), as the door read it from the path.
Target = tuple[str, str, str | None] | None
# What a route makes of a body it serves: (payload, its format); None: the app's.
Prepared = tuple[Any, Format] | None
log = structlog.get_logger("mlgate.express")


class Connection(Protocol):
    """What the lane needs of the connection a request came on (``DoorRequestHandler``)."""

    def express_answered(self, answer: bytes | None, close: bool, refused: bool = False) -> bool:
        """Writes the answer; False: the client is gone (closed or reset)."""
        ...

    def force_close(self) -> None: ...

    @property
    def event_loop(self) -> asyncio.AbstractEventLoop: ...


class _PredictRoute:
    """A predict route: bodies up to ``ROW_BUDGET_FROM_BYTES`` that decode into its
    schema (others go to the app, for its precise 400/422), answered by ``flow.predict``."""

    status = 200

    def __init__(
        self,
        app: web.Application,
        path: str,
        request_type: type,
        shape: Callable[[Any], Any] | None,
    ) -> None:
        self.path = path
        self._app = app
        self._request_type = request_type
        self._decoders: dict[Format, msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]] = {
            Format.JSON: msgspec.json.Decoder(request_type),
            Format.MSGPACK: msgspec.msgpack.Decoder(request_type),
        }
        self._row_parser = simdjson.Parser()
        self._shape = shape
        # Larger bodies go to the app: past the limit for its 413 (a review: the lane
        # answered them 200), past the row budget for its counting of values.
        self._max_body_bytes = min(ROW_BUDGET_FROM_BYTES, app[SETTINGS].max_body_bytes)

    def prepare(self, body: bytes, message: RawRequestMessage, target: Target) -> Prepared:
        fmt = request_body_format(message.headers.get("Content-Type"))
        if fmt is None or len(body) > self._max_body_bytes:
            return None
        if fmt is Format.JSON:
            row = json_feature_row(self._row_parser, body)
            if row is not None:  # the request's one row, parsed into an array at once
                return self._request_type(features=row), fmt
        try:
            return self._decoders[fmt].decode(body), fmt
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return None

    async def run(
        self, payload: Any, fmt: Format, caller: Caller, started: float, deadline: float
    ) -> Any:
        answer = await predict(
            self._app, payload, started, deadline, caller.request_id or "", caller.tenant
        )
        return answer if self._shape is None else self._shape(answer)


class _IngestRoute:
    """``POST /api/v2/ingest``: bodies up to ``MAX_BODY_BYTES``, answered by the
    route's own ``ingest_batch`` (decode, validate, durable write, audit), whose errors
    are the app's."""

    status = 202
    path = INGEST_PATH

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._max_body_bytes = app[SETTINGS].max_body_bytes

    def prepare(self, body: bytes, message: RawRequestMessage, target: Target) -> Prepared:
        fmt = request_body_format(message.headers.get("Content-Type"))
        if fmt is None or len(body) > self._max_body_bytes:
            return None
        return body, fmt

    async def run(
        self, payload: Any, fmt: Format, caller: Caller, started: float, deadline: float
    ) -> Any:
        return await ingest_batch(self._app[INGEST_PIPELINE], payload, fmt, caller)


class _InferRoute:
    """``POST /v2/models/{model}[/versions/{version}]/infer``: bodies up to
    ``MAX_BODY_BYTES`` (larger go to the app, for its 413), decoded and answered by the
    route's own ``decode_infer_body`` and ``answer_infer``."""

    status = 200

    def __init__(self, app: web.Application, path: str) -> None:
        self.path = path
        self._app = app
        self._repository = app[MODEL_REPOSITORY]
        self._max_body_bytes = app[SETTINGS].max_body_bytes

    def prepare(self, body: bytes, message: RawRequestMessage, target: Target) -> Prepared:
        if target is None or len(body) > self._max_body_bytes:
            return None
        return (target, body, message.headers), Format.JSON

    async def run(
        self, payload: Any, fmt: Format, caller: Caller, started: float, deadline: float
    ) -> Any:
        # As the app's handler: after the rate limit, the model resolved now (it may
        # have been unloaded since the door), then the body decoded; their 400/404/422
        # are the lane's answer.
        (_, model, version), body, headers = payload
        loaded = resolve(self._repository, model, version)
        decoded = await decode_infer_body(body, headers, loaded)
        return await answer_infer(
            self._app, loaded, decoded, headers, started, caller.request_id or "", caller.tenant
        )


    async def answer(
        self, answer: InferenceResponse | BinaryAnswer, headers: Mapping[str, str]
    ) -> tuple[bytes, str, dict[str, str]]:
        """(body, content type, its own headers), compressed as the request asks, as
        the app's handler answers."""
        body, content_type, fields = infer_answer(answer, headers)
        coding = answer_coding(headers.get("Accept-Encoding"), body)
        if coding is not None:
            body = await compress(body, coding)
            fields["Content-Encoding"] = coding
            fields["Vary"] = "Accept-Encoding"
        return body, content_type, fields


_Route = _PredictRoute | _IngestRoute | _InferRoute


class ExpressLane:
    """Serves the requests ``take`` accepts, each in one task of its own."""

    def __init__(
        self,
        app: web.Application,
        request_ids: RequestIds,
        path_headers: Mapping[str, Mapping[str, str]],
        count: Count,
        reached_app: Callable[[InferenceWorker, float | None], None],
    ) -> None:
        settings = app[SETTINGS]
        self._app = app
        self._settings = settings
        self._draining = app[DRAINING]
        self._request_ids = request_ids
        self._path_headers = path_headers
        self._count = count
        self._reached_app = reached_app
        self._limiter = app[RATE_LIMITER] if settings.rate_limits_enabled else None
        self._log_requests = logs_requests(settings)
        self._routes: dict[str, _Route] = {
            V2_PATH: _PredictRoute(app, V2_PATH, PredictRequest, None),
            V1_PATH: _PredictRoute(app, V1_PATH, PredictV1Request, v1_answer),
            INGEST_PATH: _IngestRoute(app),
        }
        self._infer_routes = {path: _InferRoute(app, path) for path in INFER_PATHS}
        self.taken = 0
        self.pending: dict[asyncio.Task[None], Connection] = {}

    def take(
        self,
        message: RawRequestMessage,
        body: bytes,
        key: ApiKey,
        deadline: float,
        worker: InferenceWorker | None,
        connection: Connection,
        admitted_at: float | None = None,
        target: Target = None,
    ) -> asyncio.Task[None] | None:
        """The task answering ``message`` in the lane, or None to let the app answer it;
        ``admitted_at``: when the door let it through for ``worker``; ``target``: an OIP
        infer's (route template, model, version)."""
        route = (
            self._routes.get(message.path) if target is None else self._infer_routes.get(target[0])
        )
        if route is None or message.version != HttpVersion11:
            return None
        prepared = route.prepare(body, message, target)
        if prepared is None:
            return None
        payload, fmt = prepared
        self.taken += 1
        task = connection.event_loop.create_task(
            self._serve(
                route, message, payload, fmt, key, deadline, worker, connection, admitted_at
            )
        )
        self.pending[task] = connection
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        """A lane task that failed outside the answer's own error handling (writing it,
        counting it) is logged and counted, and its connection closed: it would
        otherwise stay unread for good."""
        connection = self.pending.pop(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("express_task_failed", error=repr(task.exception()))
        self._app[METRICS].background_task_crashes.labels("express").inc()
        connection.force_close()

    async def _serve(
        self,
        route: _Route,
        message: RawRequestMessage,
        payload: Any,
        body_format: Format,
        key: ApiKey,
        deadline: float,
        worker: InferenceWorker | None,
        connection: Connection,
        admitted_at: float | None,
    ) -> None:
        if worker is not None:
            self._reached_app(worker, admitted_at)
        started = time.monotonic()
        headers = message.headers
        request_id = self._request_ids.from_headers(headers)
        # On every log line of the request, as the app's front door binds it (the task
        # runs in its own copy of the context).
        structlog.contextvars.bind_contextvars(request_id=request_id)
        caller = Caller(key.tenant, key.key_id, f"POST {route.path}", request_id)
        fmt = preferred_format(headers.get("Accept"))
        fields: dict[str, str] = {}
        status = 500
        answer: bytes | None = None
        try:
            body, content_type, status = await self._answer(
                route, message.path, payload, body_format, key, caller, started, deadline, fmt, fields
            )
            if self._draining.is_set():
                fields["Connection"] = "close"
            answer = answer_on(
                message.path, self._path_headers, status, content_type, fields, request_id, body
            )
        finally:
            # Cancelled (shutdown past its budget): the connection is closed unanswered.
            delivered = connection.express_answered(
                answer, close=answer is None or self._draining.is_set(), refused=status == 503
            )
            if answer is not None and not delivered:
                # Nobody is left to answer: counted and logged as the app's front door
                # does (a review: counted 202, an ingest no client ever heard of).
                access_log.info("client_gone", path=message.path, answered=status)
                status = CLIENT_CLOSED_REQUEST
            elapsed = time.monotonic() - started
            self._count(route.path, status, elapsed)
            if self._log_requests:
                access_log.info(
                    "request",
                    method="POST",
                    path=message.path,
                    status=status,
                    latency_ms=round(elapsed * 1000, 3),
                    tenant=key.tenant,
                    key_id=key.key_id,
                )

    async def _answer(
        self,
        route: _Route,
        path: str,
        payload: Any,
        body_format: Format,
        key: ApiKey,
        caller: Caller,
        started: float,
        deadline: float,
        fmt: Format,
        fields: dict[str, str],
    ) -> tuple[bytes, str, int]:
        """(body, content type, status); ``fields`` gains the answer's own headers."""
        try:
            if self._limiter is not None:
                decision = await self._limiter.check(key)
                limit_fields = decision.headers()
                fields.update(limit_fields)
                if not decision.allowed:
                    raise over_limit(decision, limit_fields)
            answer = await route.run(payload, body_format, caller, started, deadline)
            if isinstance(route, _InferRoute):
                body, content_type, headers = await route.answer(answer, payload[2])
                fields.update(headers)
                return body, content_type, route.status
            return encode(answer, fmt), fmt.value, route.status
        except ApiError as exc:
            error = exc
        except (WorkerError, BreakerOpen) as exc:
            error = as_api_error(exc, self._settings.retry_after_s)
        except Exception:
            error_log.exception("unhandled_error", path=path)
            error = as_api_error(Exception())
        body, content_type = problem_document(error, path, caller.request_id or "", fmt)
        fields.update(problem_headers(error))
        return body, content_type, error.status


def request_body_format(content_type: str | None) -> Format | None:
    """The body's format as ``codec.request_format`` reads it; None where that is a 415."""
    return Format.JSON if not content_type else media_format(content_type)


def answer_on(
    path: str,
    path_headers: Mapping[str, Mapping[str, str]],
    status: int,
    content_type: str,
    fields: Mapping[str, str],
    request_id: str,
    body: bytes,
) -> bytes:
    """An answer on ``path`` with the headers the app's front door gives one: its
    content type, its own ``fields``, the request id and the path's headers."""
    every = {"Content-Type": content_type, **fields, REQUEST_ID_HEADER: request_id}
    every.update(path_headers.get(path, {}))
    return raw_answer(status, every, body)


def raw_answer(status: int, fields: Mapping[str, str], body: bytes) -> bytes:
    """An HTTP/1.1 answer as aiohttp writes one: ``fields``, then the body's length,
    ``Date`` and ``Server``, the head in UTF-8 (a client's ``X-Request-ID`` beyond ASCII
    comes back in the bytes it was sent in)."""
    return (answer_head(status, fields) + answer_tail(len(body))).encode(
        "utf-8", "surrogateescape"
    ) + body


def answer_head(status: int, fields: Mapping[str, str]) -> str:
    """An answer's status line and ``fields`` (``raw_answer``)."""
    return f"HTTP/1.1 {status} {_reason(status)}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in fields.items()
    )


def answer_tail(length: int) -> str:
    """The headers every answer ends with (``raw_answer``), and the blank line."""
    return f"Content-Length: {length}\r\nDate: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"


# Looked up on every answer: the enum's own lookup costs 0.4 µs, the dict's 0.04.
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "")
