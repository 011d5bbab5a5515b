"""``create_app(settings)``: the one factory that builds mlgate's application.

Resources start and stop through ``cleanup_ctx`` in dependency order (shared state
with its Redis client, record sink, then models); aiohttp runs the cleanups in reverse
after in-flight handlers finish. Middlewares, outermost first: request context,
metrics, problem+json, then ``authenticate`` -> ``rate_limit`` -> ``idempotency``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from mlgate.config import Settings, worker_data_dir
from mlgate.service import __version__, lifecycles
from mlgate.service.http import metrics, openapi
from mlgate.service.http.front_door import front_door
from mlgate.service.http.metrics import Metrics, PrometheusTelemetry
from mlgate.service.ingest.dedup import RecordDeduplicator
from mlgate.service.ingest.quality_screen import QualityScreen
from mlgate.service.ingest.validation import RecordValidator
from mlgate.service.protection.api_keys import KeyStore, keys_path
from mlgate.service.protection.auth import authenticate
from mlgate.service.protection.idempotency import IdempotencyStore, idempotency
from mlgate.service.protection.rate_limits import RateLimiter, rate_limit
from mlgate.service.protection.shared_redis import SharedRedis
from mlgate.service.routes import health, ingest, oip, predict, quality
from mlgate.service.state import (
    DRAINING,
    DRIFT_MONITOR,
    IDEMPOTENCY,
    KEY_STORE,
    METRICS,
    PROFILE_STORE,
    RATE_LIMITER,
    READINESS_CHECKS,
    RECORD_DEDUP,
    RECORD_SINK,
    RECORD_VALIDATOR,
    RELOAD_HOOKS,
    SETTINGS,
)
from mlgate.workers.quality.profile_store import ProfileStore
from mlgate.workers.sinks.local_log_writer import LocalLogWriter
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink

log = structlog.get_logger("mlgate.app")


def create_app(settings: Settings) -> web.Application:
    # The body limit is ours (service.body), enforced while streaming; aiohttp's own
    # client_max_size only guards request.read()/post(), which mlgate does not use.
    app_metrics = Metrics()
    draining = asyncio.Event()
    app = web.Application(
        middlewares=[
            front_door(
                metrics.RequestCounter(app_metrics), settings, draining, predict.PATH_HEADERS
            ),
            authenticate,
            # Switched off, the limiter is not in the chain at all: no cost per request.
            *([rate_limit] if settings.rate_limits_enabled else []),
            idempotency,
        ],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = app_metrics
    app[DRAINING] = draining
    app[READINESS_CHECKS] = {}
    app[RELOAD_HOOKS] = {}
    app[PROFILE_STORE] = ProfileStore(settings.profiles_dir, settings.model_repository)
    app[DRIFT_MONITOR] = lifecycles.drift_monitor_for(
        settings, app[PROFILE_STORE], PrometheusTelemetry(app_metrics)
    )
    app[RECORD_VALIDATOR] = RecordValidator(
        settings, QualityScreen(app[PROFILE_STORE], app[DRIFT_MONITOR], settings.drift_sample_every)
    )
    app.cleanup_ctx.append(shared_state)
    app.cleanup_ctx.append(record_sink)
    app.cleanup_ctx.append(lifecycles.profiles_ctx)
    app.cleanup_ctx.append(lifecycles.drift_monitor_ctx)
    app.cleanup_ctx.append(metrics.cleanup_ctx(app_metrics))
    health.setup(app)
    metrics.setup(app, app_metrics)
    ingest.setup(app)
    quality.setup(app)
    # -- prediction wiring --
    predict.setup(app)  # the model repository's cleanup context, then /api/v{1,2}/predict
    oip.setup(app)
    openapi.setup(
        app,
        [
            *health.OPERATIONS, *ingest.OPERATIONS, *quality.OPERATIONS,
            *predict.OPERATIONS, *oip.OPERATIONS,
        ],
        version=__version__,
    )
    return app


async def shared_state(app: web.Application) -> AsyncIterator[None]:
    """The Redis client (with REDIS_URL) and what uses it: API keys, rate limits,
    idempotency records, record-id dedup; each falls back to in-process state."""
    settings = app[SETTINGS]
    app_metrics = app[METRICS]
    redis: SharedRedis | None = None
    if settings.redis_url:
        redis = SharedRedis.from_settings(
            settings, on_fallback=lambda operation: app_metrics.redis_fallback.labels(operation).inc()
        )
        if not await redis.ping():
            log.warning("redis_unreachable_at_start", fallback="in-process state")
        shared = redis
        app_metrics.samplers["redis_breaker"] = lambda: app_metrics.breaker_state.labels(
            "redis"
        ).set(metrics.BREAKER_STATES[shared.breaker.state])
    keys = KeyStore(keys_path(settings), redis, cache_s=settings.keys_cache_s)
    app[KEY_STORE] = keys

    async def reload_keys() -> None:
        keys.reload()

    app[RELOAD_HOOKS]["api_keys"] = reload_keys
    if settings.auth_disabled:
        log.warning("auth_disabled", detail="MLGATE_AUTH_DISABLED=true: every request is let in")
    elif keys.file_key_count == 0 and redis is None:
        log.warning("no_api_keys", keys_file=str(keys.path), hint="mlgate keys create")
    if settings.workers > 1 and redis is None:
        log.warning(
            "per_process_limits",
            detail="without REDIS_URL, rate limits, idempotency and dedup hold per process",
        )
    limiter = RateLimiter(settings, redis, app_metrics) if settings.rate_limits_enabled else None
    if limiter is not None:
        app[RATE_LIMITER] = limiter
    app[IDEMPOTENCY] = idempotency_store = IdempotencyStore(settings, redis)
    app[RECORD_DEDUP] = RecordDeduplicator(settings, redis)
    yield
    await idempotency_store.drain(settings.shutdown_timeout_s / 4)
    if limiter is not None:
        await limiter.close()
    if redis is not None:
        await redis.close()


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
