"""ModelRepository: Triton layout, version policies, hot reload, failures that do not spread."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper
from structlog.testing import capture_logs

from mlgate.config import Settings
from mlgate.workers.errors import WorkerClosed
from mlgate.workers.inference import model_config as model_config_module
from mlgate.workers.inference import repository as repository_module
from mlgate.workers.inference.model_config import ModelConfig, TensorSpec
from mlgate.workers.inference.repository import (
    IndexEntry,
    ModelLoadFailed,
    ModelNotFound,
    ModelRepository,
    ModelUnavailable,
)
from models.make_demo_model import build_mlp
from tests.onnx_models import model_of
from tests.slow_models import looping_model
from tests.support import until


def add_version(
    root: Path, model: str, version: int, *, seed: int = 1, body: bytes | None = None
) -> Path:
    """Write ``<root>/<model>/<version>/model.onnx`` atomically (build aside, rename in)."""
    staging = root / model / f".staging-{version}"
    staging.mkdir(parents=True)
    data = body if body is not None else build_mlp(seed=seed).SerializeToString()
    (staging / "model.onnx").write_bytes(data)
    final = root / model / str(version)
    os.rename(staging, final)
    return final


def write_config(root: Path, model: str, **config: Any) -> None:
    (root / model).mkdir(parents=True, exist_ok=True)
    (root / model / "config.json").write_text(json.dumps(config))


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32)


def soon() -> float:
    return time.monotonic() + 5


async def predict(
    repo: ModelRepository, model: str = "demo", version: str | None = None
) -> tuple[str, np.ndarray]:
    loaded, future = repo.submit(model, version, rows(1), soon())
    return loaded.version, (await future)["probabilities"]


@pytest.fixture
def repo_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


@pytest.fixture
async def start_repository(
    make_settings: Callable[..., Settings], repo_root: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[ModelRepository] = []

    async def start(**overrides: Any) -> ModelRepository:
        settings = make_settings(model_repository=str(repo_root), **overrides)
        repo = ModelRepository(settings)
        await repo.start()
        started.append(repo)
        return repo

    yield start
    for repo in started:
        await repo.close()


async def test_latest_version_serves_with_metadata_from_the_graph(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "demo", 2, seed=2)
    repo = await start_repository()
    latest = repo.resolve("demo")
    assert latest.version == "2" and repo.versions("demo") == ["2"]
    assert latest.inputs == (TensorSpec("input", "FP32", (-1, 128)),)
    assert latest.outputs == (TensorSpec("probabilities", "FP32", (-1, 2)),)
    assert latest.kind == "classifier" and latest.batchable
    assert repo.ready


async def test_version_policy_all_serves_every_version(
    repo_root: Path, start_repository: Any
) -> None:
    for version in (1, 2, 3):
        add_version(repo_root, "demo", version, seed=version)
    write_config(repo_root, "demo", version_policy="all")
    repo = await start_repository()
    assert repo.versions("demo") == ["1", "2", "3"]
    assert repo.resolve("demo", "1").version == "1"
    assert repo.resolve("demo").version == "3"


async def test_version_policy_specific_serves_only_those(
    repo_root: Path, start_repository: Any
) -> None:
    for version in (1, 2, 3):
        add_version(repo_root, "demo", version, seed=version)
    write_config(repo_root, "demo", version_policy={"specific": [1, 3]}, max_batch_size=8)
    repo = await start_repository()
    assert repo.versions("demo") == ["1", "3"]
    assert repo.resolve("demo").max_batch_size == 8
    with pytest.raises(ModelNotFound):
        repo.resolve("demo", "2")


async def test_unknown_model_or_version_is_not_found(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    with pytest.raises(ModelNotFound):
        repo.resolve("nope")
    with pytest.raises(ModelNotFound):
        repo.resolve("demo", "9")


async def test_new_version_becomes_latest_without_failing_in_flight_requests(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1, seed=1)
    repo = await start_repository()
    old_worker = repo.resolve("demo").worker
    stop = asyncio.Event()
    served: list[str] = []

    async def client() -> None:
        while not stop.is_set():
            version, _ = await predict(repo)
            served.append(version)

    clients = [asyncio.create_task(client()) for _ in range(16)]
    await asyncio.sleep(0.05)
    add_version(repo_root, "demo", 2, seed=2)
    await repo.poll()
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*clients)  # any failed request would raise here
    assert repo.resolve("demo").version == "2"
    assert served[0] == "1" and served[-1] == "2"
    assert not old_worker.running and old_worker.mailbox_depth == 0


@pytest.mark.parametrize("name", ["my model", "a+b", "modèle"])
async def test_a_model_directory_of_any_plain_name_is_served(
    repo_root: Path, start_repository: Any, name: str
) -> None:
    """As Triton serves any directory name (its clients quote them in the URL)."""
    add_version(repo_root, name, 1)
    repo = await start_repository()
    assert repo.resolve(name).version == "1"
    assert IndexEntry(name, "1", "READY") in repo.index()


async def test_a_hidden_model_directory_is_not_served_and_is_logged_once(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, ".hidden", 1)
    with capture_logs() as logs:
        repo = await start_repository()
        await repo.poll()
    with pytest.raises(ModelNotFound):
        repo.resolve(".hidden")
    ignored = [entry for entry in logs if entry["event"] == "model_directory_ignored"]
    assert [entry["name"] for entry in ignored] == [".hidden"]


@pytest.mark.parametrize("name", ["..", ".", "../models/demo", "demo\n"])
async def test_a_model_name_that_would_leave_the_repository_is_not_found(
    repo_root: Path, start_repository: Any, name: str
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    with pytest.raises(ModelNotFound):
        repo.resolve(name)


async def test_broken_version_is_reported_and_the_old_one_keeps_serving(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    add_version(repo_root, "demo", 2, body=b"this is not an onnx model")
    await repo.poll()
    assert (await predict(repo))[0] == "1"
    entry = next(e for e in repo.index() if e.version == "2")
    assert entry.state == "UNAVAILABLE" and "failed to load version 2" in entry.reason
    assert IndexEntry("demo", "1", "READY") in repo.index()
    assert repo.ready


async def test_broken_reload_of_a_serving_version_keeps_the_loaded_one(
    repo_root: Path, start_repository: Any
) -> None:
    path = add_version(repo_root, "demo", 1)
    repo = await start_repository()
    (path / "model.onnx").write_bytes(b"truncated")
    await repo.poll()
    assert (await predict(repo))[0] == "1"
    entry = repo.index()[0]
    assert entry.state == "READY" and "keeps serving" in entry.reason


async def test_a_serving_versions_file_become_a_link_to_nowhere_keeps_the_loaded_one(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: a model file turned into a link to nowhere (a blob-store mount gone)
    retired the serving version as if removed: 404s, an info line, no failure counted."""
    path = add_version(repo_root, "demo", 1)
    repo = await start_repository()
    (path / "model.onnx").unlink()
    os.symlink("/nonexistent/model.onnx", path / "model.onnx")
    await repo.poll()
    assert (await predict(repo))[0] == "1"
    entry = repo.index()[0]
    assert entry.state == "READY" and "keeps serving" in entry.reason


def fails_at_run_time() -> bytes:
    """A valid graph whose first run fails: 128 values cannot be reshaped to [3, -1]."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, -1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["output"])],
        "fails",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 128])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [3, None])],
        [shape],
    )
    return bytes(model_of(graph).SerializeToString())


async def test_version_that_fails_its_warm_up_run_is_never_served(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "demo", 2, body=fails_at_run_time())
    write_config(repo_root, "demo", version_policy="all")
    repo = await start_repository()
    assert repo.versions("demo") == ["1"]
    entry = next(e for e in repo.index() if e.version == "2")
    assert entry.state == "UNAVAILABLE" and "Reshape" in entry.reason


async def test_invalid_config_is_reported_without_unloading(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    write_config(repo_root, "demo", max_batch_size=0)
    await repo.poll()
    assert (await predict(repo))[0] == "1"
    assert "max_batch_size" in repo.index()[0].reason


@pytest.mark.parametrize(
    "config",
    [
        '{"max_queue_delay_ms": NaN}',
        '{"max_queue_delay_ms": Infinity}',
        '{"max_queue_delay_ms": 1e300}',
        '{"max_batch_size": 1000000000000000000000}',
        '{"version_policy": {"latest": true}}',
        '{"version_policy": {"specific": [1, 1]}}',
        '{"version_policy": {"specific": [1, -3]}}',
    ],
)
async def test_config_values_out_of_bounds_are_reported_and_the_old_load_keeps_serving(
    repo_root: Path, start_repository: Any, config: str
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    (repo_root / "demo" / "config.json").write_text(config)
    await repo.poll()
    assert (await predict(repo))[0] == "1"
    [entry] = repo.index()
    assert entry.reason.startswith("config.json: ")
    assert entry.reason.endswith("the previous load keeps serving")


async def test_a_symbolic_link_loop_in_a_model_directory_is_passed_over(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    os.symlink("junk", repo_root / "demo" / "junk")  # a link to itself
    repo = await start_repository()
    add_version(repo_root, "demo", 2, seed=2)
    await repo.poll()
    assert repo.versions("demo") == ["2"]
    assert [entry.version for entry in repo.index()] == ["1", "2"]


async def test_a_config_linked_to_itself_is_an_invalid_config(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    os.symlink("config.json", repo_root / "demo" / "config.json")
    await repo.poll()
    assert (await predict(repo))[0] == "1"
    [entry] = repo.index()
    assert entry.reason.startswith("config.json: ") and "keeps serving" in entry.reason


def unblock_later(fifo: Path, after_s: float) -> threading.Timer:
    """Writes to ``fifo`` after ``after_s`` if a reader waits on it: a regression then
    fails its test rather than hanging the run."""

    def unblock() -> None:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader: nothing waits
            return
        os.write(fd, b"{}")
        os.close(fd)

    timer = threading.Timer(after_s, unblock)
    timer.start()
    return timer


async def test_a_fifo_as_config_is_an_invalid_config_and_stops_nothing(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: a FIFO as a model's config.json stopped the whole event loop, /health
    included, until something wrote to it; nothing was logged."""
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    fifo = repo_root / "demo" / "config.json"
    os.mkfifo(fifo)
    timer = unblock_later(fifo, 5)
    try:
        await repo.poll()
    finally:
        timer.cancel()
    assert (await predict(repo))[0] == "1"
    [entry] = repo.index()
    assert "not a regular file" in entry.reason and "keeps serving" in entry.reason


async def test_a_config_json_is_read_again_only_once_it_changed(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a 35 MB config.json was read and parsed at every poll, 0.4 s of the
    loop each time."""
    add_version(repo_root, "demo", 1)
    (repo_root / "demo" / "config.json").write_text(json.dumps({"kind": "classifier"}))
    repo = await start_repository()
    reads: list[Path] = []
    original = repository_module.read_config
    def counted(model_dir: Path, settings: Settings) -> Any:
        reads.append(model_dir)
        return original(model_dir, settings)

    monkeypatch.setattr(repository_module, "read_config", counted)
    await repo.poll()
    await repo.poll()
    assert reads == []
    (repo_root / "demo" / "config.json").write_text(json.dumps({"kind": "classifier", "max_batch_size": 8}))
    await repo.poll()
    assert reads == [repo_root / "demo"]


async def test_a_config_json_that_could_not_be_read_is_read_again_at_the_next_poll(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a config.json unreadable once (permissions, since fixed) stayed an
    error until the file itself changed."""
    add_version(repo_root, "demo", 1)
    (repo_root / "demo" / "config.json").write_text(json.dumps({"kind": "classifier"}))
    repo = await start_repository()
    (repo_root / "demo" / "config.json").write_text(json.dumps({"kind": "classifier", "max_batch_size": 8}))
    real = model_config_module.read_regular

    def denied(path: Path, most: int, what: str) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_config_module, "read_regular", denied)
    await repo.poll()
    assert "Permission denied" in repo.index()[0].reason
    monkeypatch.setattr(model_config_module, "read_regular", real)  # the operator's chmod
    await repo.poll()
    assert repo.index()[0].reason == ""
    assert repo.resolve("demo", None).max_batch_size == 8


async def test_a_config_json_edited_keeping_its_size_and_times_is_applied(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: a copy keeping the times (``cp -p``, a build's fixed times) of a file
    of the same length was never applied."""
    add_version(repo_root, "demo", 1)
    path = repo_root / "demo" / "config.json"
    path.write_text(json.dumps({"max_batch_size": 16}))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    repo = await start_repository()
    assert repo.resolve("demo", None).max_batch_size == 16
    path.write_text(json.dumps({"max_batch_size": 32}))  # the same length, in place
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    await repo.poll()
    assert repo.resolve("demo", None).max_batch_size == 32


async def test_a_model_or_config_files_mode_links_or_access_time_alone_reload_nothing(
    repo_root: Path, start_repository: Any, tmp_path: Path
) -> None:
    """A review: with the status change time in the fingerprint, a chmod, a backup's
    hard link or an access-time touch reloaded the model, its statistics reset."""
    path = add_version(repo_root, "demo", 1)
    config = repo_root / "demo" / "config.json"
    config.write_text(json.dumps({"max_batch_size": 16}))
    repo = await start_repository()
    loaded = repo.resolve("demo", None)
    os.chmod(path / "model.onnx", 0o600)
    os.link(path / "model.onnx", tmp_path / "backup.onnx")
    os.chmod(config, 0o600)
    os.utime(config, ns=(5, config.stat().st_mtime_ns))
    await repo.poll()
    assert repo.resolve("demo", None) is loaded


async def test_an_unchanged_config_is_not_hashed_again_at_each_poll(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: its hash, per version at each poll on the event loop, took 260 ms a
    poll for a million labels and 40 versions."""
    for version in (1, 2, 3):
        add_version(repo_root, "demo", version)
    (repo_root / "demo" / "config.json").write_text(json.dumps({"version_policy": "all"}))
    repo = await start_repository()
    hashed: list[int] = []
    original = ModelConfig.__hash__

    def counted(config: ModelConfig) -> int:
        hashed.append(1)
        return original(config)

    monkeypatch.setattr(ModelConfig, "__hash__", counted)
    await repo.poll()
    await repo.poll()
    assert hashed == []
    assert repo.versions("demo") == ["1", "2", "3"]


async def test_a_config_json_become_a_directory_is_refused_by_name(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    (repo_root / "demo" / "config.json").mkdir()
    await repo.poll()
    reason = repo.index()[0].reason
    assert "not a regular file" in reason and "Errno" not in reason


async def test_a_model_file_linked_elsewhere_and_back_is_ready_without_the_failure(
    repo_root: Path, start_repository: Any, tmp_path: Path
) -> None:
    """A review: a mount gone and back left "failed to load" in the index for good."""
    path = add_version(repo_root, "demo", 1)
    mount = tmp_path / "mount"
    mount.mkdir()
    os.rename(path / "model.onnx", mount / "m.onnx")
    os.symlink(mount / "m.onnx", path / "model.onnx")
    repo = await start_repository()
    os.rename(mount / "m.onnx", mount / "gone.onnx")
    await repo.poll()
    assert "failed to load" in repo.index()[0].reason
    os.rename(mount / "gone.onnx", mount / "m.onnx")
    await repo.poll()
    assert repo.index()[0] == IndexEntry("demo", "1", "READY")
    assert (await predict(repo))[0] == "1"


async def test_of_two_directories_naming_one_version_the_one_written_as_the_number_serves(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 10)
    (repo_root / "demo" / "010").mkdir()
    (repo_root / "demo" / "010" / "model.onnx").write_bytes(b"garbage")
    repo = await start_repository()
    assert repo.versions("demo") == ["10"]
    assert [entry.version for entry in repo.index()] == ["10"]


async def test_a_zero_padded_version_directory_is_its_version(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: 0001 was served as version 1, then dropped without a word."""
    (repo_root / "demo").mkdir()
    os.rename(add_version(repo_root, "demo", 1), repo_root / "demo" / "0001")
    repo = await start_repository()
    assert repo.versions("demo") == ["1"]


async def test_a_failed_version_the_policy_no_longer_wants_is_not_served_nor_failed(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: version 2 failed by a bad config stayed failed (503, retry) after the
    config was fixed to a policy that does not want it."""
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "demo", 2, seed=2)
    write_config(repo_root, "demo", max_batch_size=0, version_policy="all")
    repo = await start_repository()
    assert all(entry.failed for entry in repo.index())
    write_config(repo_root, "demo", version_policy={"specific": [1]})
    await repo.poll()
    assert repo.versions("demo") == ["1"]
    entry = next(e for e in repo.index() if e.version == "2")
    assert not entry.failed and entry.reason == "unloaded: not in the version policy"
    with pytest.raises(ModelNotFound):
        repo.resolve("demo", "2")


async def test_an_explicit_load_whose_reload_fails_is_a_failure_though_the_old_serves(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    write_config(repo_root, "demo", max_batch_size=0)
    with pytest.raises(ModelLoadFailed, match="max_batch_size.*previous load keeps serving"):
        await repo.load("demo")
    write_config(repo_root, "demo")
    add_version(repo_root, "demo", 2, body=b"garbage")
    with pytest.raises(ModelLoadFailed, match="failed to load version 2"):
        await repo.load("demo")
    assert (await predict(repo))[0] == "1"


async def test_a_failed_load_names_its_file_within_the_repository_not_on_disk(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1, body=b"garbage")
    repo = await start_repository()
    [entry] = repo.index()
    assert "<repository>/demo/1/model.onnx" in entry.reason
    assert str(repo_root) not in entry.reason


async def test_an_explicit_load_after_a_poll_failed_the_same_file_still_fails(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: the poll marked the file failed again before the load's turn, and the
    load skipped it, saying nothing was wrong."""
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    add_version(repo_root, "demo", 2, body=b"garbage")
    poll, load = repo.poll(), repo.load("demo")
    results = await asyncio.gather(poll, load, return_exceptions=True)
    assert isinstance(results[1], ModelLoadFailed)
    assert (await predict(repo))[0] == "1"


async def test_removed_version_directory_is_retired(repo_root: Path, start_repository: Any) -> None:
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "demo", 2, seed=2)
    write_config(repo_root, "demo", version_policy="all")
    repo = await start_repository()
    (repo_root / "demo" / "2" / "model.onnx").unlink()
    await repo.poll()
    assert repo.versions("demo") == ["1"]
    assert IndexEntry("demo", "2", "UNAVAILABLE", "removed from the repository") in repo.index()


async def test_unload_stops_serving_until_load_and_polling_leaves_it_alone(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    await repo.unload("demo")
    await repo.poll()
    with pytest.raises(ModelNotFound):
        repo.resolve("demo")
    assert repo.index() == [IndexEntry("demo", "1", "UNAVAILABLE", "unloaded")]
    assert not repo.ready
    await repo.load("demo")
    assert (await predict(repo))[0] == "1"


async def test_an_unload_during_a_poll_that_listed_the_model_sticks(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the poll listed "b" before its awaits, an unload of "b" waited for the
    poll's load of "a", then the poll loaded "b" again and it served for good."""
    add_version(repo_root, "a", 1)
    add_version(repo_root, "b", 1)
    repo = await start_repository()
    add_version(repo_root, "a", 2, seed=2)  # the next poll loads it, slowly
    loading_a, a_may_finish = asyncio.Event(), asyncio.Event()
    load_version = repo._load_version

    async def slow_for_a(name: str, *args: Any) -> Any:
        if name == "a":
            loading_a.set()
            await a_may_finish.wait()
        return await load_version(name, *args)

    monkeypatch.setattr(repo, "_load_version", slow_for_a)
    poll = asyncio.create_task(repo.poll())
    await asyncio.wait_for(loading_a.wait(), 5)
    # Not behind "a"'s load: each model has its own turn.
    await asyncio.wait_for(repo.unload("b"), 5)
    a_may_finish.set()
    await poll
    with pytest.raises(ModelNotFound):
        repo.resolve("b")
    assert repo.resolve("a").version == "2"


async def _with_a_broken_model(repo_root: Path, start_repository: Any) -> Any:
    """A started repository serving "demo" 1, beside "broken" 1 that cannot load."""
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "broken", 1, body=b"garbage")
    return await start_repository()


async def test_explicit_load_of_a_broken_model_raises_with_the_reason(
    repo_root: Path, start_repository: Any
) -> None:
    repo = await _with_a_broken_model(repo_root, start_repository)
    with pytest.raises(ModelLoadFailed, match="failed to load version 1"):
        await repo.load("broken")
    with pytest.raises(ModelNotFound):
        await repo.load("absent")


async def test_a_model_that_failed_to_load_is_unavailable_not_unknown(
    repo_root: Path, start_repository: Any
) -> None:
    repo = await _with_a_broken_model(repo_root, start_repository)
    with pytest.raises(ModelUnavailable, match="failed to load version 1"):
        repo.resolve("broken")
    with pytest.raises(ModelUnavailable):
        repo.resolve("broken", "1")
    with pytest.raises(ModelNotFound) as unknown:
        repo.resolve("broken", "2")  # no such version: unknown, as before
    assert not isinstance(unknown.value, ModelUnavailable)
    await repo.unload("demo")  # an operator's unload: not a failure
    with pytest.raises(ModelNotFound) as unloaded:
        repo.resolve("demo")
    assert not isinstance(unloaded.value, ModelUnavailable)


async def test_polling_picks_up_a_new_version_by_itself(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    repo = await start_repository(model_poll_interval_s=0.05)
    add_version(repo_root, "demo", 2, seed=2)

    async def until_latest_is_2() -> None:
        while repo.resolve("demo").version != "2":
            await repo.wait_changed()

    await asyncio.wait_for(until_latest_is_2(), 5)
    assert (await predict(repo))[0] == "2"


async def test_not_ready_without_the_default_model(repo_root: Path, start_repository: Any) -> None:
    add_version(repo_root, "other", 1)
    repo = await start_repository()
    assert repo.versions("other") == ["1"] and not repo.ready


async def test_names_that_leave_the_repository_are_not_models(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    add_version(repo_root.parent, "outside", 1)
    repo = await start_repository()
    for name in ("..", ".", "../outside", ".hidden"):
        with pytest.raises(ModelNotFound):
            await repo.load(name)
        with pytest.raises(ModelNotFound):
            await repo.unload(name)
    assert [e.name for e in repo.index()] == ["demo"]


async def test_a_load_that_never_ends_times_out_and_its_version_is_unavailable(
    repo_root: Path, start_repository: Any
) -> None:
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "stuck", 1, body=looping_model(trips=10**12).SerializeToString())
    started = time.monotonic()
    repo = await start_repository(model_load_timeout_s=0.5)
    assert time.monotonic() - started < 5
    entry = next(e for e in repo.index() if e.name == "stuck")
    assert entry.state == "UNAVAILABLE" and "took longer than 0.5 s" in entry.reason
    assert (await predict(repo))[0] == "1"
    assert repo.ready
    # The warm-up run was told to end: no thread is left computing it.
    deadline = time.monotonic() + 5
    while any(t.name == "model-loader" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_refusing_waiting_requests_reaches_a_version_replaced_and_still_draining(
    repo_root: Path, start_repository: Any
) -> None:
    """A shutdown's refusal (``refuse_waiting``) answers the requests of a version a
    poll replaced just before, still draining, too (a review: they were cut)."""
    add_version(repo_root, "demo", 1, body=looping_model().SerializeToString())
    repo = await start_repository()
    _, endless = repo.submit("demo", None, np.full((1, 128), 1e12, np.float32), time.monotonic() + 60)
    await asyncio.sleep(0.3)  # computing, for ever
    add_version(repo_root, "demo", 2, seed=2)
    await repo.poll()
    assert repo.versions("demo") == ["2"]  # version 1 retired, draining its run
    assert repo.refuse_waiting("the server is shutting down") == 1
    with pytest.raises(WorkerClosed, match="shutting down"):
        await asyncio.wait_for(endless, 5)


async def test_a_version_directory_named_by_a_non_ascii_digit_is_not_a_version(
    repo_root: Path, start_repository: Any
) -> None:
    """``²`` is a digit to ``str.isdigit`` and not a number to ``int``: it failed every
    poll, and the index, at its model."""
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "demo", 2, seed=2)
    os.rename(repo_root / "demo" / "2", repo_root / "demo" / "²")
    repo = await start_repository()
    assert repo.versions("demo") == ["1"]
    assert [(e.name, e.version) for e in repo.index()] == [("demo", "1")]


async def test_a_model_whose_poll_fails_does_not_stop_the_others_polling(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_version(repo_root, "broken", 1)
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    synced = repo._sync

    async def failing_for_broken(name: str) -> None:
        if name == "broken":
            raise PermissionError(13, "Permission denied", name)
        await synced(name)

    monkeypatch.setattr(repo, "_sync", failing_for_broken)
    crashed: list[str] = []
    monkeypatch.setattr(repo._telemetry, "background_task_crashed", crashed.append, raising=False)
    add_version(repo_root, "demo", 2, seed=2)
    await repo.poll()  # "broken" sorts first
    assert repo.resolve("demo").version == "2"
    assert crashed == ["model-sync"]  # logged and counted


async def test_a_slow_load_holds_up_no_other_models_new_version(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the poll loaded model by model, and a model whose load took 20 s kept
    every other model's new version (the default model's too) waiting that long."""
    add_version(repo_root, "demo", 1)
    repo = await start_repository(model_poll_interval_s=0.05)
    loading_slow, slow_may_finish = asyncio.Event(), asyncio.Event()
    load_version = repo._load_version

    async def slow(name: str, *args: Any) -> Any:
        if name == "slow":
            loading_slow.set()
            await slow_may_finish.wait()
        return await load_version(name, *args)

    monkeypatch.setattr(repo, "_load_version", slow)
    add_version(repo_root, "slow", 1)
    await asyncio.wait_for(loading_slow.wait(), 5)
    add_version(repo_root, "demo", 2, seed=2)

    async def until_latest_is_2() -> None:
        while repo.resolve("demo").version != "2":
            await repo.wait_changed()

    await asyncio.wait_for(until_latest_is_2(), 5)
    assert IndexEntry("slow", "1", "LOADING") in repo.index()
    with pytest.raises(ModelUnavailable, match="its load is under way"):
        repo.resolve("slow")
    slow_may_finish.set()
    await asyncio.wait_for(repo.poll(), 5)
    assert repo.resolve("slow").version == "1"


async def test_a_load_past_its_timeout_starts_no_other_of_its_version_until_its_thread_ends(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a session's creation cannot be stopped, and each change of a slow
    model's file started another load beside those still running (5 GB in all)."""
    from mlgate.workers.inference import repository

    add_version(repo_root, "demo", 1)
    add_version(repo_root, "slow", 1)
    may_finish = threading.Event()
    opened = []
    open_session = repository.open_session

    def uninterruptible_for_slow(path: Path, *args: Any) -> Any:
        if path.parent.parent.name == "slow":
            opened.append(path)
            may_finish.wait(10)
        return open_session(path, *args)

    monkeypatch.setattr(repository, "open_session", uninterruptible_for_slow)
    repo = await start_repository(model_load_timeout_s=0.2)
    assert "took longer than 0.2 s" in next(e for e in repo.index() if e.name == "slow").reason
    (repo_root / "slow" / "1" / "model.onnx").write_bytes(build_mlp(seed=3).SerializeToString())
    await repo.poll()
    assert len(opened) == 1  # the first load's thread still runs: no second one
    entry = next(e for e in repo.index() if e.name == "slow")
    assert "has not ended yet" in entry.reason
    may_finish.set()
    await until(lambda: not repo._abandoned)
    await repo.poll()  # the file changed while it ran: loaded now
    assert len(opened) == 2
    assert repo.resolve("slow").version == "1"


async def test_version_directories_are_listed_off_the_event_loop(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a model of 30,000 version directories stalled every request for up to
    600 ms at each poll while they were listed."""
    from mlgate.workers.inference import repository

    add_version(repo_root, "demo", 1)
    listed_in: list[threading.Thread] = []
    versions_on_disk = repository.versions_on_disk

    def recorded(model_dir: Path) -> Any:
        listed_in.append(threading.current_thread())
        return versions_on_disk(model_dir)

    monkeypatch.setattr(repository, "versions_on_disk", recorded)
    repo = await start_repository()
    await repo.poll()
    assert listed_in and threading.main_thread() not in listed_in


async def test_closing_gives_up_a_polls_load_under_way(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the close waited for a poll's load (up to its 300 s timeout), and
    the shutdown ran out of its budget with nothing else closed."""
    add_version(repo_root, "demo", 1)
    repo = await start_repository(model_poll_interval_s=0.05)
    loading = asyncio.Event()
    load_version = repo._load_version

    async def endless_for_slow(name: str, *args: Any) -> Any:
        if name == "slow":
            loading.set()
            await asyncio.Event().wait()
        return await load_version(name, *args)

    monkeypatch.setattr(repo, "_load_version", endless_for_slow)
    add_version(repo_root, "slow", 1)
    await asyncio.wait_for(loading.wait(), 5)
    await asyncio.wait_for(repo.close(), 5)


async def test_a_version_loaded_serves_while_the_models_next_loads_and_closing_closes_it(
    repo_root: Path, start_repository: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: version 1 was READY in the index but 404 until version 2 had loaded
    too, and a close cancelling that load left version 1's worker running."""
    add_version(repo_root, "demo", 1)
    repo = await start_repository(model_poll_interval_s=0.05)
    loading = asyncio.Event()
    load_version = repo._load_version

    async def endless_for_2(name: str, version: str, *args: Any) -> Any:
        if name == "multi" and version == "2":
            loading.set()
            await asyncio.Event().wait()
        return await load_version(name, version, *args)

    monkeypatch.setattr(repo, "_load_version", endless_for_2)
    write_config(repo_root, "multi", version_policy="all")
    add_version(repo_root, "multi", 1)
    add_version(repo_root, "multi", 2, seed=2)
    await asyncio.wait_for(loading.wait(), 5)
    first = repo.resolve("multi", "1")
    assert (await predict(repo, "multi", "1"))[0] == "1"
    await asyncio.wait_for(repo.close(), 5)
    with pytest.raises(WorkerClosed):
        first.worker.submit(rows(1), soon())


async def test_a_serving_version_kept_after_its_directory_is_removed_says_so(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: with the newest version broken, the serving version's directory
    deleted left it serving, READY with no reason in the index, and nothing logged."""
    add_version(repo_root, "demo", 1)
    add_version(repo_root, "demo", 2)
    repo = await start_repository()
    assert (await predict(repo))[0] == "2"
    add_version(repo_root, "demo", 3, body=b"not a model")
    await repo.poll()
    shutil.rmtree(repo_root / "demo" / "2")
    with capture_logs() as logs:
        await repo.poll()
    assert (await predict(repo))[0] == "2"  # nothing the policy wants loads: kept
    [entry] = [entry for entry in repo.index() if entry.version == "2"]
    assert entry.state == "READY"
    assert entry.reason == "removed from the repository; serving while no version the policy wants loads"
    assert [log["version"] for log in logs if log["event"] == "model_version_kept"] == ["2"]


async def test_an_unloaded_version_is_freed_at_once_not_when_the_collector_comes(
    repo_root: Path, start_repository: Any
) -> None:
    """A review: a closed worker lives on in reference cycles (its cancelled task's
    error holds its frames), and with the collector's thresholds raised each retired
    version kept its session: 120 unload/load cycles took a process from 170 to
    811 MB. With automatic collection off, as good as it was then, it is freed."""
    add_version(repo_root, "demo", 1)
    repo = await start_repository()
    worker = weakref.ref(repo.resolve("demo").worker)
    gc.disable()
    try:
        await repo.unload("demo")
        await until(lambda: worker() is None)
    finally:
        gc.enable()
