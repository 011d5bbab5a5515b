"""Serving: the entrypoint owns the uvloop event loop, binds the socket, handles signals.

SIGTERM/SIGINT: ``/ready`` turns false and every response carries ``Connection: close``
(for ``drain_grace_s`` while load balancers notice, the socket still accepts), then
the listening socket closes, in-flight requests finish (predicts still waiting for the
model near the end of that wait are answered 503, not cut), and the cleanup contexts drain
the mailboxes, flush the Kafka producer and fsync the local log. All of it, grace
included, fits in ``shutdown_timeout_s`` counted from the signal; the process exits 0,
or 1 if the budget ran out first (requests cut then never got their 202, so nothing
acknowledged is lost). SIGHUP runs the app's reload hooks (model repository, API keys,
TLS certificate). systemd hears READY=1 once the socket accepts connections,
STOPPING=1 on shutdown.

With ``workers > 1`` the ``Supervisor`` (service/supervisor.py) runs that many serving processes on one port
(``SO_REUSEPORT``), each with its own workers and data directory, forwards signals to
them and restarts one that dies. It alone talks to systemd (``NotifyAccess=main``).

Connections (no proxy in front): a connection has ``head_timeout_s`` to send a complete
request head, from when it opens or from the previous response (aiohttp's keep-alive
timer, which closes a connection still waiting for its head); a body that falls
behind ``body_min_rate_bytes`` is 408 (service/http/body.py); and at
``max_connections`` open connections a new one takes the place of one waiting for a
request head (closed: first one that never sent a whole request, the oldest, then any
idle between requests), or, when every connection is busy with a request, gets a canned
503 and is closed at once. Without that, 700 idle sockets from a client with no key
held a cap of 500 for the head timeout, and every tenant got 503s (a review).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import structlog
import uvloop
from aiohttp import web

from mlgate.config import Settings
from mlgate.service.app import create_app
from mlgate.service.cli.redaction import redact_url
from mlgate.service.http.body import end_open_bodies
from mlgate.service.http.metrics import Metrics, PrometheusTelemetry
from mlgate.service.process import systemd, tls
from mlgate.service.process.door import Door, DoorRequestHandler
from mlgate.service.protection.api_keys import KeysFileError
from mlgate.service.protection.shared_redis import RedisMisconfigured
from mlgate.service.routes import predict
from mlgate.service.state import (
    DEGRADED_CHECKS,
    DRAINING,
    METRICS,
    MODEL_REPOSITORY,
    RECORD_SINK,
    RELOAD_HOOKS,
)
from mlgate.workers.inference.repository import LOADER_THREAD
from mlgate.workers.sinks.local_log import LogInUse
from mlgate.workers.sinks.spilling_sink import SpillingKafkaSink
from mlgate.workers.supervision import SupervisedTask

log = structlog.get_logger("mlgate.server")

# Into aiohttp's wait for in-flight requests, the part after which the predicts still
# waiting are refused (503): the rest is left for the answers to be written.
REFUSE_WAITING_AT = 0.8
# How often a supervised process tells the supervisor its event loop turns.
HEARTBEAT_S = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(
    settings: Settings,
    on_ready: Callable[[], object] | None = None,
    on_turn: Callable[[], object] | None = None,
    on_reloaded: Callable[[list[str]], object] | None = None,
    host_problem: Callable[[], str | None] | None = None,
    restarted: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT; the exit code (0 drained in budget, 1 budget exceeded).
    ``on_turn``: called from the event loop every ``HEARTBEAT_S`` from the start (the
    supervisor's sign that the loop turns). ``on_ready``, ``on_reloaded`` (with the
    reload hooks that failed): for a supervisor, which tells systemd, else systemd.
    ``host_problem``: the supervisor's, for /ready (a sibling process that cannot start).
    ``restarted``: a process the supervisor started again after the others' reload
    refused the TLS files: it refuses a certificate not valid now, as they did."""
    # Handlers first: a SIGTERM during start-up stops it (a model load that never ends
    # must not keep the process from stopping).
    stop = asyncio.Event()
    reload_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    watchdog = ShutdownWatchdog(settings.shutdown_timeout_s)

    def request_stop() -> None:
        stop.set()
        watchdog.arm()
        # Stopping now: another stop signal would change nothing while the loop runs,
        # and once it is closed (its handlers gone) one would kill the process, which
        # then exits -15 for a clean stop. A supervisor forwards the signal its group
        # already got (Heroku and a terminal's Ctrl-C signal every process): a review
        # saw clean stops reported ``worker_stopped_badly`` and exit 1, two times in three.
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, request_stop)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    if on_turn is not None:
        # From the start: a loop that stops turning before it serves is hung too (a
        # review: a process stuck in its start-up was never killed, nor said to be).
        _every(loop, HEARTBEAT_S, on_turn)

    with _start_up_step(lambda exc: setting_behind(exc, settings)):
        app = create_app(settings)
    if host_problem is not None:
        app[DEGRADED_CHECKS]["processes"] = host_problem
    with _start_up_step(
        lambda _: f"MLGATE_TLS_CERT_FILE={settings.tls_cert_file}, "
        f"MLGATE_TLS_KEY_FILE={settings.tls_key_file}"
    ):
        ssl_context = _tls_context(settings, app, must_be_valid_now=restarted)
    grace_s, handlers_s = shutdown_plan(settings)
    runner = CappedAppRunner(
        app,
        max_connections=connection_cap(settings.max_connections),
        access_log=None,
        handle_signals=False,
        # aiohttp waits this long for in-flight handlers (and as long again if one
        # ignores its cancellation); the sinks drain in what is left of the budget.
        shutdown_timeout=handlers_s,
        # Closes a connection still waiting for its request head this long after it
        # opened or after its previous response: half a head is not held open.
        keepalive_timeout=settings.head_timeout_s,
        # After an early answer (413, 408), how long the rest of a body is read and
        # dropped so the client can see the answer before the close.
        lingering_time=min(10.0, settings.head_timeout_s),
        # Header (and chunked trailer) fields a message may carry, of at most 8190
        # bytes each: aiohttp's 128 let a trailer section, which the door's 32 KB head
        # limit does not see, hold 1 MB a connection (a review).
        max_headers=MAX_FIELDS,
    )
    with _start_up_step(lambda exc: setting_behind(exc, settings)):
        if not await _started_unless_stopped(runner, stop, settings.shutdown_timeout_s):
            return 0
    app[METRICS].samplers["connections"] = connection_sampler(runner, app[METRICS])
    site = HandshakeBoundSite(
        runner,
        settings.host,
        settings.port,
        reuse_port=settings.workers > 1,
        backlog=1024,
        ssl_context=ssl_context,
        ssl_handshake_timeout=min(settings.head_timeout_s, TLS_HANDSHAKE_TIMEOUT_S),
    )
    try:
        with _start_up_step(lambda _: f"MLGATE_HOST={settings.host}, MLGATE_PORT={settings.port}"):
            await site.start()
    except BaseException:
        await runner.cleanup()
        raise

    gc.freeze()  # what start-up built (models, sessions, routes) lives as long as we do
    log.info(
        "serving",
        host=settings.host,
        port=settings.port,
        tls=ssl_context is not None,
        worker_index=settings.worker_index,
    )
    if on_ready is not None:
        on_ready()
    else:
        systemd.ready()

    reloader = SupervisedTask(
        "sighup-reloader",
        lambda: _reload_on_signal(app, reload_requested, on_reloaded),
        PrometheusTelemetry(app[METRICS]),
    )
    reloader.start()
    await stop.wait()
    deadline = loop.time() + settings.shutdown_timeout_s
    await reloader.stop()
    log.info("shutting_down", budget_s=settings.shutdown_timeout_s, grace_s=grace_s)
    systemd.stopping()
    app[DRAINING].set()
    if grace_s:
        await asyncio.sleep(grace_s)
    # aiohttp cuts the requests still going when its wait for them ends; predicts
    # queued or computing then (long deadlines, a slow model) and requests whose body
    # is still awaited (a paused or slow client, a stream) are answered 503 a little
    # before, so their clients retry elsewhere (a stream: from the record its answer
    # names) rather than see a cut connection; ingests waiting for a broker that does
    # not answer spill, and are answered from the spill.
    refusal = loop.call_later(handlers_s * REFUSE_WAITING_AT, _refuse_waiting, app)
    try:
        async with asyncio.timeout_at(deadline):
            await runner.cleanup()
    except TimeoutError:
        log.error("shutdown_budget_exceeded", budget_s=settings.shutdown_timeout_s)
        return 1
    finally:
        refusal.cancel()
    log.info("stopped", seconds=round(settings.shutdown_timeout_s - (deadline - loop.time()), 3))
    return 0


def _refuse_waiting(app: web.Application) -> None:
    refused = app[MODEL_REPOSITORY].refuse_waiting("the server is shutting down")
    if refused:
        log.warning("predicts_refused_at_shutdown", requests=refused)
    ended = end_open_bodies(app)
    if ended:
        log.warning("bodies_ended_at_shutdown", requests=ended)
    sink = app.get(RECORD_SINK)
    if isinstance(sink, SpillingKafkaSink):
        spilled = sink.spill_waiting_writes()
        if spilled:
            log.warning("kafka_writes_spilled_at_shutdown", writes=spilled)


async def _started_unless_stopped(
    runner: web.AppRunner, stop: asyncio.Event, budget_s: float
) -> bool:
    """Run the app's start-up (models load, clients connect); False if SIGTERM came
    first: start-up is cancelled and what it started cleaned up within the budget."""
    setup = asyncio.ensure_future(runner.setup())
    stopped = asyncio.ensure_future(stop.wait())
    while not (setup.done() or stopped.done()):
        systemd.starting()  # a no-op without systemd
        await asyncio.wait(
            (setup, stopped), timeout=systemd.EXTEND_EVERY_S, return_when=asyncio.FIRST_COMPLETED
        )
    if setup.done():
        stopped.cancel()
        setup.result()  # start-up's own error, if any
        return True
    log.info("start_up_stopped")
    setup.cancel()
    await asyncio.gather(setup, return_exceptions=True)
    try:
        async with asyncio.timeout(budget_s):
            await runner.cleanup()
    except Exception as exc:  # half started: what was not set up cannot be cleaned
        log.warning("start_up_cleanup_failed", error=repr(exc))
    return False


class ShutdownWatchdog:
    """Ends the process once the shutdown budget (from the signal) is spent, whatever
    holds it: a draining step blocking the event loop, or a thread that never ends
    (a model's run or load) that the interpreter would join on its way out. The budget
    is the operator's promise to systemd and the platform; past it, exit 1 as when the
    drain runs out of time (requests cut then never got their 202)."""

    SLACK_S = 1.0

    def __init__(self, budget_s: float) -> None:
        self._budget_s = budget_s
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self._budget_s + self.SLACK_S, self._force_exit)
            self._timer.daemon = True
            self._timer.start()

    def _force_exit(self) -> None:
        log.error("shutdown_forced", budget_s=self._budget_s)
        sys.stdout.flush()
        os._exit(1)


# Files besides client sockets: logs, segments, Kafka and Redis sockets, models.
RESERVED_FILES = 256
# A problem document as every other refusal, though the request is never read (so it
# has no request id of its own to name), with the Open Inference Protocol's ``error``
# (tritonclient reads only that: without it, it reported a decoding failure).
_REFUSED_BECAUSE = "too many open connections: retry after 1 s, or on a connection already open"
_REFUSAL_PROBLEM = (
    b'{"type":"/problems/overloaded","title":"Service Unavailable","status":503,'
    + f'"detail":"{_REFUSED_BECAUSE}","error":"{_REFUSED_BECAUSE}"}}'.encode()
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
    b"Content-Type: application/problem+json\r\n"
    + f"Content-Length: {len(_REFUSAL_PROBLEM)}\r\n".encode()
    + b"Connection: close\r\n\r\n"
    + _REFUSAL_PROBLEM
)


class _Refused(asyncio.Protocol):
    """A connection past the cap: a canned 503, then closed; never parsed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        refused = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        refused.write(_REFUSAL)
        refused.close()


class CappedServer(web.Server):
    """aiohttp's connection factory, refusing connections beyond ``max_connections``;
    each connection's requests pass the ``door`` (service/process/door.py) first."""

    def __init__(self, *args: Any, max_connections: int, door: Door, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.door = door
        self.open_connections = 0
        self.refused_connections = 0
        self.evicted_connections = 0
        self._evicted_gone = 0

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self.open_connections - self._closing >= self.max_connections:
            victim = self._waiting_for_a_head()
            if victim is None:
                self.refused_connections += 1
                return _Refused()
            self.evicted_connections += 1
            victim.evict()
        return DoorRequestHandler(self, loop=self._loop, door=self.door, **self._kwargs)

    def _refuse_made(self, handler: DoorRequestHandler, transport: asyncio.Transport) -> None:
        """A connection made past the cap (a TLS one: taken at its accept, counted once
        its handshake is done; a review saw 300 handshakes finished together held open
        against a cap of 20) is answered 503 and closed, neither counted nor listed.
        Room is made only at an accept: made here, it took a busy client's connection
        between two of its requests (the fix's review), and the connections refused
        here, still listed, were evicted again."""
        self.refused_connections += 1
        handler.refused_at_cap = True
        transport.write(_REFUSAL)
        handler.force_close()

    @property
    def _closing(self) -> int:
        """Evicted connections not yet gone (their ``connection_lost`` comes later)."""
        return self.evicted_connections - self._evicted_gone

    def _waiting_for_a_head(self) -> DoorRequestHandler | None:
        """The connection to close for a new one: one whose requests are all answered
        and that is only read on for its client to see the answer, else the oldest that never sent a whole
        request and waits for a head (the connections are kept in the order they
        opened), else the one idle the longest between requests (a review: the first
        opened of them was closed, a client's busiest pooled connection between two
        requests, rather than one idle for long)."""
        idle: DoorRequestHandler | None = None
        for handler in self._connections:
            # Not one evicted already, still here until its close is heard of (a review:
            # evicted again and again in a burst, each time counted as closing, the cap
            # crept up for good, to the open-files limit).
            if isinstance(handler, DoorRequestHandler) and handler.lingering and not handler.evicted:
                # Answered, read on only for its client to see the answer: first to go
                # (a review: keyless requests declaring bodies they never sent, each
                # answered 401 and read on for 10 s, held the cap against everyone).
                return handler
        for handler in self._connections:
            if isinstance(handler, DoorRequestHandler) and handler.waiting_for_head:
                if not handler.requests_read:
                    return handler
                if idle is None or handler.waiting_since < idle.waiting_since:
                    idle = handler
        return idle

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        if (
            self.open_connections - self._closing >= self.max_connections
            and isinstance(handler, DoorRequestHandler)
        ):
            self._refuse_made(handler, transport)
            return
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        if isinstance(handler, DoorRequestHandler) and handler.refused_at_cap:
            return  # never counted
        self.open_connections -= 1
        if isinstance(handler, DoorRequestHandler) and handler.evicted:
            self._evicted_gone += 1
        super().connection_lost(handler, exc)


# The longest a TLS handshake may take (or MLGATE_HEAD_TIMEOUT_S, if shorter): a
# client's takes a round trip or two. The event loop's default is 60 s.
TLS_HANDSHAKE_TIMEOUT_S = 10.0


class HandshakeBoundSite(web.TCPSite):
    """aiohttp's ``TCPSite`` with a bound on TLS handshakes. A connection counts
    against ``MLGATE_MAX_CONNECTIONS``, and its head timeout runs, only once its
    handshake is done: a review held 495 silent connections 60 s each (the loop's
    default), past the cap, until the open-files limit refused every other client."""

    def __init__(self, *args: Any, ssl_handshake_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ssl_handshake_timeout = ssl_handshake_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._ssl_handshake_timeout if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class CappedAppRunner(web.AppRunner):
    """``AppRunner`` whose server is a ``CappedServer``."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's start-up
        return CappedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            max_connections=self.max_connections,
            door=Door(self.app, predict.PATH_HEADERS),
            **self._kwargs,
        )


def connection_sampler(runner: CappedAppRunner, metrics: Metrics) -> Callable[[], None]:
    """Open connections, refused connections and the door's refusals, sampled with
    the other gauges."""
    counted, door_counted, evicted = 0, 0, 0

    def sample() -> None:
        nonlocal counted, door_counted, evicted
        server = runner.server
        if not isinstance(server, CappedServer):
            return
        metrics.connections_open.set(server.open_connections)
        metrics.connections_refused.inc(server.refused_connections - counted)
        counted = server.refused_connections
        metrics.connections_evicted.inc(server.evicted_connections - evicted)
        evicted = server.evicted_connections
        metrics.door_refusals.inc(server.door.refused - door_counted)
        door_counted = server.door.refused

    return sample


def connection_cap(wanted: int) -> int:
    """``wanted`` connections, with the open-files limit raised to fit them if the hard
    limit allows, else as many as the limit leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    cap = max(1, soft - RESERVED_FILES)
    log.warning("max_connections_lowered", wanted=wanted, cap=cap, open_files_limit=soft)
    return cap


MAX_FIELDS = 64


def shutdown_plan(settings: Settings) -> tuple[float, float]:
    """(drain grace, aiohttp's handler timeout) so the whole shutdown fits the budget.

    The grace gets at most half the budget. aiohttp applies its timeout twice in the
    worst case (wait, then wait again after cancelling), so it gets a quarter of what
    remains each time, leaving at least half of the rest for the sinks to drain.
    """
    budget = settings.shutdown_timeout_s
    grace = min(settings.drain_grace_s, budget / 2)
    return grace, (budget - grace) / 4


def _tls_context(
    settings: Settings, app: web.Application, must_be_valid_now: bool = False
) -> ssl.SSLContext | None:
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None or key is None:
        return None
    served = tls.ServedCertificate(cert, key, must_be_valid_now)
    expiry = app[METRICS].tls_expiry()
    app[METRICS].samplers["tls"] = lambda: expiry.set(served.seconds_left())

    async def reload_tls() -> None:
        served.reload()

    app[RELOAD_HOOKS]["tls"] = reload_tls
    return served.context


async def _reload_on_signal(
    app: web.Application,
    requested: asyncio.Event,
    on_reloaded: Callable[[list[str]], object] | None = None,
) -> None:
    while True:
        await requested.wait()
        requested.clear()
        if on_reloaded is None:
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
        if on_reloaded is not None:
            on_reloaded(failed)
        else:
            systemd.ready(reload_status(failed))


def reload_status(failed: Iterable[str]) -> str:
    """systemd's status line after a reload: which of its hooks failed, if any."""
    names = sorted(set(failed))
    return "reloaded" if not names else f"reload failed: {', '.join(names)}"


def tune_garbage_collector() -> None:
    """Move what exists now (modules, settings, models) out of the collector's sight and
    collect young objects less often.

    An ingest request allocates ~65k floats and lists that die with it; with the default
    thresholds that triggers collections that walk every long-lived object again, which
    measured ~20% of the CPU and full-collection pauses of up to ~150 ms (the p99).
    Nothing in a request forms reference cycles on purpose, so fewer passes lose nothing.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def _every(loop: asyncio.AbstractEventLoop, period_s: float, call: Callable[[], object]) -> None:
    """``call`` now and every ``period_s`` after, from the loop: a timer, no task."""
    call()
    loop.call_later(period_s, _every, loop, period_s, call)


def run(
    settings: Settings,
    on_ready: Callable[[], object] | None = None,
    on_turn: Callable[[], object] | None = None,
    on_reloaded: Callable[[list[str]], object] | None = None,
    host_problem: Callable[[], str | None] | None = None,
    restarted: bool = False,
) -> int:
    """Serve on a uvloop loop; the exit code ``serve`` decided, or 2 when start-up
    failed on what the operator gave it (a file, a directory, the address): said in one
    line naming the setting, not a traceback."""
    tune_garbage_collector()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(serve(settings, on_ready, on_turn, on_reloaded, host_problem, restarted))
        _exit_past_unfinished_loads(code)
        return code
    except StartUpFailed as failed:
        log.error("start_up_failed", setting=failed.setting, error=str(failed.cause))
        print(f"mlgate: start-up error: {failed.setting}: {failed.cause}", file=sys.stderr)
        return 2


def _exit_past_unfinished_loads(code: int) -> None:
    """Exit now when a model's load is still running in its thread (given up on at
    shutdown: creating a session cannot be stopped). The interpreter's exit under it
    made onnxruntime abort the process (SIGABRT, status 134: a failed stop to systemd;
    a review), and waiting for it held the shutdown past its budget."""
    if any(thread.name == LOADER_THREAD and thread.is_alive() for thread in threading.enumerate()):
        log.info("exit_past_model_load", detail="a model's load given up on still runs")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class StartUpFailed(Exception):
    """Start-up failed on what the operator gave it: ``setting`` names it."""

    def __init__(self, setting: str, cause: BaseException) -> None:
        super().__init__(f"{setting}: {cause}")
        self.setting, self.cause = setting, cause


@contextmanager
def _start_up_step(setting_of: Callable[[BaseException], str]) -> Iterator[None]:
    """A start-up step whose file, certificate or address errors are the operator's
    (``StartUpFailed``, naming the setting); anything else stays a crash."""
    try:
        yield
    except (OSError, KeysFileError, LogInUse, RedisMisconfigured) as exc:  # ssl.SSLError is an OSError
        raise StartUpFailed(setting_of(exc), exc) from exc


def setting_behind(exc: BaseException, settings: Settings) -> str:
    """The setting (with its value) that led to ``exc``, as far as its file tells."""
    if isinstance(exc, KeysFileError):
        return f"MLGATE_KEYS_FILE={settings.keys_file or Path(settings.data_dir) / 'keys.json'}"
    if isinstance(exc, LogInUse):
        return f"MLGATE_DATA_DIR={settings.data_dir}"
    if isinstance(exc, RedisMisconfigured):
        return f"MLGATE_REDIS_URL={redact_url(settings.redis_url or '')}, MLGATE_REDIS_MODE={settings.redis_mode}"
    filename = getattr(exc, "filename", None)
    if filename is None:
        return "a file or directory the settings name"
    path = Path(os.fsdecode(filename)).absolute()
    candidates = (
        ("MLGATE_KEYS_FILE", settings.keys_file),
        ("MLGATE_TLS_CERT_FILE", settings.tls_cert_file),
        ("MLGATE_TLS_KEY_FILE", settings.tls_key_file),
        ("MLGATE_MODEL_REPOSITORY", settings.model_repository),
        ("MLGATE_PROFILES_DIR", settings.profiles_dir),
        ("MLGATE_DATA_DIR", settings.data_dir),
    )
    for name, value in candidates:
        if not value:
            continue
        named = Path(value).absolute()
        # The path itself, a file under it, or a directory on the way to it (a file
        # where its parent directory should be).
        if path == named or named in path.parents or path in named.parents:
            return f"{name}={value}"
    return f"the file {path}"
