"""Authentication and scopes: the ``authenticate`` middleware.

Open without a key, exactly: ``/health``, ``/ready``, ``/metrics``, ``/openapi.json``,
``/docs`` (and its assets under ``/docs/``) and the OIP ``/v2/health/live`` and
``/v2/health/ready``. Openness is decided on the route that matched, never on the
raw path, so an unknown path or a wrong method on an open path needs a key too.

Everything else needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``;
missing or unknown: 401 with ``WWW-Authenticate: Bearer realm="mlgate"``; a key
without the route's scope: 403. The scope a route needs, by its path:

    /api/v2/ingest, /api/v2/ingest/...            ingest
    /api/v<N>/predict, /v2/models, /v2/models/...  predict
    /v2/repository/...                             admin
    /api/v2/quality/...                            quality or admin
    /v2 (server metadata)                          any valid key
    anything else                                  admin (secure by default)

``MLGATE_AUTH_DISABLED=true`` lets every request in as tenant ``anonymous`` with
every scope; start-up logs a warning when it is set.
"""

from __future__ import annotations

import re

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from mlgate.service.http.errors import Forbidden, Overloaded, Unauthorized
from mlgate.service.protection.api_keys import ANONYMOUS, KeyStoreUnavailable
from mlgate.service.state import API_KEY, KEY_ID, KEY_STORE, SETTINGS, TENANT

OPEN_ROUTES = frozenset(
    {"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/v2/health/live", "/v2/health/ready"}
)
OPEN_PREFIXES = ("/docs/",)
CHALLENGE = 'Bearer realm="mlgate"'
ANY_KEY: frozenset[str] = frozenset()

_PREDICT = re.compile(r"^/api/v\d+/predict(/|$)")

log = structlog.get_logger("mlgate.auth")


def route_path(request: web.Request) -> str | None:
    """The canonical path of the route that matched (``/v2/models/{model}``), or None."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        return None
    resource = match_info.route.resource
    return resource.canonical if resource is not None else None


def is_open(path: str | None) -> bool:
    return path is not None and (path in OPEN_ROUTES or path.startswith(OPEN_PREFIXES))


def required_scopes(path: str) -> frozenset[str]:
    """The scopes of which a key needs one for ``path``; empty means any valid key."""
    if path == "/api/v2/ingest" or path.startswith("/api/v2/ingest/"):
        return frozenset({"ingest"})
    if _PREDICT.match(path) or path == "/v2/models" or path.startswith("/v2/models/"):
        return frozenset({"predict"})
    if path.startswith("/api/v2/quality/") or path == "/api/v2/quality":
        return frozenset({"quality", "admin"})
    if path == "/v2":
        return ANY_KEY
    return frozenset({"admin"})


def presented_key(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer``, else from ``X-API-Key``."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    api_key = request.headers.get("X-API-Key", "").strip()
    return api_key or None


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = route_path(request)
    if is_open(path):
        return await handler(request)
    if request.app[SETTINGS].auth_disabled:
        request[API_KEY], request[TENANT], request[KEY_ID] = ANONYMOUS, ANONYMOUS.tenant, ANONYMOUS.key_id
        return await handler(request)

    presented = presented_key(request)
    if presented is None:
        raise Unauthorized(
            "An API key is required: Authorization: Bearer <key> or X-API-Key: <key>",
            headers={"WWW-Authenticate": CHALLENGE},
        )
    try:
        key = await request.app[KEY_STORE].authenticate(presented)
    except KeyStoreUnavailable as exc:
        raise Overloaded(str(exc), retry_after_s=1) from None
    if key is None:
        raise Unauthorized(
            "The API key is unknown or revoked",
            headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'},
        )
    request[API_KEY], request[TENANT], request[KEY_ID] = key, key.tenant, key.key_id
    structlog.contextvars.bind_contextvars(tenant=key.tenant, key_id=key.key_id)

    if path is not None:  # unmatched routes go on to their 404/405
        needed = required_scopes(path)
        if needed and not (needed & key.scopes):
            wanted = " or ".join(sorted(needed))
            raise Forbidden(
                f"The key lacks the scope this route needs: {wanted}",
                headers={
                    "WWW-Authenticate": (
                        f'{CHALLENGE}, error="insufficient_scope", scope="{" ".join(sorted(needed))}"'
                    )
                },
            )
    return await handler(request)
