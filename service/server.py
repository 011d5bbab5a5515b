"""Serving: the entrypoint owns the uvloop event loop, binds the socket, handles signals.

SIGTERM/SIGINT: ``/ready`` turns false (and stays so for ``drain_grace_s`` while load
balancers notice), the listening socket closes, in-flight requests finish, then the
cleanup contexts drain the mailboxes, flush the Kafka producer and fsync the local log,
all within ``shutdown_timeout_s``; then the process exits 0. SIGHUP runs the app's
reload hooks (model repository, API keys) and reloads the TLS certificate.
systemd hears READY=1 once the socket accepts connections, STOPPING=1 on shutdown.

With ``workers > 1`` the ``Supervisor`` runs that many serving processes on one port
(``SO_REUSEPORT``), each with its own workers and data directory, forwards signals to
them and restarts one that dies.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent

import msgspec
import structlog
import uvloop
from aiohttp import web

from config import Settings
from service import systemd, tls
from service.app import create_app
from service.appkeys import DRAINING, METRICS, RELOAD_HOOKS

log = structlog.get_logger("mlgate.server")


async def serve(settings: Settings, on_ready: Callable[[], object] | None = None) -> None:
    app = create_app(settings)
    ssl_context = _tls_context(settings, app)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # aiohttp waits this long for in-flight handlers; the sinks get the other half.
        shutdown_timeout=settings.shutdown_timeout_s / 2,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        settings.host,
        settings.port,
        reuse_port=settings.workers > 1,
        backlog=1024,
        ssl_context=ssl_context,
    )
    await site.start()

    stop = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    log.info("serving", host=settings.host, port=settings.port, tls=ssl_context is not None,
             worker_index=settings.worker_index)
    if on_ready is not None:
        on_ready()
    elif settings.workers == 1:
        systemd.ready()

    reloader = asyncio.create_task(_reload_on_signal(app, reload_requested), name="sighup")
    await stop.wait()
    reloader.cancel()
    log.info("shutting_down", budget_s=settings.shutdown_timeout_s)
    if settings.workers == 1:
        systemd.stopping()
    app[DRAINING].set()
    if settings.drain_grace_s:
        await asyncio.sleep(settings.drain_grace_s)
    await runner.cleanup()
    log.info("stopped")


def _tls_context(settings: Settings, app: web.Application) -> ssl.SSLContext | None:
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None or key is None:
        return None
    context = tls.create_context(cert, key)
    expiry = app[METRICS].tls_expiry_seconds
    app[METRICS].samplers["tls"] = lambda: expiry.set(tls.seconds_until_expiry(cert))

    async def reload_tls() -> None:
        tls.reload(context, cert, key)

    app[RELOAD_HOOKS]["tls"] = reload_tls
    return context


async def _reload_on_signal(app: web.Application, requested: asyncio.Event) -> None:
    while True:
        await requested.wait()
        requested.clear()
        systemd.reloading()
        for name, hook in app[RELOAD_HOOKS].items():
            try:
                await hook()
                log.info("reloaded", what=name)
            except Exception as exc:
                log.error("reload_failed", what=name, error=repr(exc))
        systemd.ready("reloaded")


def run(settings: Settings, on_ready: Callable[[], object] | None = None) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, on_ready))


# -- several processes -----------------------------------------------------------------


def _child(settings_json: bytes, ready: ProcessEvent) -> None:
    from service.logs import configure_logging

    settings = msgspec.json.decode(settings_json, type=Settings)
    configure_logging(settings.log_level)
    run(settings, on_ready=ready.set)


class Supervisor:
    """Runs ``settings.workers`` serving processes and keeps them running."""

    RESTART_BACKOFF_S = 1.0

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, tuple[BaseProcess, ProcessEvent]] = {}
        self._stopping = False

    def _spawn(self, index: int) -> None:
        settings = msgspec.structs.replace(self._settings, worker_index=index)
        ready = self._context.Event()
        process = self._context.Process(
            target=_child, args=(msgspec.json.encode(settings), ready), name=f"mlgate-{index}"
        )
        process.start()
        self._children[index] = (process, ready)

    def run(self) -> int:
        owned_metrics_dir = _ensure_metrics_dir()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._forward)
        try:
            for index in range(self._settings.workers):
                self._spawn(index)
            self._wait_until_ready()
            systemd.ready(f"{self._settings.workers} processes serving")
            log.info("supervisor_ready", workers=self._settings.workers)
            return self._watch()
        finally:
            if owned_metrics_dir:
                shutil.rmtree(owned_metrics_dir, ignore_errors=True)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self._stopping:
            if all(ready.is_set() for _, ready in self._children.values()):
                return
            time.sleep(0.05)

    def _watch(self) -> int:
        while True:
            for index, (process, _) in list(self._children.items()):
                if process.is_alive():
                    continue
                process.join()
                _mark_dead(process.pid)
                if self._stopping:
                    del self._children[index]
                    continue
                log.error("worker_died", index=index, exitcode=process.exitcode)
                time.sleep(self.RESTART_BACKOFF_S)
                self._spawn(index)
            if self._stopping and not self._children:
                return 0
            time.sleep(0.1)

    def _forward(self, signum: int, frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
            self._stopping = True
            systemd.stopping()
        for process, _ in self._children.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)


def _ensure_metrics_dir() -> str | None:
    """prometheus-client's multiprocess mode needs a shared directory, set before import."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    directory = tempfile.mkdtemp(prefix="mlgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def _mark_dead(pid: int | None) -> None:
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
