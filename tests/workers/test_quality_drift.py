"""DriftMonitor: PSI over tumbling windows, one warning per crossing, never waiting."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from structlog.testing import capture_logs

from mlgate.schemas.quality import DriftReport
from mlgate.workers.quality import drift_monitor
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile import build_profile
from mlgate.workers.quality.profile_store import ProfileStore
from tests.quality_data import DRIFTED, drifted, reference_sample, write_profile

WINDOW = 2000
THRESHOLD = 0.2


@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    write_profile(tmp_path, "sensors")
    profiles = ProfileStore(tmp_path, tmp_path / "models")
    profiles.refresh()
    return profiles


@pytest.fixture
async def monitor(store: ProfileStore) -> AsyncIterator[DriftMonitor]:
    monitor = DriftMonitor(store, window_records=WINDOW, psi_threshold=THRESHOLD)
    await monitor.start()
    yield monitor
    await monitor.close()


async def feed(monitor: DriftMonitor, matrix: npt.NDArray[np.float64], batch: int = 500) -> None:
    for start in range(0, len(matrix), batch):
        assert monitor.observe("sensors", "source", matrix[start : start + batch])
    await monitor.drained()


def over(report: DriftReport | None) -> set[str]:
    assert report is not None
    return {feature.name for feature in report.top if feature.over_threshold}


async def test_reference_records_stay_below_the_threshold(monitor: DriftMonitor) -> None:
    await feed(monitor, reference_sample(WINDOW, seed=1))
    report = await monitor.report("source", "sensors", top=100)
    assert report is not None and report.window.complete
    assert report.features_over_threshold == 0
    assert max(feature.psi for feature in report.top) < THRESHOLD / 4


async def test_swapped_and_rescaled_features_and_only_those_cross_within_one_window(
    monitor: DriftMonitor,
) -> None:
    sample = reference_sample(WINDOW, seed=2)
    await feed(monitor, sample)
    assert over(await monitor.report("source", "sensors", top=100)) == set()
    await feed(monitor, drifted(sample))
    report = await monitor.report("source", "sensors", top=100)
    assert report is not None and report.window.windows_completed == 2
    assert over(report) == DRIFTED
    assert {feature.name for feature in report.top[:3]} == DRIFTED


async def test_threshold_crossing_logs_one_warning_naming_the_features(monitor: DriftMonitor) -> None:
    sample = drifted(reference_sample(WINDOW, seed=3))
    with capture_logs() as logs:
        await feed(monitor, sample)
        await feed(monitor, sample)  # still drifting: no new warning
    [warning] = [entry for entry in logs if entry["event"] == "feature_drift"]
    assert warning["log_level"] == "warning" and warning["features_over"] == 3
    assert {feature["feature"] for feature in warning["crossed"]} == DRIFTED
    assert all(feature["psi"] > THRESHOLD for feature in warning["crossed"])


async def test_recovery_is_logged_once_the_features_are_back_below(monitor: DriftMonitor) -> None:
    with capture_logs() as logs:
        await feed(monitor, drifted(reference_sample(WINDOW, seed=4)))
        await feed(monitor, reference_sample(WINDOW, seed=5))
    [recovered] = [entry for entry in logs if entry["event"] == "feature_drift_recovered"]
    assert {feature["feature"] for feature in recovered["recovered"]} == DRIFTED


async def test_batch_straddling_a_window_boundary_is_split(monitor: DriftMonitor) -> None:
    await feed(monitor, reference_sample(WINDOW + 700, seed=4), batch=WINDOW + 700)
    report = await monitor.report("source", "sensors")
    assert report is not None
    assert (report.window.windows_completed, report.window.records) == (1, WINDOW)
    assert report.window.pending_records == 700


async def test_full_mailbox_drops_and_counts_without_waiting(store: ProfileStore) -> None:
    stalled = DriftMonitor(store, window_records=WINDOW, mailbox_rows=1000)  # never started
    batch = reference_sample(500, seed=5)
    accepted = [stalled.observe("sensors", "source", batch) for _ in range(50)]
    assert accepted == [True] + [False] * 49  # a stream holds at most half the mailbox
    report = await stalled.report("source", "sensors")
    assert report is not None and report.records_dropped == 49 * 500
    await stalled.close()


async def test_a_batch_larger_than_the_mailbox_is_observed_in_part(store: ProfileStore) -> None:
    """A review: a batch of more rows than the whole mailbox was dropped whole, however
    empty the mailbox: a source sending such batches was never observed."""
    monitor = DriftMonitor(store, window_records=WINDOW, mailbox_rows=300)
    await monitor.start()
    try:
        assert monitor.observe("sensors", "source", reference_sample(1000, seed=5))
        await monitor.drained()
        report = await monitor.report("source", "sensors")
        assert report is not None
        # A stream's half of the mailbox, 150 rows: every 7th row (1000 / 150 rounded
        # up), 143 observed, 857 dropped.
        assert (report.records_observed, report.records_dropped) == (143, 857)
    finally:
        await monitor.close()


async def test_rows_of_another_width_than_the_profile_are_counted_and_logged_once(
    monitor: DriftMonitor,
) -> None:
    """A review: a profile of 64 features for a model of 128 inputs was silently never
    scored."""
    wider = np.hstack([reference_sample(10), reference_sample(10)])
    with capture_logs() as logs:
        assert not monitor.observe("sensors", "source", wider)
        assert not monitor.observe("sensors", "source", wider)
    report = await monitor.report("source", "sensors")
    assert report is not None and report.records_dropped == 20
    assert [entry["event"] for entry in logs] == ["drift_profile_width_mismatch"]


async def test_observations_without_a_profile_are_ignored(monitor: DriftMonitor) -> None:
    assert not monitor.observe("unknown", "source", reference_sample(10))
    assert await monitor.report("source", "unknown") is None


async def test_a_matrix_of_strings_is_not_observed(monitor: DriftMonitor) -> None:
    """An OIP BYTES tensor of the profile's width: no histogram to count it in."""
    strings = reference_sample(10).astype(str)
    assert not monitor.observe("sensors", "source", strings)
    await feed(monitor, reference_sample(WINDOW, seed=1))
    report = await monitor.report("source", "sensors")
    assert report is not None and report.window.complete


class CrashCounter:
    def __init__(self) -> None:
        self.crashed: list[str] = []

    def background_task_crashed(self, task: str) -> None:
        self.crashed.append(task)

    def feature_drift_scored(self, *args: object) -> None:
        pass

    def quality_violations(self, *args: object) -> None:
        pass

    def drift_observation_dropped(self, *args: object) -> None:
        pass


async def test_a_crash_while_scoring_is_logged_counted_and_the_monitor_restarts(
    store: ProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    telemetry = CrashCounter()
    monitor = DriftMonitor(store, window_records=WINDOW, psi_threshold=THRESHOLD, telemetry=telemetry)
    real_tally = drift_monitor._tally
    calls = 0

    def tally_failing_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug")
        return real_tally(*args)

    monkeypatch.setattr(drift_monitor, "_tally", tally_failing_once)
    await monitor.start()
    try:
        with capture_logs() as logs:
            assert monitor.observe("sensors", "source", reference_sample(100, seed=2))
            await monitor.drained()
        assert telemetry.crashed == ["drift-monitor"]
        assert [entry["task"] for entry in logs if entry["event"] == "background_task_crashed"] == [
            "drift-monitor"
        ]
        await feed(monitor, reference_sample(WINDOW, seed=1))  # the restarted loop scores
        report = await monitor.report("source", "sensors")
        assert report is not None and report.window.complete
        async with asyncio.timeout(5):
            while not monitor.healthy:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # healthy again once the new loop has settled
    finally:
        await monitor.close()


async def test_a_crash_leaves_no_rows_counted_against_the_mailbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows of a take are out of the bound whatever becomes of them: a crash on one
    stream drops the others of the same take too."""
    write_profile(tmp_path, "sensors")
    write_profile(tmp_path, "pumps")
    profiles = ProfileStore(tmp_path, tmp_path / "models")
    profiles.refresh()
    monitor = DriftMonitor(profiles, window_records=WINDOW, mailbox_rows=1000, telemetry=CrashCounter())

    def failing_tally(*args: Any) -> Any:
        raise ValueError("a bug")

    monkeypatch.setattr(drift_monitor, "_tally", failing_tally)
    assert monitor.observe("sensors", "source", reference_sample(300, seed=3))
    assert monitor.observe("pumps", "source", reference_sample(400, seed=4))
    await monitor.start()  # both in the first take
    try:
        await monitor.drained()
        assert monitor.mailbox_depth == 0
        assert monitor.observe("sensors", "source", reference_sample(700, seed=5))
    finally:
        await monitor.close()


async def test_values_that_are_not_finite_count_as_out_of_range(monitor: DriftMonitor) -> None:
    """A review: an OIP tensor's NaN compared false, so it counted in range."""
    sample = reference_sample(WINDOW, seed=6)
    sample[: WINDOW // 2, 3] = np.nan
    sample[WINDOW // 2 :, 4] = np.inf
    await feed(monitor, sample)
    report = await monitor.report("source", "sensors", top=100)
    assert report is not None and report.window.complete
    shares = {feature.name: feature.out_of_range_share for feature in report.top}
    assert (shares["f3"], shares["f4"]) == (0.5, 0.5)
    recent = {feature.name: sum(feature.recent) for feature in report.top}
    assert recent["f3"] == pytest.approx(0.5) and recent["f4"] == pytest.approx(0.5)


class GaugeBook:
    """Drift gauges as a dict. Armed, its next write first runs ``before_write``: where
    a thread switch to a profile refresh would land between a window's "still in
    force?" check and its gauge writes."""

    def __init__(self) -> None:
        self.gauges: dict[tuple[str, str, str], float] = {}
        self.before_write: Callable[[], None] | None = None

    def feature_drift_scored(
        self, kind: str, name: str, features: Sequence[str], psi: Sequence[float],
        out_of_range_share: Sequence[float],
    ) -> None:
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()
        for feature, score in zip(features, psi, strict=True):
            self.gauges[(kind, name, feature)] = score

    def feature_drift_retired(self, kind: str, name: str, keep: Sequence[str]) -> None:
        for key in [k for k in self.gauges if k[:2] == (kind, name) and k[2] not in keep]:
            del self.gauges[key]

    def background_task_crashed(self, task: str) -> None:
        pass

    def quality_violations(self, kind: str, name: str, action: str, records: int) -> None:
        pass

    def drift_observation_dropped(self, kind: str, name: str, records: int) -> None:
        pass

    def quality_profile_load_failed(self, kind: str, name: str) -> None:
        pass

    def quality_profiles_unreadable(self, kind: str, count: int) -> None:
        pass


async def test_a_profile_removed_while_its_window_is_scored_keeps_no_gauges(
    tmp_path: Path, store: ProfileStore
) -> None:
    """A review: the window checked its profile was in force, then a refresh retired
    the gauges, then the window wrote them: a removed profile's gauges, for good."""
    swapped = threading.Event()
    store.watch(lambda changes: swapped.set())  # before the monitor's own watcher
    book = GaugeBook()
    monitor = DriftMonitor(store, window_records=WINDOW, telemetry=book)
    refresh = threading.Thread(target=store.refresh)

    def remove_and_refresh() -> None:
        store.path_of("source", "sensors").unlink()
        refresh.start()
        assert swapped.wait(5)  # the profile is gone from the store; its retiring may wait

    book.before_write = remove_and_refresh
    await monitor.start()
    try:
        assert monitor.observe("sensors", "source", reference_sample(WINDOW, seed=3))
        await asyncio.wait_for(monitor.drained(), 5)
    finally:
        await monitor.close()
    refresh.join(5)
    assert not refresh.is_alive() and book.before_write is None
    assert store.source("sensors") is None
    assert book.gauges == {}


class RecordingLock:
    """A lock that writes "acquire" and "release" into ``events``."""

    def __init__(self, events: list[str]) -> None:
        self._lock = threading.Lock()
        self._events = events

    def __enter__(self) -> bool:
        self._lock.acquire()
        self._events.append("acquire")
        return True

    def __exit__(self, *exc: object) -> None:
        self._events.append("release")
        self._lock.release()


def test_a_bulk_retire_lets_go_of_the_gauges_lock_between_profiles(
    tmp_path: Path, store: ProfileStore
) -> None:
    """A review: the refresh thread held the gauges lock over every profile it retired
    (20 profiles x 4096 features: 0.8 s), and a window closing on the event loop waited
    for all of it. Now it waits for one profile's retire at most."""
    names = [f"s{i}" for i in range(5)]
    for name in names:
        write_profile(tmp_path, name, rows=200)
    store.refresh()
    events: list[str] = []
    book = GaugeBook()
    retire = book.feature_drift_retired

    def retiring(kind: str, name: str, keep: Sequence[str]) -> None:
        events.append(f"retire {name}")
        retire(kind, name, keep)

    book.feature_drift_retired = retiring  # type: ignore[method-assign]
    monitor = DriftMonitor(store, window_records=WINDOW, telemetry=book)
    monitor._gauges_lock = RecordingLock(events)  # type: ignore[assignment]
    for name in names + ["sensors"]:
        store.path_of("source", name).unlink()
    store.refresh()
    retired = sorted(event for event in events if event.startswith("retire "))
    assert retired == sorted(f"retire {name}" for name in names + ["sensors"])
    assert events == [
        step for event in events if event.startswith("retire ") for step in ("acquire", event, "release")
    ]


async def test_rows_queued_under_a_profile_replaced_by_another_width_are_dropped_and_counted(
    store: ProfileStore, tmp_path: Path
) -> None:
    """A review: rows of the old width and of the new one in one take were concatenated,
    which crashed the monitor and lost every stream's rows of that take, uncounted."""
    monitor = DriftMonitor(store, window_records=WINDOW, psi_threshold=THRESHOLD)
    await monitor.start()
    try:
        assert monitor.observe("sensors", "source", reference_sample(30))
        narrower = reference_sample(20_000, seed=99)[:, :3]
        store.save(build_profile(narrower, kind="source", name="sensors", on_violation="reject"))
        store.refresh()
        with capture_logs() as logs:
            assert monitor.observe("sensors", "source", narrower[:40])
            await monitor.drained()
        report = await monitor.report("source", "sensors")
        assert report is not None
        assert (report.records_observed, report.records_dropped) == (40, 30)
        assert not [entry for entry in logs if entry["event"] == "background_task_crashed"]
    finally:
        await monitor.close()


@pytest.fixture
def psi_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads PSI is computed in."""
    threads: list[str] = []
    scored = drift_monitor.psi

    def recorded(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return scored(*args)

    monkeypatch.setattr(drift_monitor, "psi", recorded)
    return threads


async def test_a_window_is_scored_in_the_monitors_thread_not_on_the_event_loop(
    monitor: DriftMonitor, psi_threads: list[str]
) -> None:
    """A review: a profile of 4096 features of 1001 bins held the event loop 85-450 ms
    at each window's close."""
    await feed(monitor, reference_sample(WINDOW, seed=1))
    assert psi_threads and all(name.startswith("drift-monitor") for name in psi_threads)


async def test_a_report_before_the_first_window_is_scored_in_the_monitors_thread(
    monitor: DriftMonitor, psi_threads: list[str]
) -> None:
    await feed(monitor, reference_sample(WINDOW // 2, seed=1))
    report = await monitor.report("source", "sensors")
    assert report is not None and not report.window.complete and report.top
    assert psi_threads and all(name.startswith("drift-monitor") for name in psi_threads)


async def test_a_windows_gauges_are_written_in_the_monitors_thread(store: ProfileStore) -> None:
    threads: list[str] = []

    class Telemetry(drift_monitor.QualityTelemetry):
        def feature_drift_scored(self, *args: Any) -> None:
            threads.append(threading.current_thread().name)

    monitor = DriftMonitor(store, window_records=WINDOW, telemetry=Telemetry())
    await monitor.start()
    try:
        await feed(monitor, reference_sample(WINDOW, seed=1))
    finally:
        await monitor.close()
    assert threads and all(name.startswith("drift-monitor") for name in threads)


async def test_one_streams_flood_leaves_room_for_another(tmp_path: Path) -> None:
    """A review: one tenant's flood on one source filled the shared mailbox, and every
    other source went unobserved."""
    write_profile(tmp_path, "sensors")
    write_profile(tmp_path, "quiet")
    profiles = ProfileStore(tmp_path, tmp_path / "models")
    profiles.refresh()
    stalled = DriftMonitor(profiles, window_records=WINDOW, mailbox_rows=1000)  # never started
    flood = [stalled.observe("sensors", "source", reference_sample(100, seed=n)) for n in range(20)]
    assert flood.count(True) == 5
    assert stalled.observe("quiet", "source", reference_sample(100, seed=99))
    await stalled.close()


async def test_the_mailbox_is_bounded_in_bytes_whatever_the_rows_width(tmp_path: Path) -> None:
    """A review: bounded in rows only, 20,000 rows of 4096 features were 655 MB."""
    wide = build_profile(
        np.random.default_rng(0).standard_normal((200, 4096)), kind="source", name="wide"
    )
    (tmp_path / "sources").mkdir(exist_ok=True)
    (tmp_path / "sources" / "wide.profile.json").write_bytes(msgspec.json.encode(wide))
    profiles = ProfileStore(tmp_path, tmp_path / "models")
    profiles.refresh()
    stalled = DriftMonitor(profiles, window_records=WINDOW, mailbox_rows=20_000)  # never started
    for n in range(40):
        stalled.observe("wide", "source", np.random.default_rng(n).standard_normal((500, 4096)))
    assert stalled.mailbox_depth * 4096 * 8 <= drift_monitor.MAILBOX_BYTES // 2
    await stalled.close()


async def test_a_removed_profiles_stream_and_counters_are_forgotten(tmp_path: Path) -> None:
    """A review: a profile observed and then removed kept its window, last scores and
    counters for good (~450 MB each at the largest profile)."""
    path = write_profile(tmp_path, "gone")
    profiles = ProfileStore(tmp_path, tmp_path / "models")
    profiles.refresh()
    monitor = DriftMonitor(profiles, window_records=WINDOW)
    await monitor.start()
    try:
        assert monitor.observe("gone", "source", reference_sample(WINDOW + 10, seed=1))
        await monitor.drained()
        assert ("source", "gone") in monitor._streams
        path.unlink()
        profiles.refresh()
        for _ in range(100):
            if ("source", "gone") not in monitor._streams:
                break
            await asyncio.sleep(0.01)
        assert ("source", "gone") not in monitor._streams
        assert ("source", "gone") not in monitor._counters_of
    finally:
        await monitor.close()


async def test_a_window_being_scored_is_reported_as_the_window_being_filled(
    monitor: DriftMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a report while a window was scored read no window at all, and one
    racing the close read a partial window's scores as the complete window's."""
    release = threading.Event()
    scored = drift_monitor._scored
    calls = 0

    def held_first(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            release.wait(10)  # the window's close, held while the report is asked
        return scored(*args)

    monkeypatch.setattr(drift_monitor, "_scored", held_first)
    assert monitor.observe("sensors", "source", reference_sample(WINDOW, seed=1))
    for _ in range(100):
        if calls:
            break
        await asyncio.sleep(0.01)
    assert calls == 1  # the close is being scored
    report = asyncio.ensure_future(monitor.report("source", "sensors"))
    await asyncio.sleep(0.05)
    release.set()
    answered = await report
    assert answered is not None
    assert (answered.window.complete, answered.window.windows_completed) == (False, 0)
    assert answered.window.pending_records == answered.window.records == WINDOW
    await monitor.drained()
