"""Every typed key of the application's state, declared in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from mlgate.config import Settings
from mlgate.service.http.metrics import Metrics
from mlgate.service.ingest.dedup import RecordDeduplicator
from mlgate.service.ingest.validation import RecordValidator
from mlgate.service.protection.api_keys import ApiKey, KeyStore
from mlgate.workers.inference.repository import ModelRepository
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile_store import ProfileStore
from mlgate.workers.sinks.records import RecordSink

if TYPE_CHECKING:  # their modules hold middlewares that import these keys
    from mlgate.service.protection.idempotency import IdempotencyStore
    from mlgate.service.protection.rate_limits import RateLimiter

SETTINGS = web.AppKey("settings", Settings)
RECORD_SINK = web.AppKey("record_sink", RecordSink)
RECORD_VALIDATOR = web.AppKey("record_validator", RecordValidator)
METRICS = web.AppKey("metrics", Metrics)
# Set on SIGTERM so /ready turns false while in-flight requests finish.
DRAINING = web.AppKey("draining", asyncio.Event)
# Named checks /ready runs besides the sink's health (e.g. "models": all loaded).
READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, Callable[[], bool]])

# What SIGHUP reloads (model repository, API keys, TLS), by name.
RELOAD_HOOKS = web.AppKey("reload_hooks", dict[str, Callable[[], Awaitable[None]]])

# API keys, rate limits, idempotency, record dedup (service.auth and its neighbours).
KEY_STORE = web.AppKey("key_store", KeyStore)
RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("rate_limiter")
IDEMPOTENCY: web.AppKey[IdempotencyStore] = web.AppKey("idempotency")
RECORD_DEDUP = web.AppKey("record_dedup", RecordDeduplicator)

# The ONNX models being served; service.routes.predict owns its lifecycle.
MODEL_REPOSITORY = web.AppKey("model_repository", ModelRepository)

# Feature profiles and the drift monitor (service.quality_lifecycle owns their lifecycles).
PROFILE_STORE = web.AppKey("profile_store", ProfileStore)
DRIFT_MONITOR = web.AppKey("drift_monitor", DriftMonitor)

# Per-request state.
REQUEST_ID = web.RequestKey("request_id", str)
TENANT = web.RequestKey("tenant", str)
KEY_ID = web.RequestKey("key_id", str)
API_KEY = web.RequestKey("api_key", ApiKey)
# The body an Idempotency-Key request had read up front (service.body serves it).
BUFFERED_BODY = web.RequestKey("buffered_body", bytes)
