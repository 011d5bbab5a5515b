"""Every typed key of the application's state, declared in one place.

Request-scoped keys live with the HTTP context (``service.http.context``). Nothing
this module imports imports it back: the stores it names are built elsewhere
(``service.lifecycles``) and read by the middlewares and routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_urldispatcher import AbstractResource

from mlgate.config import Settings
from mlgate.service.http.held_bodies import HeldBodies
from mlgate.service.http.metrics import Metrics
from mlgate.service.http.readiness import HostReadiness
from mlgate.service.ingest.dedup import RecordDeduplicator
from mlgate.service.ingest.pipeline import IngestPipeline
from mlgate.service.ingest.validation import RecordValidator
from mlgate.service.protection.api_keys import KeyStore
from mlgate.service.protection.idempotency import IdempotencyStore
from mlgate.service.protection.rate_limits import RateLimiter
from mlgate.workers.inference.repository import ModelRepository
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile_store import ProfileStore
from mlgate.workers.sinks.records import RecordSink

SETTINGS = web.AppKey("settings", Settings)
RECORD_SINK = web.AppKey("record_sink", RecordSink)
RECORD_VALIDATOR = web.AppKey("record_validator", RecordValidator)
# decode -> validate -> quality -> dedup -> write -> confirm (service.ingest.pipeline)
INGEST_PIPELINE = web.AppKey("ingest_pipeline", IngestPipeline)
METRICS = web.AppKey("metrics", Metrics)
# Set on SIGTERM so /ready turns false while in-flight requests finish.
DRAINING = web.AppKey("draining", asyncio.Event)
# The request bodies being read and waiting for bytes: a shutdown whose wait for them
# runs out ends them, so their routes answer 503 (a stream's saying what was written)
# rather than be cut (``service.http.body``).
OPEN_BODIES = web.AppKey("open_bodies", set[StreamReader])
# The bytes of request bodies read whole and held until their requests end
# (``service.http.body.HeldBodies``).
HELD_BODIES = web.AppKey("held_bodies", HeldBodies)
# Named checks /ready runs besides the sink's health (e.g. "models": all loaded).
# With several processes: their readiness, shared (service.http.readiness).
HOST_READINESS = web.AppKey("host_readiness", HostReadiness)
# Each check answers its problem, for /ready (None: fine).
READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, Callable[[], str | None]])
# Dependencies whose failure /ready reports (``degraded``) without turning not ready: the
# process still serves, with less (Redis: limits in process, Idempotency-Key refused).
DEGRADED_CHECKS = web.AppKey("degraded_checks", dict[str, Callable[[], str | None]])

# What SIGHUP reloads (model repository, API keys, TLS), by name.
RELOAD_HOOKS = web.AppKey("reload_hooks", dict[str, Callable[[], Awaitable[None]]])

# API keys, rate limits, idempotency, record dedup (service.protection).
KEY_STORE = web.AppKey("key_store", KeyStore)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyStore)
RECORD_DEDUP = web.AppKey("record_dedup", RecordDeduplicator)

# Who may call each route, by the resource that matched (service.http.routing):
# None for an open route, else the scopes of which a key needs one.
ROUTE_ACCESS = web.AppKey("route_access", dict[AbstractResource, frozenset[str] | None])

# The ONNX models being served.
MODEL_REPOSITORY = web.AppKey("model_repository", ModelRepository)

# Feature profiles and the drift monitor .
PROFILE_STORE = web.AppKey("profile_store", ProfileStore)
DRIFT_MONITOR = web.AppKey("drift_monitor", DriftMonitor)

