"""Operations: liveness ``GET /health``, readiness ``GET /ready``, ``GET /metrics``."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mlgate.schemas.health import Health, Readiness
from mlgate.service.http.codec import respond
from mlgate.service.http.routing import Route
from mlgate.service.state import (
    DEGRADED_CHECKS,
    DRAINING,
    HOST_READINESS,
    METRICS,
    READINESS_CHECKS,
    RECORD_SINK,
)


async def health(request: web.Request) -> web.Response:
    return respond(request, Health())


def own_problems(app: web.Application) -> dict[str, str | None]:
    """This process's readiness checks, each with its problem (None: fine)."""
    problems = {
        "accepting": "shutting down" if app[DRAINING].is_set() else None,
        "sink": app[RECORD_SINK].problem,
    }
    for name, check in app[READINESS_CHECKS].items():
        problems[name] = check()
    return problems


async def ready(request: web.Request) -> web.Response:
    """Ready when this process and, with several, every sibling still running is."""
    app = request.app
    problems = own_problems(app)
    host = app.get(HOST_READINESS)
    if host is not None:
        problems.update(host.siblings())
    reasons = {name: problem for name, problem in problems.items() if problem is not None}
    degraded = {name: problem for name, check in app[DEGRADED_CHECKS].items() if (problem := check())}
    return respond(
        request,
        Readiness(
            status="not ready" if reasons else "ready",
            checks={name: problem is None for name, problem in problems.items()},
            reasons=reasons,
            degraded=degraded,
        ),
        status=503 if reasons else 200,
    )

async def scrape(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.sample()
    body = await asyncio.get_running_loop().run_in_executor(None, metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

ROUTES = [
    Route("get", "/health", health, "Liveness: the process serves HTTP", "operations", {200: Health}),
    Route(
        "get",
        "/ready", ready,
        "Readiness: accepting work, sink healthy, models loaded",
        "operations",
        {200: Readiness, 503: Readiness},
    ),
    Route(
        "get", "/metrics", scrape, "Prometheus metrics (text exposition format)", "operations", {200: None},
        answer_media=CONTENT_TYPE_LATEST,
    ),
]
