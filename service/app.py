"""``create_app(settings)``: the one factory that builds mlgate's application.

Read top to bottom: the middlewares (the front door, then protection: key, rate
limit, Idempotency-Key), the objects built without I/O, every resource's lifecycle
(``service.lifecycles``) appended in dependency order, then the routes, each declared
once with its scope and OpenAPI entry (``service.http.routing``).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from mlgate.config import Settings
from mlgate.service import __version__, lifecycles
from mlgate.service.http import metrics, openapi
from mlgate.service.http.front_door import front_door
from mlgate.service.http.held_bodies import HeldBodies
from mlgate.service.http.metrics import Metrics, PrometheusTelemetry
from mlgate.service.http.routing import add_routes
from mlgate.service.ingest.quality_screen import QualityScreen
from mlgate.service.ingest.validation import RecordValidator
from mlgate.service.protection.middleware import expect_continue, protection
from mlgate.service.routes import health, ingest, oip, predict, quality
from mlgate.service.state import (
    DEGRADED_CHECKS,
    DRAINING,
    DRIFT_MONITOR,
    HELD_BODIES,
    METRICS,
    OPEN_BODIES,
    PROFILE_STORE,
    READINESS_CHECKS,
    RECORD_VALIDATOR,
    RELOAD_HOOKS,
    ROUTE_ACCESS,
    SETTINGS,
)
from mlgate.workers.quality.profile_store import ProfileStore


def create_app(settings: Settings) -> web.Application:
    # The body limit is ours (service.http.body), enforced while streaming; aiohttp's
    # own client_max_size only guards request.read()/post(), which mlgate does not use.
    app_metrics = Metrics()
    draining = asyncio.Event()
    held_bodies = HeldBodies(settings.max_held_body_bytes, settings.retry_after_s)
    app = web.Application(
        middlewares=[
            front_door(
                metrics.RequestCounter(app_metrics),
                settings,
                draining,
                held_bodies,
                predict.PATH_HEADERS,
            ),
            protection(settings),
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = app_metrics
    app[DRAINING] = draining
    app[OPEN_BODIES] = set()
    app[HELD_BODIES] = held_bodies
    app_metrics.samplers["held_bodies"] = lambda: app_metrics.held_body_bytes.set(held_bodies.held)
    app[READINESS_CHECKS] = {}
    app[DEGRADED_CHECKS] = {}
    app[RELOAD_HOOKS] = {}
    app[ROUTE_ACCESS] = {}
    app[PROFILE_STORE] = ProfileStore(settings.profiles_dir, settings.model_repository)
    app[DRIFT_MONITOR] = lifecycles.drift_monitor_for(
        settings, app[PROFILE_STORE], PrometheusTelemetry(app_metrics)
    )
    app[RECORD_VALIDATOR] = RecordValidator(
        settings, QualityScreen.for_settings(settings, app[PROFILE_STORE], app[DRIFT_MONITOR])
    )

    app.cleanup_ctx.append(lifecycles.shared_state)
    app.cleanup_ctx.append(lifecycles.record_sink)
    app.cleanup_ctx.append(lifecycles.profiles)
    app.cleanup_ctx.append(lifecycles.drift_monitor)
    app.cleanup_ctx.append(lifecycles.model_repository)
    app.cleanup_ctx.append(lifecycles.metrics_sampler)
    app.cleanup_ctx.append(lifecycles.host_readiness)

    documented = [
        *health.ROUTES,
        *ingest.ROUTES,
        *quality.ROUTES,
        *predict.ROUTES,
        *oip.ROUTES,
    ]
    add_routes(app, documented, expect_continue)
    add_routes(app, openapi.docs_routes(documented, __version__, settings))
    openapi.add_docs_assets(app)
    return app
