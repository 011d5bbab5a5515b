"""Serving: the entrypoint owns the uvloop event loop, binds the socket, handles signals.

SIGTERM/SIGINT: ``/ready`` turns false, the listening socket closes, in-flight requests
finish, then the cleanup contexts drain the mailboxes and flush the sinks, all within
``shutdown_timeout_s``; the process then exits 0.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
import uvloop
from aiohttp import web

from config import Settings
from service.app import create_app
from service.appkeys import DRAINING

log = structlog.get_logger("mlgate.server")


async def serve(settings: Settings, ready_callback: object = None) -> None:
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # aiohttp applies this to in-flight handlers; the sinks get the rest of the budget.
        shutdown_timeout=settings.shutdown_timeout_s / 2,
    )
    await runner.setup()
    site = web.TCPSite(
        runner, settings.host, settings.port, reuse_port=settings.workers > 1, backlog=1024
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("serving", host=settings.host, port=settings.port, sink=_sink_name(settings))
    if callable(ready_callback):
        ready_callback()
    await stop.wait()
    log.info("shutting_down", budget_s=settings.shutdown_timeout_s)
    app[DRAINING].set()
    await runner.cleanup()
    log.info("stopped")


def _sink_name(settings: Settings) -> str:
    return "kafka" if settings.kafka_bootstrap_servers else "local_log"


def run(settings: Settings) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
