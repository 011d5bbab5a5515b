"""Serving: the entrypoint owns the uvloop event loop, binds the socket, handles signals.

SIGTERM/SIGINT: ``/ready`` turns false and every response carries ``Connection: close``
(for ``drain_grace_s`` while load balancers notice, the socket still accepts), then
the listening socket closes, in-flight requests finish, and the cleanup contexts drain
the mailboxes, flush the Kafka producer and fsync the local log. All of it, grace
included, fits in ``shutdown_timeout_s`` counted from the signal; the process exits 0,
or 1 if the budget ran out first (requests cut then never got their 202, so nothing
acknowledged is lost). SIGHUP runs the app's reload hooks (model repository, API keys,
TLS certificate). systemd hears READY=1 once the socket accepts connections,
STOPPING=1 on shutdown.

With ``workers > 1`` the ``Supervisor`` runs that many serving processes on one port
(``SO_REUSEPORT``), each with its own workers and data directory, forwards signals to
them and restarts one that dies. It alone talks to systemd (``NotifyAccess=main``).
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
from pathlib import Path

import msgspec
import structlog
import uvloop
from aiohttp import web

from config import Settings
from service import systemd, tls
from service.app import create_app
from service.appkeys import DRAINING, METRICS, RELOAD_HOOKS

log = structlog.get_logger("mlgate.server")


async def serve(settings: Settings, on_ready: Callable[[], object] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit code (0 drained in budget, 1 budget exceeded)."""
    # Handlers first: a SIGTERM during start-up then means "stop once up", not death.
    stop = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)

    app = create_app(settings)
    app.on_response_prepare.append(_close_connections_while_draining)
    ssl_context = _tls_context(settings, app)
    grace_s, handlers_s = shutdown_plan(settings)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # aiohttp waits this long for in-flight handlers (and as long again if one
        # ignores its cancellation); the sinks drain in what is left of the budget.
        shutdown_timeout=handlers_s,
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
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise

    log.info("serving", host=settings.host, port=settings.port, tls=ssl_context is not None,
             worker_index=settings.worker_index)
    if on_ready is not None:
        on_ready()
    else:
        systemd.ready()

    reloader = asyncio.create_task(_reload_on_signal(app, reload_requested), name="sighup")
    await stop.wait()
    deadline = loop.time() + settings.shutdown_timeout_s
    reloader.cancel()
    await asyncio.gather(reloader, return_exceptions=True)
    log.info("shutting_down", budget_s=settings.shutdown_timeout_s, grace_s=grace_s)
    systemd.stopping()
    app[DRAINING].set()
    if grace_s:
        await asyncio.sleep(grace_s)
    try:
        async with asyncio.timeout_at(deadline):
            await runner.cleanup()
    except TimeoutError:
        log.error("shutdown_budget_exceeded", budget_s=settings.shutdown_timeout_s)
        return 1
    log.info("stopped", seconds=round(settings.shutdown_timeout_s - (deadline - loop.time()), 3))
    return 0


def shutdown_plan(settings: Settings) -> tuple[float, float]:
    """(drain grace, aiohttp's handler timeout) so the whole shutdown fits the budget.

    The grace gets at most half the budget. aiohttp applies its timeout twice in the
    worst case (wait, then wait again after cancelling), so it gets a quarter of what
    remains each time, leaving at least half of the rest for the sinks to drain.
    """
    budget = settings.shutdown_timeout_s
    grace = min(settings.drain_grace_s, budget / 2)
    return grace, (budget - grace) / 4


async def _close_connections_while_draining(
    request: web.Request, response: web.StreamResponse
) -> None:
    # Keep-alive clients learn the connection is going away from a response rather
    # than from a closed socket under their next request.
    if request.app[DRAINING].is_set():
        response.force_close()
        response.headers["Connection"] = "close"


def _tls_context(settings: Settings, app: web.Application) -> ssl.SSLContext | None:
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None or key is None:
        return None
    served = tls.ServedCertificate(cert, key)
    expiry = app[METRICS].tls_expiry_seconds
    app[METRICS].samplers["tls"] = lambda: expiry.set(served.seconds_left())

    async def reload_tls() -> None:
        served.reload()

    app[RELOAD_HOOKS]["tls"] = reload_tls
    return served.context


async def _reload_on_signal(app: web.Application, requested: asyncio.Event) -> None:
    while True:
        await requested.wait()
        requested.clear()
        systemd.reloading()
        hooks = app[RELOAD_HOOKS]
        failed = []
        for name, hook in hooks.items():
            try:
                await hook()
                log.info("reloaded", what=name)
            except Exception as exc:
                failed.append(name)
                log.error("reload_failed", what=name, error=repr(exc))
        log.info("reload_finished", hooks=sorted(hooks), failed=failed)
        systemd.ready("reloaded" if not failed else f"reload failed: {', '.join(failed)}")


def run(settings: Settings, on_ready: Callable[[], object] | None = None) -> int:
    """Serve on a uvloop loop; the exit code ``serve`` decided."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings, on_ready))


# -- several processes -----------------------------------------------------------------


def _child(settings_json: bytes, ready: ProcessEvent) -> None:
    # The supervisor is systemd's main process and speaks for all (NotifyAccess=main).
    os.environ.pop("NOTIFY_SOCKET", None)
    from service.logs import configure_logging

    settings = msgspec.json.decode(settings_json, type=Settings)
    configure_logging(settings.log_level)
    raise SystemExit(run(settings, on_ready=ready.set))


class Supervisor:
    """Runs ``settings.workers`` serving processes and keeps them running.

    Signal handlers only record what arrived; the watch loop forwards it, so a child
    spawned while a signal arrives still gets it. SIGHUP goes to children that are up
    (one still starting reads everything fresh anyway). Exit code: 0 when every child
    drained in its budget, 1 when one did not, failed to start or had to be killed.
    """

    RESTART_BACKOFF_S = 1.0
    START_TIMEOUT_S = 120.0
    # Past the children's own shutdown budget, those still running are killed.
    KILL_GRACE_S = 2.0
    POLL_S = 0.05

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, tuple[BaseProcess, ProcessEvent]] = {}
        self._stop_signal: int | None = None
        self._hangup = False
        self._stop_deadline: float | None = None
        self._signalled: set[int] = set()
        self._exit_code = 0

    def _spawn(self, index: int) -> None:
        settings = msgspec.structs.replace(self._settings, worker_index=index)
        ready = self._context.Event()
        process = self._context.Process(
            target=_child, args=(msgspec.json.encode(settings), ready), name=f"mlgate-{index}"
        )
        process.start()
        self._children[index] = (process, ready)

    def run(self) -> int:
        owned_metrics_dir = _prepare_metrics_dir()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            for index in range(self._settings.workers):
                self._spawn(index)
            if not self._wait_until_ready():
                log.error("worker_failed_to_start")
                self._exit_code = 1
                self._stop_signal = signal.SIGTERM
            elif self._stop_signal is None:
                systemd.ready(f"{self._settings.workers} processes serving")
                log.info("supervisor_ready", workers=self._settings.workers)
            return self._watch()
        finally:
            if owned_metrics_dir:
                shutil.rmtree(owned_metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hangup = True
        elif self._stop_signal is None:
            self._stop_signal = signum

    def _wait_until_ready(self) -> bool:
        """True once every child serves (or a stop was asked for); False if one died."""
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while time.monotonic() < deadline and self._stop_signal is None:
            if any(not process.is_alive() for process, _ in self._children.values()):
                return False
            if all(ready.is_set() for _, ready in self._children.values()):
                return True
            time.sleep(self.POLL_S)
        return self._stop_signal is not None

    def _watch(self) -> int:
        while True:
            self._deliver_signals()
            for index, (process, ready) in list(self._children.items()):
                if process.is_alive():
                    continue
                process.join()
                _mark_dead(process.pid)
                if self._stop_signal is not None:
                    del self._children[index]
                    # A child stopped before it was up had nothing in flight.
                    if process.exitcode != 0 and ready.is_set():
                        log.error("worker_stopped_badly", index=index, exitcode=process.exitcode)
                        self._exit_code = 1
                    continue
                log.error("worker_died", index=index, exitcode=process.exitcode)
                time.sleep(self.RESTART_BACKOFF_S)
                if self._stop_signal is None:
                    self._spawn(index)
                else:
                    del self._children[index]
            if self._stop_signal is not None and not self._children:
                return self._exit_code
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                self._kill_remaining()
            time.sleep(self.POLL_S)

    def _deliver_signals(self) -> None:
        if self._hangup:
            self._hangup = False
            for process, ready in self._children.values():
                if ready.is_set() and process.pid is not None and process.is_alive():
                    os.kill(process.pid, signal.SIGHUP)
        if self._stop_signal is None:
            return
        if self._stop_deadline is None:
            self._stop_deadline = (
                time.monotonic() + self._settings.shutdown_timeout_s + self.KILL_GRACE_S
            )
            systemd.stopping()
            log.info("supervisor_stopping", signal=signal.Signals(self._stop_signal).name)
        for process, _ in self._children.values():
            pid = process.pid
            if pid is not None and pid not in self._signalled and process.is_alive():
                os.kill(pid, self._stop_signal)
                self._signalled.add(pid)

    def _kill_remaining(self) -> None:
        for index, (process, _) in self._children.items():
            if process.pid is not None and process.is_alive():
                log.error("worker_killed_after_budget", index=index)
                process.kill()
                self._exit_code = 1


def _prepare_metrics_dir() -> str | None:
    """prometheus-client's multiprocess mode needs a shared directory, set before import.

    Without ``PROMETHEUS_MULTIPROC_DIR`` a private one is made and removed at exit. A
    given one is emptied of a previous run's files, which would otherwise be summed in.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
        return None
    directory = tempfile.mkdtemp(prefix="mlgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory


def _mark_dead(pid: int | None) -> None:
    if pid is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
