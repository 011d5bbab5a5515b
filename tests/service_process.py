"""``mlgate serve`` as a real process: for tests of signals, sockets, exit codes.

The process gets a clean environment (nothing ``MLGATE_*``, ``NOTIFY_SOCKET`` or
``PROMETHEUS_MULTIPROC_DIR`` leaks in from the caller), its own session so a stuck
supervisor and its children can be killed together by process-group id, and its
output in a file the test can read (JSON log lines, unbuffered).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_NOT_INHERITED = ("NOTIFY_SOCKET", "PORT", "WEB_CONCURRENCY", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")


def service_environment(port: int, data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MLGATE_") and name not in _NOT_INHERITED
    }
    env.update(
        PYTHONUNBUFFERED="1",
        MLGATE_HOST="127.0.0.1",
        MLGATE_PORT=str(port),
        MLGATE_DATA_DIR=str(data_dir),
        MLGATE_FEATURE_DIMS="4",
        MLGATE_MODEL_POLL_INTERVAL_S="0",
        MLGATE_MODEL_REPOSITORY=str(REPO / "models"),
        MLGATE_AUTH_DISABLED="true",
    )
    env.update(overrides)
    return env


@dataclass
class ServiceProcess:
    port: int
    data_dir: Path
    output: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    scheme: str = "http"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlgate", "serve", *self.args],
                cwd=REPO,
                env=service_environment(self.port, self.data_dir, **self.env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_until_listening(timeout)

    def wait_until_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"mlgate exited before listening:\n{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"mlgate did not listen on {self.port}:\n{self.tail()}")

    def send(self, signum: signal.Signals) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    async def exit_code(self) -> int:
        """Wait for the exit without blocking the test's event loop (bound it by the caller)."""
        assert self.process is not None
        if (code := self.process.poll()) is not None:
            return code
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        pidfd = os.pidfd_open(self.process.pid)  # readable once the process has exited
        try:
            loop.add_reader(pidfd, exited.set)
            try:
                await exited.wait()
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        return self.process.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole process group if it does not go."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        found = []
        for line in self.output.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])


def child_pids(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (zombies excluded)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            children.add(int(entry.name))
    return children


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(30)
            yield path, sock


def receive_until(sock: socket.socket, state: str) -> list[str]:
    """Every notification up to and including the first one carrying ``state``."""
    received = []
    while True:
        message = sock.recv(4096).decode()
        received.append(message)
        if state in message.split("\n"):
            return received
