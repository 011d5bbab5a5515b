"""Liveness and readiness: ``GET /health`` and ``GET /ready``."""

from __future__ import annotations

from aiohttp import web

from mlgate.schemas.health import Health, Readiness
from mlgate.service.http.codec import respond
from mlgate.service.http.openapi import Operation
from mlgate.service.state import DRAINING, READINESS_CHECKS, RECORD_SINK

OPERATIONS = [
    Operation("get", "/health", "Liveness: the process serves HTTP", "operations", {200: Health}),
    Operation(
        "get",
        "/ready",
        "Readiness: accepting work, sink healthy, models loaded",
        "operations",
        {200: Readiness, 503: Readiness},
    ),
]


async def health(request: web.Request) -> web.Response:
    return respond(request, Health())


async def ready(request: web.Request) -> web.Response:
    app = request.app
    checks = {
        "accepting": not app[DRAINING].is_set(),
        "sink": app[RECORD_SINK].healthy,
    }
    for name, check in app[READINESS_CHECKS].items():
        checks[name] = check()
    is_ready = all(checks.values())
    return respond(
        request,
        Readiness(status="ready" if is_ready else "not ready", checks=checks),
        status=200 if is_ready else 503,
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
