"""Feature profiles: building them, the vectorised range check, loading them from disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from structlog.testing import capture_logs

from mlgate.schemas.quality import profile_decoder
from mlgate.workers.quality.profile import CompiledProfile, NonFiniteProfile, build_profile, psi
from mlgate.workers.quality.profile_store import MAX_PROFILE_BYTES, ProfileChanges, ProfileStore
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
    assert not compiled.float32_suffices
    counts = compiled.bin_counts(seconds[:, None])
    assert counts.tolist() == [[100] * 10]


def test_a_reference_scores_no_drift_against_itself_where_float32_is_coarser_than_its_bins() -> None:
    """A review: epoch seconds over 1,500 s (bins ~150 wide, float32's spacing 128)
    read PSI 0.18 against their own reference, counted in float32."""
    seconds = 1_700_000_000 + np.random.default_rng(3).integers(0, 1500, 2000).astype(np.float64)
    compiled = CompiledProfile.compile(build_profile(seconds[:, None], kind="source", name="s"))
    counts = compiled.bin_counts(seconds[:, None])
    assert psi(compiled.reference, counts, len(seconds)).tolist() == pytest.approx([0.0], abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_discrete_reference_scores_no_drift_against_itself(dtype: type) -> None:
    """Quantile edges of discrete features are data values: a value on its edge stays
    on it in float32 (a review: edges rounded up put every 0.7 below its own edge, PSI
    18 for a constant 0.7, 1.9 for values drawn from {0.1, 0.3, 0.7})."""
    rng = np.random.default_rng(11)
    reference = np.column_stack(
        [
            rng.choice([0.1, 0.3, 0.7], 3000),
            np.full(3000, 0.7),
            np.full(3000, 1_700_000_000.3),
        ]
    )
    compiled = CompiledProfile.compile(build_profile(reference[:2000], kind="source", name="s"))
    sample = reference[2000:].astype(dtype)
    scores = psi(compiled.reference, compiled.bin_counts(sample), len(sample))
    assert scores.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.01)


def test_a_broken_file_with_no_earlier_version_is_unreadable_until_it_loads(tmp_path: Path) -> None:
    """A review: a fresh process kept nothing for a broken file, so its source went
    unchecked; the store must say the profile is there but cannot be read."""
    path = write_profile(tmp_path, "sensors")
    write_profile(tmp_path, "other")
    good = path.read_bytes()
    path.write_text('{"kind": "source", "trunc')
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    assert store.source("sensors") is None and store.unreadable("source", "sensors")
    assert store.source("other") is not None and not store.unreadable("source", "other")
    path.write_bytes(good)
    store.refresh()
    assert store.source("sensors") is not None and not store.unreadable("source", "sensors")


def test_a_broken_file_with_an_earlier_version_held_is_counted_not_unreadable(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "sensors")
    store = ProfileStore(tmp_path, tmp_path / "models")
    seen: list[ProfileChanges] = []
    store.watch(seen.append)
    store.refresh()
    path.write_text("{")
    with capture_logs() as logs:
        store.refresh()
        store.refresh()  # the same broken file: logged and counted once
    assert not store.unreadable("source", "sensors") and store.source("sensors") is not None
    assert [entry["event"] for entry in logs] == ["profile_load_failed"]
    assert [changes.failed for changes in seen] == [(), (("source", "sensors"),), ()]
    assert [changes.unreadable["source"] for changes in seen] == [0, 1, 1]


def test_a_watcher_learns_of_profiles_removed_and_replaced(tmp_path: Path) -> None:
    removed = write_profile(tmp_path, "gone")
    replaced = write_profile(tmp_path, "sensors")
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    before = store.source("sensors")
    seen: list[ProfileChanges] = []
    store.watch(seen.append)
    removed.unlink()
    named = build_profile(reference_sample(500), kind="source", name="sensors",
                          feature_names=[f"n{i}" for i in range(FEATURES)])
    store.save(named)
    assert replaced.is_file()
    store.refresh()
    (changes,) = seen
    retired = {(kind, name): (old, new) for kind, name, old, new in changes.retired}
    assert retired[("source", "gone")][1] is None
    assert retired[("source", "sensors")] == (before, store.source("sensors"))


def test_non_finite_values_are_out_of_range_and_in_no_bin() -> None:
    """A review: NaN compares false, so it counted in range and in the lowest bin."""
    compiled = CompiledProfile.compile(build_profile(reference_sample(5000), kind="source", name="s"))
    batch = reference_sample(4, seed=1)
    batch[0, 0], batch[1, 1], batch[2, 2] = np.nan, np.inf, -np.inf
    assert compiled.range_violations(batch) == [(0, [0]), (1, [1]), (2, [2])]
    counts = compiled.bin_counts(batch)
    assert counts.sum(axis=1).tolist() == [3, 3, 3] + [4] * (FEATURES - 3)


def test_a_profile_of_float_extremes_is_finite_and_loads(tmp_path: Path) -> None:
    """A review: ``max - min`` overflowed to inf, written as null: a file the service
    could not load."""
    extremes = np.array([[1e308, 1e308], [-1e308, -1e308], [0.0, -1e308]])
    for sample in (extremes, extremes[:2]):
        profile = build_profile(sample, kind="source", name="ext")
        for feature in profile.features:
            assert -np.finfo(np.float64).max <= feature.min <= -1e308
            assert 1e308 <= feature.max <= np.finfo(np.float64).max
            assert np.isfinite(feature.edges).all()
        ProfileStore(tmp_path, tmp_path / "models").save(profile)
        store = ProfileStore(tmp_path, tmp_path / "models")
        store.refresh()
        assert store.source("ext") is not None


def test_a_huge_margin_widens_to_the_float_range_not_past_it() -> None:
    profile = build_profile(reference_sample(100), kind="source", name="s", margin=1e308)
    assert all(f.min == -np.finfo(np.float64).max for f in profile.features)
    assert all(f.max == np.finfo(np.float64).max for f in profile.features)


def test_an_ordinary_margin_widens_the_range_as_before() -> None:
    sample = reference_sample(100)
    profile = build_profile(sample, kind="source", name="s", margin=0.25)
    span = sample.max(axis=0) - sample.min(axis=0)
    assert [f.min for f in profile.features] == (sample.min(axis=0) - 0.25 * span).tolist()
    assert [f.max for f in profile.features] == (sample.max(axis=0) + 0.25 * span).tolist()


def test_saving_refuses_a_profile_holding_a_number_that_is_not_finite(tmp_path: Path) -> None:
    profile = build_profile(reference_sample(100), kind="source", name="s")
    features = [msgspec.structs.replace(profile.features[0], max=float("inf")), *profile.features[1:]]
    store = ProfileStore(tmp_path, tmp_path / "models")
    with pytest.raises(NonFiniteProfile, match="not finite"):
        store.save(msgspec.structs.replace(profile, features=features))
    assert not store.path_of("source", "s").exists()


def unlistable(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """``directory`` there but not listable, as for a user without read permission on it
    (tests run as root, whom chmod does not stop)."""
    scandir = os.scandir

    def refusing(path: Any = ".") -> Any:
        if os.fspath(path) == str(directory):
            raise PermissionError(13, "Permission denied", str(directory))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)


def test_a_sources_directory_that_cannot_be_listed_keeps_its_profiles_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: ``Path.glob`` of a directory that cannot be listed finds nothing, so
    every source profile was dropped (logged at info) and ingest ran unchecked."""
    write_profile(tmp_path, "sensors")
    store = ProfileStore(tmp_path, tmp_path / "models")
    seen: list[ProfileChanges] = []
    store.watch(seen.append)
    store.refresh()
    before = store.source("sensors")
    with monkeypatch.context() as patch:
        unlistable(patch, tmp_path / "sources")
        with capture_logs() as logs:
            store.refresh()
            store.refresh()  # the same failure: logged once
    assert store.source("sensors") is before and store.source_state("sensors") == (before, False)
    assert [(e["event"], e["log_level"]) for e in logs] == [("profiles_dir_unreadable", "error")]
    assert logs[0]["kept"] == ["sensors"] and logs[0]["kind"] == "source"
    assert [changes.retired for changes in seen] == [(), (), ()]
    assert [changes.unreadable["source"] for changes in seen] == [0, 1, 1]
    with capture_logs() as logs:
        store.refresh()
    assert [e["event"] for e in logs] == ["profiles_dir_readable"]
    assert store.source("sensors") is before and seen[-1].unreadable["source"] == 0


def test_a_source_refused_for_a_broken_profile_stays_refused_while_its_directory_cannot_be_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_profile(tmp_path, "sensors").write_text("{")
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    assert store.unreadable("source", "sensors")
    unlistable(monkeypatch, tmp_path / "sources")
    store.refresh()
    assert store.unreadable("source", "sensors") and store.source("sensors") is None


def test_a_model_repository_that_cannot_be_listed_keeps_its_model_profiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_profile(tmp_path, "demo", kind="model")
    store = ProfileStore(tmp_path, tmp_path / "models")
    seen: list[ProfileChanges] = []
    store.watch(seen.append)
    store.refresh()
    before = store.model("demo")
    assert before is not None
    unlistable(monkeypatch, tmp_path / "models")
    with capture_logs() as logs:
        store.refresh()
    assert store.model("demo") is before
    assert [e["event"] for e in logs] == ["profiles_dir_unreadable"]
    assert seen[-1].unreadable == {"source": 0, "model": 1} and seen[-1].retired == ()


def test_a_fresh_store_whose_sources_directory_cannot_be_listed_holds_every_source_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: with nothing found before, an unlistable sources directory left no
    profile in force, and a fresh process ran every source unchecked."""
    write_profile(tmp_path, "sensors")
    store = ProfileStore(tmp_path, tmp_path / "models")
    seen: list[ProfileChanges] = []
    store.watch(seen.append)
    with monkeypatch.context() as patch:
        unlistable(patch, tmp_path / "sources")
        with capture_logs() as logs:
            store.refresh()
    assert store.source_state("sensors") == (None, True) and store.unreadable("source", "other")
    assert not store.unreadable("model", "demo")
    assert [e["event"] for e in logs] == ["profiles_dir_unreadable"] and logs[0]["refusing_every_source"]
    assert seen[-1].unreadable["source"] == 1
    store.refresh()
    profile = store.source("sensors")
    assert profile is not None and store.source_state("sensors") == (profile, False)
    assert store.source_state("other") == (None, False)


def test_a_sources_directory_that_appears_unlistable_holds_every_source_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a sources directory not there at first counted as listed, so one that
    then appeared but could not be listed left every source unchecked."""
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()  # no sources directory: no profile, nothing refused
    assert store.source_state("sensors") == (None, False)
    write_profile(tmp_path, "sensors")
    with monkeypatch.context() as patch:
        unlistable(patch, tmp_path / "sources")
        store.refresh()
        assert store.source_state("sensors") == (None, True)
    store.refresh()
    profile = store.source("sensors")
    assert profile is not None and store.source_state("sensors") == (profile, False)


def test_a_fresh_store_whose_model_repository_cannot_be_listed_refuses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ProfileStore(tmp_path, tmp_path / "models")
    seen: list[ProfileChanges] = []
    store.watch(seen.append)
    (tmp_path / "models").mkdir()
    unlistable(monkeypatch, tmp_path / "models")
    with capture_logs() as logs:
        store.refresh()
    assert not store.unreadable("model", "demo") and store.source_state("sensors") == (None, False)
    assert [e["event"] for e in logs] == ["profiles_dir_unreadable"]
    assert seen[-1].unreadable == {"source": 0, "model": 1}


def test_a_sources_directory_listed_once_then_not_keeps_other_sources_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once listed, what was found is known: sources without a profile stay unchecked."""
    write_profile(tmp_path, "sensors")
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    unlistable(monkeypatch, tmp_path / "sources")
    store.refresh()
    assert store.source_state("other") == (None, False) and store.source("sensors") is not None


def _edited(profile: Any, **changes: Any) -> Any:
    """``profile`` with its first feature changed, as a hand-edited file would be."""
    first = msgspec.structs.replace(profile.features[0], **changes)
    return msgspec.structs.replace(profile, features=[first, *profile.features[1:]])


@pytest.mark.parametrize("proportions", [[-5.0, 100.0], [0.2, 0.2]], ids=["negative", "not-summing-to-1"])
def test_a_profile_whose_proportions_are_not_shares_is_refused(proportions: list[float]) -> None:
    """A review: ``[-5, 100]`` loaded and every PSI of it was wrong without a word."""
    profile = build_profile(reference_sample(1_000), kind="source", name="s")
    edited = _edited(profile, edges=[0.0], proportions=proportions)
    with pytest.raises(ValueError, match="sum to 1"):
        CompiledProfile.compile(edited)


def test_a_profile_naming_two_features_alike_is_refused() -> None:
    """A review: four features named "same" made one metric series, three features lost."""
    profile = build_profile(reference_sample(1_000), kind="source", name="s")
    same = [msgspec.structs.replace(feature, name="same") for feature in profile.features]
    with pytest.raises(ValueError, match="names must differ"):
        CompiledProfile.compile(msgspec.structs.replace(profile, features=same))


def test_a_profile_file_that_is_a_fifo_is_unreadable_without_blocking_the_refresh(tmp_path: Path) -> None:
    """A review: a FIFO named as a profile blocked the refresh for good (and every
    reload after it), and a fresh process never started."""
    sources = tmp_path / "sources"
    sources.mkdir()
    os.mkfifo(sources / "piped.profile.json")
    store = ProfileStore(tmp_path, tmp_path / "models")
    with capture_logs() as logs:
        store.refresh()  # returns: nothing waits for a writer
    assert store.unreadable("source", "piped")
    (failed,) = [entry for entry in logs if entry["event"] == "profile_load_failed"]
    assert "not a regular file" in failed["error"]


def test_a_profile_file_linked_to_a_device_is_unreadable_and_not_read(tmp_path: Path) -> None:
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "zeros.profile.json").symlink_to("/dev/zero")
    store = ProfileStore(tmp_path, tmp_path / "models")
    store.refresh()
    assert store.unreadable("source", "zeros")


def test_a_sources_directory_that_is_a_link_to_nothing_keeps_its_profiles_in_force(tmp_path: Path) -> None:
    """A review: ``sources`` made a symbolic link to a mount that went away was taken
    for no profiles; a reject profile's out-of-range records were then accepted."""
    profiles, elsewhere = tmp_path / "profiles", tmp_path / "mount"
    write_profile(elsewhere, "sensors")
    profiles.mkdir()
    (profiles / "sources").symlink_to(elsewhere / "sources")
    assert_kept_once_gone(ProfileStore(profiles, tmp_path / "models"), elsewhere)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"version": 99}, "<= 1"),
        ({"feature_name": "a,b"}, "matching regex"),
        ({"feature_name": "dimension"}, "matching regex"),
        ({"feature_name": "+2"}, "matching regex"),
        ({"feature_name": " a"}, "matching regex"),
    ],
)
def test_a_profile_of_a_later_version_or_a_feature_name_the_flags_header_cannot_carry_is_refused(
    tmp_path: Path, change: dict[str, Any], error: str
) -> None:
    """A review: ``"version": 99`` loaded as version 1, and a feature named ``a,b`` or
    ``dimension`` made the ``quality_flags`` header ambiguous."""
    path = write_profile(tmp_path, "sensors")
    document = msgspec.json.decode(path.read_bytes())
    if "version" in change:
        document["version"] = change["version"]
    else:
        document["features"][0]["name"] = change["feature_name"]
    path.write_bytes(msgspec.json.encode(document))
    store = ProfileStore(tmp_path, tmp_path / "models")
    with capture_logs() as logs:
        store.refresh()
    assert store.unreadable("source", "sensors")
    (failed,) = [entry for entry in logs if entry["event"] == "profile_load_failed"]
    assert error in failed["error"]


def test_a_profiles_directory_that_is_a_link_to_nothing_keeps_its_profiles_in_force(tmp_path: Path) -> None:
    """A review of the fix above: a dangling link one level up, the profiles directory
    itself (the usual mount), still switched every source's checks off."""
    mounted, link = tmp_path / "mount", tmp_path / "profiles"
    write_profile(mounted, "sensors")
    link.symlink_to(mounted)
    assert_kept_once_gone(ProfileStore(link, tmp_path / "models"), mounted)


def assert_kept_once_gone(store: ProfileStore, mount: Path) -> None:
    """``store``'s profile of ``sensors`` stays in force once ``mount``, where its files
    are, went away: the refresh says the directory is unreadable."""
    store.refresh()
    before = store.source("sensors")
    assert before is not None
    shutil.rmtree(mount)
    with capture_logs() as logs:
        store.refresh()
    assert [entry["event"] for entry in logs] == ["profiles_dir_unreadable"]
    assert store.source("sensors") is before


def test_an_absent_profiles_directory_holds_no_profiles(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "none", tmp_path / "models")
    with capture_logs() as logs:
        store.refresh()
    assert not logs and not store.unreadable("source", "sensors")


def test_a_profile_file_past_the_size_limit_is_unreadable_and_not_read(tmp_path: Path) -> None:
    """A review: a 1 GB file was read up to the limit, 256 MB, at every poll."""
    sources = tmp_path / "sources"
    sources.mkdir()
    with open(sources / "big.profile.json", "wb") as file:
        file.truncate(MAX_PROFILE_BYTES + 1)  # sparse: no disk taken
    store = ProfileStore(tmp_path, tmp_path / "models")
    with capture_logs() as logs:
        store.refresh()
    assert store.unreadable("source", "big")
    (failed,) = [entry for entry in logs if entry["event"] == "profile_load_failed"]
    assert f"more than {MAX_PROFILE_BYTES}" in failed["error"]


def _edited_at(profile: Any, index: int, **changes: Any) -> Any:
    features = list(profile.features)
    features[index] = msgspec.structs.replace(features[index], **changes)
    return msgspec.structs.replace(profile, features=features)


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"edges": [0.0, 1.0], "proportions": [0.5, 0.5]}, "feature 2: proportions need len(edges) + 1 values"),
        ({"edges": [1.0, 0.0], "proportions": [0.2, 0.3, 0.5]}, "feature 2: edges must be strictly ascending"),
        ({"edges": [0.0, 0.0], "proportions": [0.2, 0.3, 0.5]}, "feature 2: edges must be strictly ascending"),
        ({"min": 5.0, "max": -5.0}, "feature 2: min exceeds max"),
        ({"edges": [0.0], "proportions": [1.5, -0.5]}, "feature 2: proportions must be 0 or more"),
    ],
    ids=["proportions-count", "descending", "repeated-edge", "min-over-max", "negative-share"],
)
def test_a_broken_feature_is_refused_by_its_index_and_reason(changes: dict[str, Any], refusal: str) -> None:
    profile = build_profile(reference_sample(1_000), kind="source", name="s")
    with pytest.raises(ValueError) as refused:
        CompiledProfile.compile(_edited_at(profile, 2, **changes))
    assert str(refused.value).startswith(refusal)


def test_a_number_not_finite_anywhere_is_named_before_any_other_fault() -> None:
    profile = build_profile(reference_sample(1_000), kind="source", name="s")
    broken = _edited_at(_edited_at(profile, 1, min=5.0, max=-5.0), 3, edges=[0.0, float("nan")])
    with pytest.raises(NonFiniteProfile, match="feature 3 of the source profile s"):
        CompiledProfile.compile(broken)
