"""The protection middleware: API key, rate limit and Idempotency-Key, in that order.

Who may call a route is declared with the route (``service.http.routing``) and read
from the route that matched, never from the raw path, so an unknown path needs a key
too (a wrong method on an open path is its 405, ``Allow`` naming what it takes):

- Open routes (health, readiness, metrics, docs, OIP health) pass untouched.
- Everything else needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``;
  missing or unknown: 401 with ``WWW-Authenticate: Bearer realm="mlgate"``; a key
  without the route's scope: 403. ``MLGATE_AUTH_DISABLED=true`` lets every request
  in as tenant ``anonymous`` with every scope (start-up logs a warning).
- Rate limits (``protection.rate_limits``): 429 with ``Retry-After`` when the key or
  its tenant is over its limit; the RateLimit fields on every answer of the app
  (the door's capacity refusals, given before any limit is looked up, carry none).
- ``Idempotency-Key`` on POST (``protection.idempotency``): the first answer is kept
  and replayed; same key with another body 422, while in flight 409.

``Expect: 100-continue`` (``expect_continue``, every route's expect handler): a request
that cannot succeed is refused before its body is sent, not after: 401/403 for its key,
413 for an announced length over MAX_BODY_BYTES; only the others get ``100 Continue``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial

import msgspec
import structlog
from aiohttp import HttpVersion11, web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import _default_expect_handler
from multidict import CIMultiDictProxy

from mlgate.config import Settings
from mlgate.service.http.body import check_declared_length, check_encoding, read_body
from mlgate.service.http.codec import (
    MEDIA_TYPES,
    PROBLEM_JSON,
    Format,
    encode,
    marked_non_finite,
    response_format,
)
from mlgate.service.http.compression import decompressed
from mlgate.service.http.context import (
    API_KEY,
    BUFFERED_BODY,
    KEY_ID,
    REFUSED_UNREAD,
    TENANT,
    WORK_BEGAN,
)
from mlgate.service.http.errors import (
    ApiError,
    BadRequest,
    Conflict,
    ExpectationFailed,
    Forbidden,
    Overloaded,
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from mlgate.service.http.front_door import as_api_error, is_oip_path, problem_response
from mlgate.service.http.routing import Route, route_access
from mlgate.service.protection.api_keys import ANONYMOUS, ApiKey, KeyStoreUnavailable
from mlgate.service.protection.idempotency import (
    HEADER,
    KEPT_HEADERS,
    MAX_KEY_LENGTH,
    REPLAYED,
    Entry,
    IdempotencyStore,
    IdempotencyUnavailable,
    StoredResponse,
    fingerprint,
    matches,
    stores,
)
from mlgate.service.protection.rate_limits import Decision
from mlgate.service.state import IDEMPOTENCY, KEY_STORE, METRICS, RATE_LIMITER, SETTINGS
from mlgate.workers.breaker import BreakerOpen
from mlgate.workers.errors import WorkerError

CHALLENGE = 'Bearer realm="mlgate"'

log = structlog.get_logger("mlgate.protection")
# The rate limit's decision, taken before ``100 Continue`` (``expect_continue``): the
# request's one token, which ``rate_limited`` then uses rather than take another.
RATE_DECISION = web.RequestKey("rate_decision", Decision)


def protection(settings: Settings) -> Middleware:
    """The one middleware; switched off, rate limits cost nothing per request."""
    limits = settings.rate_limits_enabled

    @web.middleware
    async def protect(request: web.Request, handler: Handler) -> web.StreamResponse:
        accepted = route_access(request)
        if accepted is None:  # an open route
            return await handler(request)
        key = await authenticate(request, accepted)
        if limits:
            return await rate_limited(request, key, lambda r: idempotent(r, key, handler))
        return await idempotent(request, key, handler)

    return protect


async def authenticate(request: web.Request, accepted: frozenset[str]) -> ApiKey:
    """The request's key, checked against the scopes the route accepts (empty: any)."""
    if request.app[SETTINGS].auth_disabled:
        key = ANONYMOUS
    else:
        presented = presented_key(request)
        if presented is None:
            raise Unauthorized(
                "An API key is required: Authorization: Bearer <key> or X-API-Key: <key>",
                headers={"WWW-Authenticate": CHALLENGE},
            )
        try:
            found = await request.app[KEY_STORE].authenticate(presented)
        except KeyStoreUnavailable as exc:
            raise Overloaded(str(exc), retry_after_s=1) from None
        if found is None:
            raise Unauthorized(
                "The API key is unknown or revoked",
                headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'},
            )
        key = found
        structlog.contextvars.bind_contextvars(tenant=key.tenant, key_id=key.key_id)
        # Known before its scope is checked: the access line of a 403 names the key
        # (a review: it said null, so a key probing admin routes left no trace).
        request[TENANT], request[KEY_ID] = key.tenant, key.key_id
        if accepted and not (accepted & key.scopes):
            wanted = " or ".join(sorted(accepted))
            raise Forbidden(
                f"The key lacks the scope this route needs: {wanted}",
                headers={
                    "WWW-Authenticate": (
                        f'{CHALLENGE}, error="insufficient_scope", scope="{" ".join(sorted(accepted))}"'
                    )
                },
            )
    request[API_KEY], request[TENANT], request[KEY_ID] = key, key.tenant, key.key_id
    return key


async def expect_continue(request: web.Request, route: Route) -> web.StreamResponse | None:
    """A route's answer to ``Expect``: ``100 Continue`` only when the body could be
    taken, else the refusal at once, so no body is uploaded for nothing.

    The refusal is answered through the app's middlewares (aiohttp sends an expect
    handler's response as it is), so it is the same problem document, with the same
    headers, request id, metrics and log line, as without ``Expect``; and with
    ``Connection: close``, since the body it announced will not follow."""
    refusal: ApiError | None = None
    expectation = request.headers.get("Expect", "")
    if expectation.lower() == "100-continue":
        refusal = await refusal_before_body(request, route)
        key = request.get(API_KEY)
        if refusal is None and key is not None and request.app[SETTINGS].rate_limits_enabled:
            # Over the limit, the 429 comes instead of 100 Continue too (a review: the
            # body was uploaded, megabytes of it, for the 429 that followed).
            decision = request[RATE_DECISION] = await request.app[RATE_LIMITER].check(key)
            if not decision.allowed:
                refusal = over_limit(decision, decision.headers())
    elif request.version == HttpVersion11:  # HTTP/1.0 ignores Expect (RFC 9110 10.1.1)
        refusal = ExpectationFailed(
            f"Expect: {expectation!r} is not an expectation this server meets; send 100-continue or none"
        )
    if refusal is None:
        # aiohttp's own: 100 Continue (HTTP/1.1 only), 417 for any other expectation.
        await _default_expect_handler(request)
        return None
    # No 100 Continue, so no body comes: ``idempotent`` must not wait for it (it waited
    # the body timeout, then answered 408 for a 415).
    request[REFUSED_UNREAD] = True
    response = await through_middlewares(request, refusal)
    # The connection closes after the answer; what body the client may already be
    # sending (RFC 9110 lets it, curl does after 1 s) is drained for a while first
    # (aiohttp's lingering), or closing on unread bytes would reset the connection and
    # the client would lose this answer.
    response.force_close()
    return response


async def refusal_before_body(request: web.Request, route: Route) -> ApiError | None:
    """What the request would be refused before its body is read, in the order the
    app refuses it: its API key; with an ``Idempotency-Key``, that key, the announced
    length and the encoding (the body is read first); then as its handler does, the
    media type, the announced length and the content encoding."""
    try:
        accepted = route_access(request)
        if accepted is not None:
            await authenticate(request, accepted)
        key = request.headers.get(HEADER)
        if key is not None and request.method == "POST":
            # ``idempotent`` reads the whole body, within MAX_BODY_BYTES, before the
            # handler (a stream's too): its refusals come first.
            check_idempotency_key(key, request.headers)
            check_declared_length(request, request.app[SETTINGS].max_body_bytes)
            check_encoding(request)
        if route.body_media is not None:
            route.body_media(request)
        if route.limits_body:
            check_declared_length(request, request.app[SETTINGS].max_body_bytes)
        if route.method != "get":
            check_encoding(request)
    except ApiError as exc:
        return exc
    return None


async def through_middlewares(request: web.Request, error: ApiError) -> web.StreamResponse:
    """``error`` answered by the app's middlewares, as if the route's handler raised it."""

    async def refuse(_: web.Request) -> web.StreamResponse:
        raise error

    handler: Handler = refuse
    for app in reversed(request.match_info.apps):
        for middleware in reversed(app.middlewares):
            handler = partial(middleware, handler=handler)
    return await handler(request)


def presented_key(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer``, else from ``X-API-Key``."""
    return presented_key_in(request.headers)


def presented_key_in(headers: Mapping[str, str]) -> str | None:
    """The key these request headers present, as ``presented_key``."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = headers.get("X-API-Key", "").strip()
    return api_key or None


async def rate_limited(request: web.Request, key: ApiKey, handler: Handler) -> web.StreamResponse:
    """429 when the caller's key or tenant is over its limit; RateLimit fields always."""
    decision = request.get(RATE_DECISION) or await request.app[RATE_LIMITER].check(key)
    headers = decision.headers()
    if not decision.allowed:
        raise over_limit(decision, headers)
    try:
        response = await handler(request)
    except ApiError as exc:
        exc.headers.update(headers)
        raise
    except web.HTTPException as exc:
        exc.headers.update(headers)
        raise
    except (WorkerError, BreakerOpen) as exc:  # the 503/504 the front door makes of them
        error = as_api_error(exc, request.app[SETTINGS].retry_after_s)
        error.headers.update(headers)
        raise error from exc
    if not response.prepared:
        response.headers.update(headers)
    return response


def over_limit(decision: Decision, headers: dict[str, str]) -> RateLimited:
    """The 429 for a refused ``decision`` (``headers``: its RateLimit fields)."""
    return RateLimited(
        f"Over the {decision.refused_by}'s rate limit; retry after the Retry-After seconds",
        retry_after_s=decision.retry_after_s,
        headers=headers,
    )


MSGPACK_TYPES = {media for media, fmt in MEDIA_TYPES.items() if fmt is Format.MSGPACK}


def replay(stored: StoredResponse, fmt: Format, path: str) -> web.Response:
    """The stored answer, in the format this repeat prefers (``fmt``): the first may
    have asked for msgpack and its retry for JSON (a review: the retry got msgpack).
    The same document either way, NaN and infinities included (written in JSON as
    Triton writes them); a body of another type (OIP binary tensors) as stored."""
    headers = dict(stored.headers)
    stored_type = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    body = stored.body
    try:
        if fmt is Format.MSGPACK and stored_type in (Format.JSON.value, PROBLEM_JSON):
            body = encode(json.loads(body), fmt)  # Python's json reads NaN, Infinity
            headers["Content-Type"] = Format.MSGPACK.value
        elif fmt is Format.JSON and stored_type in MSGPACK_TYPES:
            body = encode(marked_non_finite(msgspec.msgpack.decode(body)), fmt)
            problem = stored.status >= 400 and not is_oip_path(path)
            headers["Content-Type"] = PROBLEM_JSON if problem else Format.JSON.value
    except (ValueError, msgspec.DecodeError):  # not the document it says: as stored
        body, headers = stored.body, dict(stored.headers)
    response = web.Response(status=stored.status, body=body)
    response.headers.update(headers)
    response.headers[REPLAYED] = "true"
    return response


def snapshot(response: web.StreamResponse) -> StoredResponse | None:
    if not isinstance(response, web.Response) or response.prepared:
        return None
    body = response.body
    if body is None:
        # An answer of no body (a model's load or unload: 200) is an answer too: not
        # kept, the same key ran again (a review: a repeated unload unloaded the model
        # someone had loaded since).
        body = b""
    if not isinstance(body, bytes):
        return None
    headers = [(name, response.headers[name]) for name in KEPT_HEADERS if name in response.headers]
    coding = response.headers.get("Content-Encoding")
    if coding is not None:
        # Kept as the document itself: a replay goes to a retry whatever its
        # Accept-Encoding, and may be turned into msgpack (a review: gzip bytes were
        # replayed without their Content-Encoding).
        body = decompressed(body, coding)
    return StoredResponse(status=response.status, headers=headers, body=body)


def check_idempotency_key(value: str, headers: CIMultiDictProxy[str]) -> None:
    """400 unless the key ``value`` of ``headers`` is 1-255 printable ASCII characters,
    sent once (of two, which would be the key?)."""
    if not (0 < len(value) <= MAX_KEY_LENGTH and value.isascii() and value.isprintable()):
        raise BadRequest(f"{HEADER} must be 1-{MAX_KEY_LENGTH} printable ASCII characters")
    if len(headers.getall(HEADER)) > 1:
        raise BadRequest(f"{HEADER} must be sent once")


async def idempotent(request: web.Request, api_key: ApiKey, handler: Handler) -> web.StreamResponse:
    key = request.headers.get(HEADER)
    if key is None:  # most requests: nothing more to look at
        return await handler(request)
    if (
        request.method != "POST"
        or request.match_info.http_exception is not None
        or request.get(REFUSED_UNREAD)
    ):
        return await handler(request)
    check_idempotency_key(key, request.headers)

    body = await read_body(request, request.app[SETTINGS].max_body_bytes)
    request[BUFFERED_BODY] = body
    store = request.app[IDEMPOTENCY]
    # Once claimed, the outcome must be recorded even when the client goes away and the
    # handler is cancelled (aiohttp's handler_cancellation): otherwise the claim would be
    # released while the write may still land, and the retry would write it again.
    return await store.run_to_completion(
        _claim_and_run(request, handler, store, api_key.tenant, key, body)
    )


def body_reading(headers: Mapping[str, str]) -> str:
    """The request headers that say how its body is read, for its fingerprint: the
    media type (JSON or msgpack by any of their names, else as sent; none is JSON)
    and an OIP binary body's ``Inference-Header-Content-Length``."""
    media = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    fmt = MEDIA_TYPES.get(media) if media else Format.JSON
    return f"{fmt.value if fmt is not None else media} {headers.get('Inference-Header-Content-Length', '')}"


async def _claim_and_run(
    request: web.Request,
    handler: Handler,
    store: IdempotencyStore,
    tenant: str,
    key: str,
    body: bytes,
) -> web.StreamResponse:
    reading = body_reading(request.headers)
    request_fingerprint = fingerprint(request.method, request.path_qs, body, reading)
    try:
        claimed = await store.claim(tenant, key, request_fingerprint)
    except IdempotencyUnavailable as exc:
        raise Overloaded(str(exc), retry_after_s=exc.retry_after_s) from None
    if isinstance(claimed, Entry):
        if not matches(claimed.fingerprint, request.method, request.path_qs, body, reading):
            raise ValidationFailed(f"This {HEADER} was used with a different request")
        if claimed.response is None:
            raise Conflict(f"A request with this {HEADER} is still in flight", retry_after_s=1)
        request.app[METRICS].idempotent_replays.inc()
        return replay(claimed.response, response_format(request), request.path)

    try:
        response: web.StreamResponse = await handler(request)
    except ApiError as exc:
        if not stores(exc.status, request.get(WORK_BEGAN, False)):
            await store.release(claimed)
            raise
        response = problem_response(request, exc)
    except BaseException:
        await store.release(claimed)
        raise
    stored = snapshot(response) if stores(response.status, request.get(WORK_BEGAN, False)) else None
    if stored is None:
        await store.release(claimed)
    else:
        await store.complete(claimed, stored)
    return response
