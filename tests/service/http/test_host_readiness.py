"""Several processes answer /ready as one host: each publishes its problems and reads
its siblings' (service.http.readiness)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mlgate.service.http.readiness import STALE_S, HostReadiness


def test_a_siblings_problem_is_the_hosts(tmp_path: Path) -> None:
    first, second = HostReadiness(str(tmp_path), 0, 2), HostReadiness(str(tmp_path), 1, 2)
    second.publish({"models": "the default model: failed to load version 1"})
    assert first.siblings() == {"worker 1": "models: the default model: failed to load version 1"}
    second.publish({})
    assert first.siblings() == {}


def _published_by(path: Path, pid: int) -> None:
    """``path`` as process ``pid`` wrote it, longer ago than ``STALE_S``."""
    path.write_bytes(path.read_bytes().replace(f'"pid":{os.getpid()}'.encode(), f'"pid":{pid}'.encode()))
    old = time.time() - STALE_S - 1
    os.utime(path, (old, old))


def test_a_sibling_gone_since_it_last_published_is_left_out(tmp_path: Path) -> None:
    first, second = HostReadiness(str(tmp_path), 0, 2), HostReadiness(str(tmp_path), 1, 2)
    second.publish({"sink": "closed"})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # exited and reaped: its socket closed with it
    _published_by(tmp_path / "ready" / "worker-1.json", gone.pid)
    assert first.siblings() == {}


def test_a_sibling_still_running_that_stopped_publishing_is_named_not_answering(
    tmp_path: Path,
) -> None:
    """A review: a worker stopped (SIGSTOP) kept its share of the connections and
    answered none, while /ready, from its sibling, said the host was ready."""
    first, second = HostReadiness(str(tmp_path), 0, 2), HostReadiness(str(tmp_path), 1, 2)
    second.publish({})
    stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _published_by(tmp_path / "ready" / "worker-1.json", stopped.pid)
        [(name, problem)] = first.siblings().items()
    finally:
        stopped.kill()
        stopped.wait()
    assert name == "worker 1" and problem.startswith("not answering")


def test_a_process_alone_or_not_yet_published_reads_nothing(tmp_path: Path) -> None:
    assert HostReadiness(str(tmp_path), 0, 2).siblings() == {}
    assert HostReadiness(str(tmp_path), 0, 1).siblings() == {}


def test_a_file_that_cannot_be_written_is_logged_once_not_every_second(tmp_path: Path) -> None:
    import structlog.testing

    (tmp_path / "ready").write_text("a file where the directory should be")
    host = HostReadiness(str(tmp_path), 0, 2)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            host.publish({})  # never raises: the sampler would log it each second
    assert [entry["event"] for entry in logs] == ["readiness_not_published"]


async def test_a_model_repository_that_is_no_directory_is_named_as_why_not_ready(
    app_client, make_settings, tmp_path
) -> None:
    """A review: a mistyped MLGATE_MODEL_REPOSITORY left the host unready, the reason
    naming only the default model."""
    client = await app_client(make_settings(model_repository=str(tmp_path / "mistyped")))
    response = await client.get("/ready")
    assert response.status == 503
    reasons = (await response.json())["reasons"]
    assert "is no directory" in reasons["models"] and "mistyped" in reasons["models"]
