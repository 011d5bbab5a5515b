"""Feature profiles: building them, the vectorised range check, loading them from disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from structlog.testing import capture_logs

from mlgate.schemas.quality import profile_decoder
from mlgate.workers.quality.profile import CompiledProfile, build_profile, psi
from mlgate.workers.quality.profile_store import ProfileStore
from tests.quality_data import FEATURES, reference_sample, write_profile


def test_profile_bins_split_the_reference_into_deciles() -> None:
    profile = build_profile(reference_sample(10_000), kind="source", name="s")
    assert profile.reference_count == 10_000 and len(profile.features) == FEATURES
    for feature in profile.features:
        assert len(feature.edges) == 9
        assert np.allclose(feature.proportions, 0.1, atol=1e-3)
        assert feature.min < feature.edges[0] and feature.edges[-1] < feature.max


def test_tied_quantiles_merge_into_fewer_bins() -> None:
    sample = np.column_stack([np.repeat([0.0, 1.0], 500), np.linspace(0, 1, 1000)])
    compiled = CompiledProfile.compile(build_profile(sample, kind="source", name="s"))
    assert compiled.real_bins(0) < 10 and compiled.real_bins(1) == 10
    counts = compiled.bin_counts(sample)
    assert counts.sum(axis=1).tolist() == [1000, 1000]
    assert np.all(psi(compiled.reference, counts, 1000) < 1e-9)


def test_range_check_returns_violating_feature_indexes_per_row() -> None:
    compiled = CompiledProfile.compile(build_profile(reference_sample(5000), kind="source", name="s"))
    batch = reference_sample(6, seed=1)
    batch[1, 3] = compiled.highs[3] + 1
    batch[4, 0] = compiled.lows[0] - 1
    batch[4, 7] = compiled.highs[7] * 10
    assert compiled.range_violations(batch) == [(1, [3]), (4, [0, 7])]


def test_store_loads_saved_profiles_by_kind_and_name(tmp_path: Path) -> None:
    write_profile(tmp_path, "sensors")
    write_profile(tmp_path, "demo", kind="model")
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    source, model = store.source("sensors"), store.model("demo")
    assert source is not None and source.profile.kind == "source"
    assert model is not None and (tmp_path / "models" / "demo" / "profile.json").is_file()
    assert store.source("demo") is None


def test_store_keeps_previous_profile_when_the_file_breaks(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "sensors")
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    before = store.source("sensors")
    path.write_text('{"kind": "source", "name": "sensors"')
    with capture_logs() as logs:
        store.refresh()
    assert store.source("sensors") is before
    assert [entry["event"] for entry in logs] == ["profile_load_failed"]


def test_profile_file_is_versioned_and_readable(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "sensors", on_violation="flag")
    profile = profile_decoder.decode(path.read_bytes())
    assert (profile.version, profile.on_violation, profile.kind) == (1, "flag", "source")
    assert path.read_text().startswith("{\n")


def test_edges_float32_would_merge_are_counted_in_float64() -> None:
    seconds = 1.7e9 + np.arange(1000, dtype=np.float64)  # float32 spaces these 128 apart
    compiled = CompiledProfile.compile(build_profile(seconds[:, None], kind="source", name="s"))
    assert compiled.counting_edges.dtype == np.float64
    counts = compiled.bin_counts(seconds[:, None])
    assert counts.tolist() == [[100] * 10]
