"""Route declarations: each route's method, path, handler, scope and OpenAPI entry, once.

Route modules export ``ROUTES``, a list of ``Route``; ``add_routes`` registers them on
the router and records each resource's access, which the protection middleware reads
from the route that matched (never from the raw path). OpenAPI is built from the same
list. ``scope`` is who may call a route:

    None        open, no key needed (health, readiness, metrics, docs)
    "any"       any valid key
    "ingest", "predict", "admin"
                a key with that scope
    "quality"   a key with the quality or the admin scope

``Expect: 100-continue`` is answered per route by the ``expect`` check ``add_routes`` is
given (``protection.middleware.expect_continue``): ``100 Continue`` only for a request
that can succeed, else its refusal before the body is sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from mlgate.service.http.errors import NotFound
from mlgate.service.state import ROUTE_ACCESS

BODY_TYPES = ("application/json", "application/msgpack")
# What a request body may say it is: msgpack by its other name too.
REQUEST_BODY_TYPES = (*BODY_TYPES, "application/x-msgpack")

# The scopes of which a key needs one; empty means any valid key.
ACCEPTED_SCOPES: dict[str, frozenset[str]] = {
    "any": frozenset(),
    "ingest": frozenset({"ingest"}),
    "predict": frozenset({"predict"}),
    "admin": frozenset({"admin"}),
    "quality": frozenset({"quality", "admin"}),
}
# Resources nothing declared (aiohttp's own 404/405 routes): any key, then the 404/405.
UNDECLARED: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    responses: dict[int, Any] = field(default_factory=dict)
    request: Any = None
    scope: str | None = None
    request_media: tuple[str, ...] = REQUEST_BODY_TYPES
    parameters: list[dict[str, Any]] = field(default_factory=list)
    deprecated: bool = False
    description: str = ""
    # Error statuses the handler answers beyond those implied by the operation's shape
    # (see ``openapi.error_statuses``), e.g. 404 for a model named in the body.
    errors: tuple[int, ...] = ()
    # Served but left out of the OpenAPI document (the docs page and its assets).
    documented: bool = True
    # The handler streams its body, of any length (no MAX_BODY_BYTES): an announced
    # length over that limit is then no reason to refuse before ``100 Continue``.
    streams_body: bool = False
    # The handler's check of the body's media type before it reads the body, raising
    # its 415; run before ``100 Continue`` too, so a body it would refuse is not sent.
    body_media: Callable[[web.Request], object] | None = None
    # The request body may be left out (the repository extension's, all optional).
    body_optional: bool = False
    # The media type of an answer that is no wire type (the metrics' text, the docs page).
    answer_media: str | None = None

    def __post_init__(self) -> None:
        if self.scope is not None and self.scope not in ACCEPTED_SCOPES:
            raise ValueError(f"{self.method} {self.path}: unknown scope {self.scope!r}")

    @property
    def accepted_scopes(self) -> frozenset[str] | None:
        """None for an open route, else the scopes of which a key needs one."""
        return None if self.scope is None else ACCEPTED_SCOPES[self.scope]

    @property
    def limits_body(self) -> bool:
        """Whether the handler reads its whole body, within MAX_BODY_BYTES."""
        return self.method != "get" and not self.streams_body


# Answers ``Expect`` for a request on a route: None after ``100 Continue`` (the body
# comes), or the refusal.
ExpectCheck = Callable[[web.Request, Route], Awaitable[web.StreamResponse | None]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def _expect_handler(check: ExpectCheck, route: Route) -> ExpectHandler:
    async def expect(request: web.Request) -> web.StreamResponse | None:
        return await check(request, route)

    return expect


def add_routes(
    app: web.Application, routes: Iterable[Route], expect: ExpectCheck | None = None
) -> None:
    """Register ``routes``; with ``expect``, each answers ``Expect: 100-continue`` with it
    (else aiohttp sends ``100 Continue`` to every request)."""
    access = app[ROUTE_ACCESS]
    for route in routes:
        expect_handler = None if expect is None else _expect_handler(expect, route)
        if route.method == "get":
            added = app.router.add_get(route.path, route.handler, expect_handler=expect_handler)
        else:
            added = app.router.add_route(
                route.method.upper(), route.path, route.handler, expect_handler=expect_handler
            )
        assert added.resource is not None
        declared = access.setdefault(added.resource, route.accepted_scopes)
        if declared != route.accepted_scopes:
            raise ValueError(f"{route.path}: methods of one path need the same scope")


def add_static(app: web.Application, prefix: str, folder: str) -> None:
    """The files directly in ``folder`` under ``prefix``: open, like the page that
    loads them. A name that is no file there is a 404 problem document (aiohttp's
    static route answered a missing file with an empty octet-stream 404, a review)."""
    root = Path(folder).resolve()
    files = {path.name for path in root.iterdir() if path.is_file()}

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in files:
            raise NotFound(f"no file {name!r} here")
        return web.FileResponse(root / name)

    resource = app.router.add_get(prefix + "{name}", serve).resource
    assert resource is not None
    app[ROUTE_ACCESS][resource] = None


def route_access(request: web.Request) -> frozenset[str] | None:
    """None when the matched route is open, else the scopes a key needs one of."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        if isinstance(match_info.http_exception, web.HTTPMethodNotAllowed) and _open_path(request):
            return None  # its 405 and ``Allow``: an open path says what it is to anyone
        return UNDECLARED
    resource = match_info.route.resource
    return request.app[ROUTE_ACCESS].get(resource, ACCEPTED_SCOPES["admin"]) if resource else UNDECLARED


def _open_path(request: web.Request) -> bool:
    path = request.path
    return any(
        access is None and resource.canonical == path
        for resource, access in request.app[ROUTE_ACCESS].items()
    )
