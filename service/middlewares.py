"""Middlewares: request id and the canonical log line, and errors as problem+json.

Order (outermost first): ``request_context`` binds the request id, times the request
and writes one log line; ``problem_responses`` turns every exception into an RFC 9457
document (``{"error": ...}`` included for the Open Inference Protocol routes), so no
stack trace ever reaches a client.
"""

from __future__ import annotations

import os
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from schemas.problem import Problem
from service.appkeys import KEY_ID, REQUEST_ID, SETTINGS, TENANT
from service.codec import PROBLEM_JSON, Format, encode, response_format
from service.errors import (
    ApiError,
    DeadlineExceeded,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from workers.breaker import BreakerOpen
from workers.errors import DeadlineExpired, MailboxFull, WorkerClosed, WorkerError

REQUEST_ID_HEADER = "X-Request-ID"
_MAX_REQUEST_ID = 128

access_log = structlog.get_logger("mlgate.access")
error_log = structlog.get_logger("mlgate.errors")


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    if 0 < len(given) <= _MAX_REQUEST_ID and given.isprintable():
        return given
    return os.urandom(16).hex()  # as unique as uuid4().hex, a quarter of the cost


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        exc.headers[REQUEST_ID_HEADER] = request_id
        raise
    finally:
        if request.app[SETTINGS].access_log:
            access_log.info(
                "request",
                method=request.method,
                path=request.path,
                status=status,
                latency_ms=round((time.perf_counter() - started) * 1000, 3),
                tenant=request.get(TENANT),
                key_id=request.get(KEY_ID),
            )


def _as_api_error(exc: BaseException, retry_after_s: int = 1) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, MailboxFull):
        return Overloaded(str(exc), retry_after_s=retry_after_s)
    if isinstance(exc, BreakerOpen):
        return Overloaded(str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, DeadlineExpired):
        return DeadlineExceeded(str(exc), retry_after_s=retry_after_s)
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
        error = ApiError(exc.reason)
        error.status, error.title = exc.status, exc.reason
        return error
    return ApiError("An unexpected error occurred; it has been logged with this request id")


def problem_response(request: web.Request, error: ApiError) -> web.Response:
    is_oip = request.path.startswith("/v2/") or request.path == "/v2"
    problem = Problem(
        type=error.type_uri,
        title=error.title,
        status=error.status,
        detail=error.detail,
        instance=request.path,
        request_id=request.get(REQUEST_ID),
        retry_after_s=error.retry_after_s,
        errors=error.errors,
        error=(error.detail or error.title) if is_oip else None,
    )
    headers = dict(error.headers)
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    fmt = response_format(request)
    content_type = Format.MSGPACK.value if fmt is Format.MSGPACK else PROBLEM_JSON
    if is_oip and fmt is Format.JSON:
        content_type = "application/json"
    return web.Response(
        body=encode(problem, fmt), status=error.status, headers=headers, content_type=content_type
    )


@web.middleware
async def problem_responses(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(request, _as_api_error(exc))
    except ApiError as exc:
        return problem_response(request, exc)
    except (WorkerError, BreakerOpen) as exc:
        return problem_response(request, _as_api_error(exc, request.app[SETTINGS].retry_after_s))
    except Exception:
        error_log.exception("unhandled_error", path=request.path)
        return problem_response(request, _as_api_error(Exception()))
