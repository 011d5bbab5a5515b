"""Every typed key of the application's state, declared in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from config import Settings
from service.metrics import Metrics
from service.record_validation import RecordValidator
from workers.records import RecordSink

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

# Per-request state.
REQUEST_ID = web.RequestKey("request_id", str)
TENANT = web.RequestKey("tenant", str)
KEY_ID = web.RequestKey("key_id", str)
