"""Several processes answer /ready as one host: each publishes its problems and reads
its siblings' (service.http.readiness)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mlgate.service.http.readiness import STALE_S, HostReadiness


def test_a_siblings_problem_is_the_hosts(tmp_path: Path) -> None:
    first, second = HostReadiness(str(tmp_path), 0, 2), HostReadiness(str(tmp_path), 1, 2)
    second.publish({"models": "the default model: failed to load version 1"})
    assert first.siblings() == {"worker 1": "models: the default model: failed to load version 1"}
    second.publish({})
    assert first.siblings() == {}


def test_a_sibling_that_stopped_publishing_is_left_out(tmp_path: Path) -> None:
    first, second = HostReadiness(str(tmp_path), 0, 2), HostReadiness(str(tmp_path), 1, 2)
    second.publish({"sink": "closed"})
    old = time.time() - STALE_S - 1
    os.utime(tmp_path / "ready" / "worker-1.json", (old, old))  # gone: its socket with it
    assert first.siblings() == {}


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
