"""The data-quality resources of the app: the profile store and the drift monitor.

``create_app`` builds both (no I/O) and appends their contexts to ``cleanup_ctx``:
``profiles_ctx`` loads the profiles before the first request, rescans them every
``MLGATE_PROFILES_POLL_INTERVAL_S`` and on SIGHUP (reload hook ``profiles``), always
off the event loop; ``drift_monitor_ctx`` starts the monitor's task and stops it once
in-flight handlers have finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from mlgate.config import Settings
from mlgate.service.state import DRIFT_MONITOR, METRICS, PROFILE_STORE, RELOAD_HOOKS, SETTINGS
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile_store import ProfileStore
from mlgate.workers.telemetry import QualityTelemetry

log = structlog.get_logger("mlgate.quality")


def drift_monitor_for(
    settings: Settings, profiles: ProfileStore, telemetry: QualityTelemetry
) -> DriftMonitor:
    return DriftMonitor(
        profiles,
        window_records=settings.drift_window_records,
        psi_threshold=settings.drift_psi_threshold,
        mailbox_rows=settings.drift_mailbox_size,
        telemetry=telemetry,
    )


async def profiles_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[PROFILE_STORE]
    interval = app[SETTINGS].profiles_poll_interval_s
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()  # a SIGHUP during a poll waits for it rather than racing it

    async def refresh() -> None:
        async with lock:
            await loop.run_in_executor(None, store.refresh)

    async def poll() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await refresh()
            except OSError as exc:
                log.error("profiles_scan_failed", error=str(exc))

    await refresh()
    app[RELOAD_HOOKS]["profiles"] = refresh
    task = asyncio.create_task(poll(), name="profiles-poll") if interval > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def drift_monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    monitor = app[DRIFT_MONITOR]
    await monitor.start()
    app[METRICS].samplers["drift_monitor"] = lambda: app[METRICS].mailbox_depth.labels(
        monitor.name
    ).set(monitor.mailbox_depth)
    yield
    await monitor.close()
