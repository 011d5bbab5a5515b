"""Liveness and readiness: ``GET /health`` and ``GET /ready``."""

from __future__ import annotations

from aiohttp import web

from service.appkeys import DRAINING, READINESS_CHECKS, RECORD_SINK
from service.codec import respond


async def health(request: web.Request) -> web.Response:
    return respond(request, {"status": "ok"})


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
        {"status": "ready" if is_ready else "not ready", "checks": checks},
        status=200 if is_ready else 503,
    )


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
