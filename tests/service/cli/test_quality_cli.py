"""``mlgate quality profile|report``: build a profile, print and plot drift."""

from __future__ import annotations

import asyncio
import math
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from mlgate.config import Settings
from mlgate.schemas.quality import QualityProfile, profile_decoder
from mlgate.service.cli import main
from mlgate.service.cli import quality as quality_cli
from mlgate.service.state import DRIFT_MONITOR
from mlgate.workers.quality.profile import UnloadableProfile, build_profile
from mlgate.workers.quality.profile_store import ProfileStore
from tests.conftest import AppClientFactory
from tests.quality_data import DRIFTED, drifted, records, reference_sample, write_profile

WINDOW = 1000


@pytest.fixture
def profiles_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "profiles"
    monkeypatch.setenv("MLGATE_PROFILES_DIR", str(path))
    monkeypatch.setenv("MLGATE_MODEL_REPOSITORY", str(tmp_path / "models"))
    return path


async def run_cli(argv: Sequence[str]) -> int:
    """The command in a thread, so a service on this loop can answer it."""
    return await asyncio.get_running_loop().run_in_executor(None, main, list(argv))


def test_profile_command_builds_a_profile_from_ndjson(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "reference.ndjson"
    sample.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records(reference_sample(3000))))
    code = main(["quality", "profile", "--source", "sensors", "--input", str(sample), "--on-violation", "flag"])
    assert code == 0
    path = profiles_dir / "sources" / "sensors.profile.json"
    profile = profile_decoder.decode(path.read_bytes())
    assert (profile.name, profile.reference_count, profile.on_violation) == ("sensors", 3000, "flag")
    assert len(profile.features) == 8
    assert str(path) in capsys.readouterr().out


def test_profile_command_reads_a_json_batch_for_a_model(tmp_path: Path, profiles_dir: Path) -> None:
    sample = tmp_path / "batch.json"
    sample.write_bytes(msgspec.json.encode({"source": "x", "records": records(reference_sample(500))}))
    names = ",".join(f"n{i}" for i in range(8))
    assert main(["quality", "profile", "--model", "demo", "--input", str(sample), "--feature-names", names]) == 0
    profile = profile_decoder.decode((tmp_path / "models" / "demo" / "profile.json").read_bytes())
    assert profile.kind == "model" and profile.features[7].name == "n7"


async def test_profile_command_builds_a_profile_from_the_local_log(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path,
    profiles_dir: Path,
) -> None:
    client = await app_client(make_settings(feature_dims=(8,), profiles_dir=str(profiles_dir)))
    for source, count in (("sensors", 1200), ("other", 300)):
        body = {"source": source, "records": records(reference_sample(count), source)}
        assert (await client.post("/api/v2/ingest", json=body)).status == 202
    argv = ["quality", "profile", "--source", "sensors", "--from-log", "--data-dir", str(tmp_path / "data")]
    assert await run_cli(argv) == 0
    profile = profile_decoder.decode((profiles_dir / "sources" / "sensors.profile.json").read_bytes())
    assert profile.reference_count == 1200


async def test_report_command_prints_the_drift_table(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], profiles_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_profile(profiles_dir, "sensors")
    settings = make_settings(feature_dims=(8,), profiles_dir=str(profiles_dir), drift_window_records=WINDOW)
    client = await app_client(settings)
    body = {"source": "sensors", "records": records(drifted(reference_sample(WINDOW)))}
    assert (await client.post("/api/v2/ingest", json=body)).status == 202
    await client.app[DRIFT_MONITOR].drained()

    url = str(client.make_url("/"))
    assert await run_cli(["quality", "report", "--source", "sensors", "--url", url, "--top", "8"]) == 0
    out = capsys.readouterr().out
    assert "3 of 8 features over" in out
    flagged = {line.split()[0] for line in out.splitlines() if "DRIFT" in line}
    assert flagged == DRIFTED


async def test_report_command_writes_a_png_plot(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], profiles_dir: Path,
    tmp_path: Path,
) -> None:
    write_profile(profiles_dir, "sensors")
    settings = make_settings(feature_dims=(8,), profiles_dir=str(profiles_dir), drift_window_records=WINDOW)
    client = await app_client(settings)
    body = {"source": "sensors", "records": records(drifted(reference_sample(WINDOW)))}
    assert (await client.post("/api/v2/ingest", json=body)).status == 202
    await client.app[DRIFT_MONITOR].drained()

    png = tmp_path / "drift.png"
    argv = ["quality", "report", "--source", "sensors", "--url", str(client.make_url("/")), "--plot", str(png)]
    assert await run_cli(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_report_command_explains_a_missing_profile(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], profiles_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = await app_client(make_settings(profiles_dir=str(profiles_dir)))
    argv = ["quality", "report", "--source", "nope", "--url", str(client.make_url("/"))]
    assert await run_cli(argv) == 1
    assert "404 No source profile named 'nope'" in capsys.readouterr().err


def test_profile_command_refuses_a_name_outside_the_profiles_directory(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = tmp_path / "reference.ndjson"
    sample.write_bytes(msgspec.json.encode(records(reference_sample(10))[0]) + b"\n")
    assert main(["quality", "profile", "--source", "../escape", "--input", str(sample)]) == 1
    assert "cannot name a profile" in capsys.readouterr().err
    assert not (tmp_path / "escape.profile.json").exists()


def ndjson_sample(directory: Path, count: int) -> Path:
    """A reference sample of ``count`` records, NDJSON."""
    sample = directory / "reference.ndjson"
    sample.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records(reference_sample(count))))
    return sample


@pytest.mark.parametrize("margin", ["nan", "inf", "-inf", "-0.5"])
def test_profile_command_refuses_a_margin_that_makes_no_range(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str], margin: str
) -> None:
    sample = ndjson_sample(tmp_path, 10)
    with pytest.raises(SystemExit) as usage_error:
        main(["quality", "profile", "--source", "sensors", "--input", str(sample), f"--margin={margin}"])
    assert usage_error.value.code == 2
    assert "argument --margin: must be a finite number >= 0" in capsys.readouterr().err
    assert not (profiles_dir / "sources" / "sensors.profile.json").exists()


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_profile_command_refuses_fewer_than_one_record(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    sample = ndjson_sample(tmp_path, 10)
    with pytest.raises(SystemExit) as usage_error:
        main(["quality", "profile", "--source", "sensors", "--input", str(sample), f"--max-records={limit}"])
    assert usage_error.value.code == 2
    assert "argument --max-records: must be at least 1" in capsys.readouterr().err
    assert not (profiles_dir / "sources" / "sensors.profile.json").exists()


def test_profile_command_uses_at_most_max_records(tmp_path: Path, profiles_dir: Path) -> None:
    sample = ndjson_sample(tmp_path, 10)
    assert main(["quality", "profile", "--source", "sensors", "--input", str(sample), "--max-records", "4"]) == 0
    profile = profile_decoder.decode((profiles_dir / "sources" / "sensors.profile.json").read_bytes())
    assert profile.reference_count == 4


def test_profile_command_with_float_extremes_writes_a_profile_the_service_loads(
    tmp_path: Path, profiles_dir: Path
) -> None:
    """A review: ``max - min`` overflowed, the file held ``"min": null`` and exit was 0."""
    sample = tmp_path / "extremes.ndjson"
    rows = ([v] * 8 for v in (1e308, -1e308, 0.0))
    sample.write_bytes(b"".join(msgspec.json.encode({"features": row}) + b"\n" for row in rows))
    assert main(["quality", "profile", "--source", "ext", "--input", str(sample)]) == 0
    store = ProfileStore(profiles_dir, tmp_path / "models")
    store.refresh()
    compiled = store.source("ext")
    assert compiled is not None and np.isfinite(compiled.lows).all() and np.isfinite(compiled.highs).all()


def test_profile_command_refuses_to_write_a_profile_that_is_not_finite(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def non_finite(*args: Any, **kwargs: Any) -> QualityProfile:
        profile = build_profile(*args, **kwargs)
        features = [msgspec.structs.replace(f, max=math.inf) for f in profile.features]
        return msgspec.structs.replace(profile, features=features)

    monkeypatch.setattr(quality_cli, "build_profile", non_finite)
    sample = tmp_path / "reference.ndjson"
    sample.write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records(reference_sample(100))))
    output = tmp_path / "out.profile.json"
    for target in ([], ["--output", str(output)]):
        code = main(["quality", "profile", "--source", "s", "--input", str(sample), *target])
        assert code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "not finite" in err and "Traceback" not in err
    assert not (profiles_dir / "sources" / "s.profile.json").exists() and not output.exists()


def test_profile_output_writes_through_a_symlink_into_its_target(
    tmp_path: Path, profiles_dir: Path
) -> None:
    """A review: ``--output`` went through the store's temp file and ``os.replace``, so
    a symlink became a regular file and its target kept the old content."""
    sample = ndjson_sample(tmp_path, 50)
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("old\n")
    link.symlink_to(target.name)
    assert main(["quality", "profile", "--source", "s", "--input", str(sample), "--output", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == target.name
    assert profile_decoder.decode(target.read_bytes()).name == "s"
    assert not (profiles_dir / "sources" / "s.profile.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_profile_output_writes_into_a_fifo_behind_a_symlink(tmp_path: Path, profiles_dir: Path) -> None:
    """``--output /dev/stdout`` (a symlink to the process's pipe), in a tmp dir: the
    bytes go down the pipe, which stays a pipe."""
    sample = ndjson_sample(tmp_path, 50)
    fifo, link = tmp_path / "pipe", tmp_path / "stdout"
    os.mkfifo(fifo)
    link.symlink_to(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader there: the writer's open returns
    try:
        assert main(["quality", "profile", "--source", "s", "--input", str(sample), "--output", str(link)]) == 0
        os.set_blocking(reader, True)
        chunks = []
        while chunk := os.read(reader, 1 << 16):  # the profile fits the pipe's buffer
            chunks.append(chunk)
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert profile_decoder.decode(b"".join(chunks)).name == "s"


def test_profile_output_file_holds_only_the_profile_and_the_summary_goes_to_stderr(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: the summary was printed to stdout after the profile was written, so
    ``--output /dev/stdout`` redirected to a file had its start overwritten by it (and,
    piped, the summary followed the JSON)."""
    sample = ndjson_sample(tmp_path, 50)
    output = tmp_path / "out.json"
    assert main(["quality", "profile", "--source", "s", "--input", str(sample), "--output", str(output)]) == 0
    assert profile_decoder.decode(output.read_bytes()).name == "s"  # exactly one JSON document
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "profile of source s" in captured.err and str(output) in captured.err


def test_profile_output_to_dev_stdout_is_the_profile_alone(
    tmp_path: Path, profiles_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``--output /dev/stdout`` with stdout a file: the file is the profile, whole."""
    sample = ndjson_sample(tmp_path, 50)
    assert main(["quality", "profile", "--source", "s", "--input", str(sample), "--output", "/dev/stdout"]) == 0
    captured = capfd.readouterr()
    assert profile_decoder.decode(captured.out.encode()).name == "s"
    assert "profile of source s" in captured.err


@pytest.mark.parametrize("bins", ["1", "0", "1002", "2000"])
def test_profile_command_refuses_bins_a_profile_cannot_hold(
    tmp_path: Path, profiles_dir: Path, capsys: pytest.CaptureFixture[str], bins: str
) -> None:
    """A review: ``--bins 2000`` exited 0 with a profile the service refused to load
    (at most 1,000 edges), and ``--bins 1`` was an error of another exit code."""
    sample = ndjson_sample(tmp_path, 10)
    with pytest.raises(SystemExit) as usage_error:
        main(["quality", "profile", "--source", "sensors", "--input", str(sample), f"--bins={bins}"])
    assert usage_error.value.code == 2
    assert "argument --bins: must be at " in capsys.readouterr().err
    assert not (profiles_dir / "sources" / "sensors.profile.json").exists()


def test_a_profile_past_a_limit_of_its_wire_type_is_refused_before_it_is_written(tmp_path: Path) -> None:
    too_fine = build_profile(reference_sample(5000), kind="source", name="fine", bins=1500)
    with pytest.raises(UnloadableProfile, match="would not load"):
        ProfileStore(tmp_path, tmp_path / "models").save(too_fine)
    assert not list(tmp_path.rglob("*.json"))


def test_profile_command_reads_no_further_into_ndjson_than_max_records(tmp_path: Path, profiles_dir: Path) -> None:
    """A review: the whole input was read and decoded before ``--max-records`` applied
    (2.1 GB for 10 records of a 520 MB file): what follows the records used is not read."""
    sample = ndjson_sample(tmp_path, 4)
    with open(sample, "ab") as file:
        file.write(b"not a record at all\n")
    assert main(["quality", "profile", "--source", "sensors", "--input", str(sample), "--max-records", "4"]) == 0
    profile = profile_decoder.decode((profiles_dir / "sources" / "sensors.profile.json").read_bytes())
    assert profile.reference_count == 4
    assert main(["quality", "profile", "--source", "sensors", "--input", str(sample), "--max-records", "5"]) == 1


@pytest.mark.parametrize(
    ("option", "told"),
    [
        ("--plot-features=0", "argument --plot-features: must be at least 1"),
        ("--top=101", "argument --top: must be at most 100"),
        ("--top=-1", "argument --top: must be at least 0"),
    ],
)
def test_report_command_refuses_counts_out_of_range(
    capsys: pytest.CaptureFixture[str], option: str, told: str
) -> None:
    """A review: ``--plot-features 0`` drew one feature, said nothing."""
    with pytest.raises(SystemExit) as usage_error:
        main(["quality", "report", "--source", "sensors", option])
    assert usage_error.value.code == 2
    assert told in capsys.readouterr().err
