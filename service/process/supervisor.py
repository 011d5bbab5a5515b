"""Supervisor: runs ``workers`` serving processes on one port and keeps them running.

Each child binds with ``SO_REUSEPORT`` and has its own workers and data directory
(``<data_dir>/worker-<i>``); the supervisor refuses a port another service holds (exit
2), forwards SIGTERM/SIGINT/SIGHUP (and a child drains as on SIGTERM if the supervisor
dies without one), restarts a
child that dies (after 0.5 s, doubling with each death in a minute up to 30 s), gives
up when one cannot start or dies ``MAX_DEATHS`` times in a minute (a crash loop: it
stops the others and exits 1, for systemd or the platform to see and restart the
whole) — but a restarted child that meets a start-up error of a file or setting (exit
2) while others serve is tried again every 30 s, said in the log, the status line,
``mlgate_worker_restarts_total{reason="cannot_start"}`` and the others' /ready, and a
later stop exits 1 — and prepares prometheus-client's
multiprocess directory so a scrape of any child sums all of them. systemd hears
READY=1 from the supervisor once every child serves.
"""

from __future__ import annotations

import ctypes
import fcntl
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import msgspec
import structlog

from mlgate.config import Settings
from mlgate.service.process import systemd
from mlgate.service.process.server import reload_status, run

log = structlog.get_logger("mlgate.supervisor")

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
Heartbeat = Any  # multiprocessing's shared ``Value("d")``: ``.value``, a float


def _child(
    settings_json: bytes,
    ready: ProcessEvent,
    supervisor: int,
    beat: Heartbeat,
    reloads: Any,
    cannot_start: Heartbeat,
    restarted: bool,
) -> None:
    if not _stops_with(supervisor):
        return  # the supervisor died before this child could watch it
    # The supervisor is systemd's main process and speaks for all (NotifyAccess=main).
    os.environ.pop("NOTIFY_SOCKET", None)
    from mlgate.service.http.logs import configure_logging

    settings = msgspec.json.decode(settings_json, type=Settings)
    configure_logging(settings.log_level, worker=settings.worker_index)
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir and os.path.exists(os.path.join(metrics_dir, METRICS_DIR_LOCK)):
        _hold_metrics_dir(metrics_dir)  # held until this process ends
    raise SystemExit(
        run(
            settings,
            on_ready=ready.set,
            on_turn=lambda: _beat(beat),
            on_reloaded=lambda failed: reloads.put((settings.worker_index, failed)),
            host_problem=lambda: _siblings_problem(int(cannot_start.value), settings.workers),
            restarted=restarted,
        )
    )


def _siblings_problem(cannot_start: int, workers: int) -> str | None:
    if not cannot_start:
        return None
    return (
        f"{cannot_start} of this host's {workers} processes cannot start again (a start-up "
        "error of a file or setting: the supervisor's log says which); the others serve"
    )


def _beat(beat: Heartbeat) -> None:
    beat.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process


def _stops_with(supervisor: int) -> bool:
    """Have the kernel send this process SIGTERM (a graceful drain) when the supervisor
    dies, however it dies: a review saw a supervisor killed with SIGKILL leave its
    children serving under init, holding the port and the data directories, so every
    restart of the service failed on their locks. False if it is gone already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == supervisor  # checked after: it may have died before prctl


def port_in_use(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` without ``SO_REUSEPORT`` meets, if any: the
    children bind with it, so another service's group of processes sharing the port
    would otherwise let them in beside it (a review: requests split between the two
    services, each writing its own data directory). ``SO_REUSEADDR`` as asyncio sets
    it, so connections in TIME_WAIT do not count."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc
    return None


# A child's exit code for a start-up error of the operator's (``server.run``).
START_UP_ERROR = 2


class Supervisor:
    """Runs ``settings.workers`` serving processes and keeps them running.

    Signal handlers only record what arrived; the watch loop forwards it, so a child
    spawned while a signal arrives still gets it. SIGHUP goes to children that are up
    (one still starting reads everything fresh anyway). Exit code: 0 when every child
    drained in its budget, 1 when one did not, failed to start or had to be killed.
    """

    RESTART_BACKOFF_S = 0.5
    MAX_RESTART_BACKOFF_S = 30.0
    DEATH_WINDOW_S = 60.0
    MAX_DEATHS = 5
    # The children's start-up beyond their models' loads (each at most
    # ``MLGATE_MODEL_LOAD_TIMEOUT_S``, side by side).
    START_TIMEOUT_S = 120.0
    # How long the children's reloads may take before systemd hears it did not end.
    RELOAD_TIMEOUT_S = 60.0
    # Past the children's own shutdown budget, those still running are killed.
    KILL_GRACE_S = 2.0
    # A child's first heartbeat comes once its imports are done and its loop runs
    # (about 2 s here; a slow disk's cold cache, several times that): allowed as long
    # as a first start is (a review: with 30 s, a restart importing for 45 s was
    # killed again and again, its share of the host lost for good).
    FIRST_BEAT_WITHIN_S = START_TIMEOUT_S
    POLL_S = 0.05

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, tuple[BaseProcess, ProcessEvent]] = {}
        # When each child's event loop last turned (``serve``'s ``on_turn``), in
        # shared memory: a file would go stale on a full disk, a pipe fill up.
        self._beats: dict[int, Heartbeat] = {}
        # When each child was started: one silent since (no first beat within
        # ``FIRST_BEAT_WITHIN_S``: stuck in its imports, say) is hung too.
        self._spawned_at: dict[int, float] = {}
        self._stop_signal: int | None = None
        self._hangup = False
        self._stop_deadline: float | None = None
        self._signalled: set[int] = set()
        self._exit_code = 0
        self._deaths: dict[int, list[float]] = {}  # per child index, within the window
        self._respawn_at: dict[int, float] = {}
        self._count_restart: Callable[[str], None] = lambda reason: None  # until ``run``
        self._killed_hung: set[int] = set()  # children killed as hung, not yet reaped
        # SIGHUP's outcome, each child's (its index, the reload hooks that failed), for
        # systemd: the children cannot reach it (a review: with several processes a
        # reload, failed or not, told systemd nothing).
        self._reloads = self._context.SimpleQueue()
        self._reloading = False
        self._reload_waiting: set[int] = set()
        self._reload_failed: set[str] = set()
        self._reload_due = 0.0
        # Children that died and then met a start-up error of the operator's while
        # others served: tried again every ``MAX_RESTART_BACKOFF_S``, not a crash loop
        # (a review: a renewal the others had refused, read by a restarted child, stopped
        # the whole host). Their number is shared with the children, for /ready.
        self._cannot_start: set[int] = set()
        self._cannot_start_count = self._context.Value("i", 0, lock=False)
        # Whether the last reload's TLS hook failed: a process restarted then refuses a
        # certificate not valid now, as the others' reloads did (a host that started
        # with one and never reloaded restarts its processes on it, as it started).
        self._tls_refused = False

    def _spawn(self, index: int, restarted: bool = False) -> None:
        settings = msgspec.structs.replace(self._settings, worker_index=index)
        ready = self._context.Event()
        beat = self._beats[index] = self._context.Value("d", 0.0, lock=False)
        self._spawned_at[index] = time.monotonic()
        process = self._context.Process(
            target=_child,
            args=(
                msgspec.json.encode(settings), ready, os.getpid(), beat, self._reloads,
                self._cannot_start_count, restarted,
            ),
            name=f"mlgate-{index}",
        )
        process.start()
        self._children[index] = (process, ready)

    def run(self) -> int:
        """The exit code: as the class says, or 2 when the address is taken or a process
        met a start-up error of the operator's."""
        taken = port_in_use(self._settings.host, self._settings.port)
        if taken is not None:
            setting = f"MLGATE_HOST={self._settings.host}, MLGATE_PORT={self._settings.port}"
            log.error("start_up_failed", setting=setting, error=str(taken))
            print(f"mlgate: start-up error: {setting}: {taken}", file=sys.stderr)
            return 2
        owned_metrics = _prepare_metrics_dir()
        self._count_restart = _restart_counter()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            for index in range(self._settings.workers):
                self._spawn(index)
            if not self._wait_until_ready():
                failed = {
                    index: process.exitcode
                    for index, (process, _) in self._children.items()
                    if not process.is_alive()
                }
                log.error("worker_failed_to_start", exitcodes=failed)
                # A process that met a start-up error of the operator's (exit 2, its line
                # on stderr naming the setting) makes the whole exit 2, as one process.
                self._exit_code = 2 if 2 in failed.values() else 1
                self._stop_signal = signal.SIGTERM
            elif self._stop_signal is None:
                systemd.ready(f"{self._settings.workers} processes serving")
                log.info("supervisor_ready", workers=self._settings.workers)
            return self._watch()
        finally:
            if owned_metrics is not None:
                directory, lock = owned_metrics
                shutil.rmtree(directory, ignore_errors=True)
                os.close(lock)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._hangup = True
        elif self._stop_signal is None:
            self._stop_signal = signum

    def _wait_until_ready(self) -> bool:
        """True once every child has served (or a stop was asked for); False if one
        died before it served. One that died after it served is a death like any
        other, restarted by ``_watch`` (a review: a process killed while a sibling was
        still loading its model stopped the whole group, exit 1)."""
        deadline = time.monotonic() + self.START_TIMEOUT_S + self._settings.model_load_timeout_s
        extended_at = -math.inf
        while time.monotonic() < deadline and self._stop_signal is None:
            children = self._children.values()
            if any(not ready.is_set() and not process.is_alive() for process, ready in children):
                return False
            if all(ready.is_set() for _, ready in self._children.values()):
                return True
            if time.monotonic() - extended_at >= systemd.EXTEND_EVERY_S:
                systemd.starting()
                extended_at = time.monotonic()
            time.sleep(self.POLL_S)
        return self._stop_signal is not None

    def _watch(self) -> int:
        while True:
            self._deliver_signals()
            for index, (process, ready) in list(self._children.items()):
                if process.is_alive():
                    continue
                process.join()
                _mark_dead(process.pid, never_served=not ready.is_set() and process.exitcode == START_UP_ERROR)
                if self._stop_signal is not None:
                    del self._children[index]
                    # A child stopped before it was up had nothing in flight.
                    if process.exitcode != 0 and ready.is_set():
                        log.error("worker_stopped_badly", index=index, exitcode=process.exitcode)
                        self._exit_code = 1
                    continue
                del self._children[index]
                self._died(index, process.exitcode)
            self._started_again()
            self._kill_hung()
            self._respawn_due()
            if self._stop_signal is not None and not self._children:
                return self._exit_code
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                self._kill_remaining()
            time.sleep(self.POLL_S)

    def _collect_reloads(self) -> None:
        """The children's reload outcomes; once every child signalled has answered (or
        died, or ``RELOAD_TIMEOUT_S`` passed), systemd hears READY=1 and the status."""
        while not self._reloads.empty():
            index, failed = self._reloads.get()
            if index in self._reload_waiting:
                self._reload_waiting.discard(index)
                self._reload_failed.update(failed)
        if not self._reloading:
            return
        gone = {index for index in self._reload_waiting if index not in self._children}
        if gone or time.monotonic() > self._reload_due:
            self._reload_failed.add("a process did not answer")
            self._reload_waiting.clear()
        if not self._reload_waiting:
            self._reloading = False
            self._tls_refused = "tls" in self._reload_failed
            status = reload_status(self._reload_failed)
            if self._cannot_start:  # still so after the reload (a review: it said "reloaded")
                status += f"; {self._serving_status()}"
            systemd.ready(status)
            log.info("supervisor_reload_finished", failed=sorted(self._reload_failed))

    def _kill_hung(self) -> None:
        """Kill a child whose event loop has not turned for ``worker_timeout_s``, serving
        or still starting (its death is then a death as any other: restarted, and
        counted towards a crash loop). Hung, it still holds its share of the port: a
        review saw a stopped process leave half the connections, health checks
        included, unanswered while its siblings said ready; another saw one stuck in
        its start-up wait there for good, unsaid. Its loop turns while it starts (a
        model loads in a thread, Kafka and Redis are awaited). Not while stopping: the
        budget's own kill covers that."""
        if self._stop_signal is not None:
            return
        now = time.monotonic()
        for index, (process, ready) in self._children.items():
            # Silent since its last beat, or since it was started, its first beat then
            # given ``FIRST_BEAT_WITHIN_S`` more (a review: one stopped in its imports
            # waited there for good).
            beat = self._beats[index].value
            silent_s = now - (beat or self._spawned_at[index])
            allowed_s = self._settings.worker_timeout_s + (0.0 if beat else self.FIRST_BEAT_WITHIN_S)
            if silent_s <= allowed_s:
                continue
            if process.is_alive():
                log.error(
                    "worker_hung", index=index, pid=process.pid, silent_s=round(silent_s, 1),
                    serving=ready.is_set(), first_beat=bool(beat),
                )
                self._count_restart("hung")
                self._killed_hung.add(index)  # its death is this restart, not another
                process.kill()

    def _died(self, index: int, exitcode: int | None) -> None:
        now = time.monotonic()
        serving = sum(
            1 for other, (process, ready) in self._children.items()
            if other != index and process.is_alive() and ready.is_set()
        )
        if exitcode == START_UP_ERROR and serving:
            # A start-up error of a file or setting (its line on stderr names it), not
            # a crash: the others serve on what they loaded, so the host stays up and
            # this one is tried again, its file may be fixed. A later stop exits 1.
            self._cannot_start.add(index)
            self._cannot_start_count.value = len(self._cannot_start)
            self._exit_code = 1
            log.error(
                "worker_cannot_start", index=index, exitcode=exitcode, serving=serving,
                restart_in_s=self.MAX_RESTART_BACKOFF_S,
            )
            self._count_restart("cannot_start")
            systemd.notify(f"STATUS={self._serving_status()}")
            self._respawn_at[index] = now + self.MAX_RESTART_BACKOFF_S
            return
        deaths = [t for t in self._deaths.get(index, []) if now - t < self.DEATH_WINDOW_S]
        deaths.append(now)
        self._deaths[index] = deaths
        if len(deaths) >= self.MAX_DEATHS:
            log.error(
                "worker_crash_loop",
                index=index,
                exitcode=exitcode,
                deaths=len(deaths),
                window_s=self.DEATH_WINDOW_S,
            )
            self._exit_code = 1
            self._stop_signal = signal.SIGTERM
            # Told here: with no child left the watch returns before delivering it.
            systemd.stopping()
            return
        backoff = min(self.MAX_RESTART_BACKOFF_S, self.RESTART_BACKOFF_S * 2 ** (len(deaths) - 1))
        log.error("worker_died", index=index, exitcode=exitcode, restart_in_s=backoff)
        if index in self._killed_hung:
            self._killed_hung.discard(index)
        else:
            self._count_restart("died")
        self._respawn_at[index] = now + backoff

    def _serving_status(self) -> str:
        serving = sum(1 for process, ready in self._children.values() if process.is_alive() and ready.is_set())
        cannot = ", ".join(map(str, sorted(self._cannot_start)))
        return f"{serving} of {self._settings.workers} processes serving; cannot start: {cannot} (see the log)"

    def _started_again(self) -> None:
        """Children that could not start and now serve."""
        for index in list(self._cannot_start):
            child = self._children.get(index)
            if child is not None and child[1].is_set():
                self._cannot_start.discard(index)
                self._cannot_start_count.value = len(self._cannot_start)
                log.info("worker_started_again", index=index)
                serving = self._serving_status() if self._cannot_start else f"{self._settings.workers} processes serving"
                systemd.notify(f"STATUS={serving}")

    def _respawn_due(self) -> None:
        for index, due in list(self._respawn_at.items()):
            if self._stop_signal is not None:
                del self._respawn_at[index]
            elif time.monotonic() >= due:
                del self._respawn_at[index]
                self._spawn(index, restarted=self._tls_refused)

    def _deliver_signals(self) -> None:
        if self._hangup:
            self._hangup = False
            if not self._reloading:
                self._reloading = True
                systemd.reloading()
                self._reload_failed.clear()
            self._reload_due = time.monotonic() + self.RELOAD_TIMEOUT_S
            for index, (process, ready) in self._children.items():
                if ready.is_set() and process.pid is not None and process.is_alive():
                    os.kill(process.pid, signal.SIGHUP)
                    self._reload_waiting.add(index)
        self._collect_reloads()
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


def _prepare_metrics_dir() -> tuple[str, int] | None:
    """prometheus-client's multiprocess mode needs a shared directory, set before import.

    Without ``PROMETHEUS_MULTIPROC_DIR`` a private one is made and removed at exit (the
    directory and the descriptor of its lock, held shared for the supervisor's life).
    A given one is emptied of a previous run's files, which would otherwise be summed in.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
        return None
    _remove_orphaned_metrics_dirs()
    directory = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    lock = _hold_metrics_dir(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return directory, lock


METRICS_DIR_PREFIX = "mlgate-metrics-"
METRICS_DIR_LOCK = ".in-use.lock"
# A directory younger than this is never taken for an orphan: its maker may not hold
# its lock yet.
ORPHAN_MIN_AGE_S = 60.0


def _hold_metrics_dir(directory: str) -> int:
    """A shared lock on the metrics directory, held for the life of the process (the
    supervisor's and each child's): while any holds it, it is in use."""
    fd = os.open(os.path.join(directory, METRICS_DIR_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _remove_orphaned_metrics_dirs() -> None:
    """The private metrics directories that supervisors killed with SIGKILL left (a
    review: one per hard kill): removed once no process holds their lock, neither
    their supervisor nor a child still draining. A lock is the one test that holds
    across PID namespaces (containers sharing a /tmp; a pid test removed a live one's)
    and never touches a directory without one. Never fails start-up."""
    try:
        candidates = list(Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*"))
    except OSError:
        return
    for directory in candidates:
        try:
            _remove_if_orphaned(directory)
        except Exception as exc:  # someone else's, or racing us: left as it is
            log.info("metrics_dir_not_removed", path=str(directory), error=repr(exc))


def _remove_if_orphaned(directory: Path) -> None:
    if directory.is_symlink() or not directory.is_dir():
        return
    if time.time() - directory.stat().st_mtime < ORPHAN_MIN_AGE_S:
        return
    try:
        fd = os.open(directory / METRICS_DIR_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # not one of ours (or of an mlgate before locks): not ours to remove
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # in use
    finally:
        os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)
    log.info("metrics_dir_of_a_killed_supervisor_removed", path=str(directory))


def _restart_counter() -> Callable[[str], None]:
    """``mlgate_worker_restarts_total{reason}`` ("hung": killed for it; "died": exited
    and restarted), kept in the multiprocess directory, so a scrape of any process
    counts the supervisor's restarts (a review: only logged, nothing to alert on).
    The CLI imported prometheus-client before the directory was set: its value class
    is made for the directory now (the children, spawned, start afresh)."""
    from prometheus_client import CollectorRegistry, Counter, values

    values.ValueClass = values.MultiProcessValue()
    restarts = Counter(
        "mlgate_worker_restarts",
        "Serving processes the supervisor restarted, by reason (hung: killed for it; died; cannot_start: died again at start-up on a file or setting)",
        ["reason"],
        registry=CollectorRegistry(),
    )

    def count(reason: str) -> None:
        try:
            restarts.labels(reason).inc()
        except Exception as exc:  # its file gone: the count, not the supervision, is lost
            log.error("worker_restart_not_counted", reason=reason, error=repr(exc))

    return count


def _mark_dead(pid: int | None, never_served: bool = False) -> None:
    """Its live gauges let go of; ``never_served`` (a start-up error): its counters too,
    which hold nothing served (a review: a process retried every 30 s left two files a
    try, read by every scrape)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if pid is None or not directory:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
    if never_served:
        for left in Path(directory).glob(f"*_{pid}.db"):
            left.unlink(missing_ok=True)
