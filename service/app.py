"""``create_app(settings)``: the one factory that builds mlgate's application.

Resources start and stop through ``cleanup_ctx`` in dependency order (record sink,
then models); aiohttp runs the cleanups in reverse after in-flight handlers finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from config import Settings, worker_data_dir
from service import __version__, metrics, openapi
from service.appkeys import (
    DRAINING,
    METRICS,
    READINESS_CHECKS,
    RECORD_SINK,
    RECORD_VALIDATOR,
    RELOAD_HOOKS,
    SETTINGS,
)
from service.metrics import Metrics, PrometheusTelemetry
from service.middlewares import problem_responses, request_context
from service.record_validation import RecordValidator
from service.routes import health, ingest
from workers.local_log import LocalLogWriter
from workers.spilling_sink import SpillingKafkaSink

log = structlog.get_logger("mlgate.app")


def create_app(settings: Settings) -> web.Application:
    # The body limit is ours (service.body), enforced while streaming; aiohttp's own
    # client_max_size only guards request.read()/post(), which mlgate does not use.
    app_metrics = Metrics()
    app = web.Application(
        middlewares=[request_context, metrics.middleware(app_metrics), problem_responses],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = app_metrics
    app[DRAINING] = asyncio.Event()
    app[READINESS_CHECKS] = {}
    app[RELOAD_HOOKS] = {}
    app[RECORD_VALIDATOR] = RecordValidator(settings)
    app.cleanup_ctx.append(record_sink)
    app.cleanup_ctx.append(metrics.cleanup_ctx(app_metrics))
    health.setup(app)
    metrics.setup(app, app_metrics)
    ingest.setup(app)
    # -- prediction wiring --
    openapi.setup(app, [*health.OPERATIONS, *ingest.OPERATIONS], version=__version__)
    return app


async def record_sink(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sink: SpillingKafkaSink | LocalLogWriter
    if settings.kafka_bootstrap_servers:
        sink = SpillingKafkaSink(settings, telemetry=PrometheusTelemetry(app[METRICS]))
    else:
        sink = LocalLogWriter(
            Path(worker_data_dir(settings)) / "log",
            mailbox_size=settings.writer_mailbox_size,
            segment_bytes=settings.log_segment_bytes,
        )
    await sink.start()
    app[RECORD_SINK] = sink
    app[METRICS].samplers["record_sink"] = lambda: sample_sink(app[METRICS], sink)
    yield
    await sink.close(drain_s=settings.shutdown_timeout_s / 2)


def sample_sink(app_metrics: Metrics, sink: SpillingKafkaSink | LocalLogWriter) -> None:
    app_metrics.mailbox_depth.labels(sink.name).set(sink.mailbox_depth)
    if isinstance(sink, SpillingKafkaSink):
        app_metrics.spill_backlog.set(sink.backlog)
        app_metrics.breaker_state.labels("kafka").set(metrics.BREAKER_STATES[sink.breaker.state])
