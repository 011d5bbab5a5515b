"""The outermost middleware, ``front_door``: request id, errors as problem+json, request
metrics and the canonical log line.

Every exception becomes an RFC 9457 document (``{"error": ...}`` included for the Open
Inference Protocol routes), so no stack trace ever reaches a client. Authentication,
rate limits and idempotency sit inside it (service.protection.middleware), so
their refusals are answered, counted and logged the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Mapping, MutableMapping

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mlgate.config import Settings
from mlgate.schemas.problem import FieldError, Problem
from mlgate.service.http.codec import PROBLEM_JSON, Format, encode, response_format
from mlgate.service.http.context import ARRIVED, BODY_HELD, KEY_ID, REQUEST_ID, TENANT
from mlgate.service.http.errors import (
    ApiError,
    DeadlineExceeded,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ShuttingDown,
    ValidationFailed,
    http_error,
)
from mlgate.service.http.held_bodies import HeldBodies
from mlgate.service.http.metrics import RequestCounter
from mlgate.workers.breaker import BreakerOpen
from mlgate.workers.errors import (
    DeadlineExpired,
    InputRefused,
    MailboxFull,
    ShutDown,
    WorkerClosed,
    WorkerError,
)

REQUEST_ID_HEADER = "X-Request-ID"
_MAX_REQUEST_ID = 128

access_log = structlog.get_logger("mlgate.access")
error_log = structlog.get_logger("mlgate.errors")


class RequestIds:
    """Request ids: the client's ``X-Request-ID`` when sane (1 to 128 printable ASCII
    characters), else one of ours.

    Ours are a random per-process prefix and a counter: unique across processes and
    restarts like a uuid4, without a ``getrandom`` system call on every request.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self, request: web.Request) -> str:
        return self.from_headers(request.headers)

    def from_headers(self, headers: Mapping[str, str]) -> str:
        given = headers.get(REQUEST_ID_HEADER, "")
        # Visible ASCII only, as the door reads it: a field value is ASCII (RFC 9110
        # 5.5), and raw UTF-8 echoed reads as other characters to most clients.
        if 0 < len(given) <= _MAX_REQUEST_ID and given.isascii() and given.isprintable():
            return given
        return f"{self._prefix}{next(self._counter):016x}"


def front_door(
    counter: RequestCounter,
    settings: Settings,
    draining: asyncio.Event,
    held_bodies: HeldBodies,
    path_headers: Mapping[str, Mapping[str, str]] | None = None,
) -> Middleware:
    """The outermost middleware: request id, errors as problem+json, the request
    metrics, ``Connection: close`` while draining, the headers every answer on a path
    carries (``path_headers``, e.g. a deprecated route's), the canonical log line, and
    the body bytes a request held given back (``held_bodies``) when it ends.

    One middleware rather than one per concern: each layer of aiohttp's chain costs
    a coroutine and a sub-app lookup on every request.
    """
    request_ids = RequestIds()
    by_path = dict(path_headers or {})
    log_requests = logs_requests(settings)

    def finish(headers: MutableMapping[str, str], request: web.Request, request_id: str) -> None:
        headers[REQUEST_ID_HEADER] = request_id
        extra = by_path.get(request.path)
        if extra:
            headers.update(extra)
        if draining.is_set():
            # Keep-alive clients learn the connection is going away from a response
            # rather than from a closed socket under their next request.
            headers["Connection"] = "close"

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request_ids(request)
        request[REQUEST_ID] = request_id
        request[ARRIVED] = time.monotonic()
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    finish(exc.headers, request, request_id)
                    raise
                error = as_api_error(exc)
                # The rate limit's fields, set on aiohttp's own 404 or 405 once its token
                # was taken (a review: spent, and not said).
                for name in RATE_LIMIT_FIELDS:
                    if name in exc.headers:
                        error.headers[name] = exc.headers[name]
                response = problem_response(request, error)
            except ApiError as exc:
                response = problem_response(request, exc)
            except (WorkerError, BreakerOpen) as exc:
                response = problem_response(request, as_api_error(exc, settings.retry_after_s))
            except Exception as exc:
                if isinstance(exc, ConnectionError) and client_gone(request):
                    # Not an error of ours: the client closed its connection while its
                    # request was read or served. Nobody is left to answer (aiohttp
                    # drops the answer quietly); it is counted and logged as the client's.
                    status = CLIENT_CLOSED_REQUEST
                    access_log.info("client_gone", path=request.path, error=repr(exc))
                    return web.Response(status=CLIENT_CLOSED_REQUEST)
                error_log.exception("unhandled_error", path=request.path)
                response = problem_response(request, as_api_error(Exception()))
            status = response.status
            if not response.prepared and client_gone(request):
                # The client left while its request was served (aiohttp lets the
                # handler finish): nobody hears this answer (a review: counted 202).
                access_log.info("client_gone", path=request.path, answered=status)
                status = CLIENT_CLOSED_REQUEST
            finish(response.headers, request, request_id)
            if draining.is_set() or _closes(request, response):
                response.force_close()
            return response
        except asyncio.CancelledError:
            if client_gone(request):  # aiohttp cancels the handler of a lost connection
                status = CLIENT_CLOSED_REQUEST
            raise
        finally:
            if BODY_HELD in request:
                held_bodies.release(request)
            elapsed = time.perf_counter() - started
            counter.record(request, status, elapsed)
            if log_requests:
                access_log.info(
                    "request",
                    method=request.method,
                    path=request.path,
                    status=status,
                    latency_ms=round(elapsed * 1000, 3),
                    tenant=request.get(TENANT),
                    key_id=request.get(KEY_ID),
                )

    return answer


RATE_LIMIT_FIELDS = ("RateLimit-Policy", "RateLimit")
# nginx's status for a request whose client closed the connection before its answer:
# counted and logged as such, never as a 500 of ours.
CLIENT_CLOSED_REQUEST = 499


def client_gone(request: web.BaseRequest) -> bool:
    """The client closed the request's connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


def logs_requests(settings: Settings) -> bool:
    """Whether answered requests get an access log line. Decided once: building the
    line's fields costs even when the level drops it."""
    return (
        settings.access_log
        and logging.getLevelNamesMapping()[settings.log_level.upper()] <= logging.INFO
    )


def as_api_error(exc: BaseException, retry_after_s: int = 1) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, MailboxFull):
        return Overloaded(str(exc), retry_after_s=retry_after_s)
    if isinstance(exc, BreakerOpen):
        return Overloaded(str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, DeadlineExpired):
        return DeadlineExceeded(str(exc), retry_after_s=retry_after_s)
    if isinstance(exc, InputRefused):
        # The model names no input (onnxruntime says which node failed, not which row).
        return ValidationFailed(str(exc), errors=[FieldError(loc="body", msg="the model could not compute this input")])
    if isinstance(exc, ShutDown):
        # A review: predicts refused at shutdown were typed overloaded, and a client
        # branching on the type read a host going away as one too busy.
        return ShuttingDown(str(exc), retry_after_s=retry_after_s)
    if isinstance(exc, WorkerClosed | WorkerError):
        return Overloaded(str(exc), retry_after_s=retry_after_s)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(exc.text)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"{exc.method} is not allowed here",
            headers={"Allow": ",".join(sorted(exc.allowed_methods))},
        )
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("No such route")
    if isinstance(exc, web.HTTPException):
        return http_error(exc.status, exc.reason)
    return ApiError("An unexpected error occurred; it has been logged with this request id")


def _closes(request: web.Request, response: web.StreamResponse) -> bool:
    """Whether the connection ends with this answer: it says ``Connection: close``
    (aiohttp would otherwise keep it open until its keep-alive timeout), or it comes
    before the end of an encoded body, which aiohttp would read on through its decoder
    to keep the connection: a body that does not decode then ends it with a
    traceback in the log, and the client's next request unanswered."""
    if response.headers.get("Connection", "").lower() == "close":
        return True
    return "Content-Encoding" in request.headers and not request.content.is_eof()


def problem_response(request: web.Request, error: ApiError) -> web.Response:
    body, content_type = problem_document(
        error, request.path, request.get(REQUEST_ID), response_format(request)
    )
    return web.Response(
        body=body, status=error.status, headers=problem_headers(error), content_type=content_type
    )


def is_oip_path(path: str) -> bool:
    """A route of the Open Inference Protocol: its errors are plain JSON with ``error``."""
    return path.startswith("/v2/") or path == "/v2"


def problem_document(
    error: ApiError, path: str, request_id: str | None, fmt: Format
) -> tuple[bytes, str]:
    """(body, content type) of ``error`` answered on ``path``: problem+json, or plain
    JSON with an ``error`` member on the Open Inference Protocol routes, or msgpack."""
    is_oip = is_oip_path(path)
    problem = Problem(
        type=error.type_uri,
        title=error.title,
        status=error.status,
        detail=error.detail,
        instance=path,
        request_id=request_id,
        retry_after_s=error.retry_after_s,
        errors=error.errors,
        error=(error.detail or error.title) if is_oip else None,
    )
    content_type = Format.MSGPACK.value if fmt is Format.MSGPACK else PROBLEM_JSON
    if is_oip and fmt is Format.JSON:
        content_type = "application/json"
    return encode(problem, fmt), content_type


def problem_headers(error: ApiError) -> dict[str, str]:
    headers = dict(error.headers)
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return headers
