"""DriftMonitor: rolling per-feature drift of each source and model against its profile.

One actor: one task, one mailbox bounded in rows and in bytes (``MAILBOX_BYTES``),
of which one stream (a source or a model) may hold at most half.
``observe(name, kind, matrix)`` never waits: it queues the batch matrix (rows x
features) if the mailbox has room for its rows, and otherwise drops it and counts the
drop, so ingestion and prediction never wait on drift. A review: bounded in rows
only, 20,000 rows of 4096 features were 655 MB, and one tenant's flood on one source
left every other source unobserved. The caller hands the matrix over and must not
mutate it afterwards.

Windows tumble: the task adds each batch's per-feature bin counts and out-of-range
counts to the current window of its stream (a source or a model); when the window
holds ``window_records`` rows (a batch straddling the boundary is split), the window
is scored - per feature, the population stability index against the reference bins
and the share of values outside the hard range - published through telemetry, kept
for ``report()``, and a new window starts empty. A feature whose PSI goes above the
threshold is named in one ``feature_drift`` warning per window (all features that
crossed in that window, highest PSI first, at most 32 listed) and not again until a
window in which it was back below (``feature_drift_recovered``).

The counting (a vectorised comparison per bin edge) runs in a thread the monitor owns,
where numpy lets go of the GIL, over everything waiting for a stream at once (so
single-row predictions are counted in batches); so do a window's scoring and the
writing of its gauges, and a report's scores and features (a review: for a profile
of 4096 features of 1001 bins each, a window's PSI held the event loop 85-450 ms and
a report's 0.1-2 s). The window bookkeeping and every piece of state stay on the
event loop.

Each process runs its own monitor over the records it sees. Its loop is supervised
(``SupervisedTask``): a crash is logged, counted in
``mlgate_background_task_crashes{task="drift-monitor"}`` and the loop restarted; the
observations it had taken are lost, those waiting are scored by the new loop. It
answers no request, so it does not gate ``/ready``. Only numeric matrices are
observed (an OIP BYTES tensor has no histogram).

The monitor watches the profile store and reports what its refreshes change
(through its ``QualityTelemetry``): the gauges of a profile removed,
or of features a replacing profile no longer has, are retired rather than left at
their last value; profile files that cannot be loaded are counted.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from mlgate.schemas.quality import DriftReport, DriftWindow, FeatureDrift, ProfileKind
from mlgate.workers.quality.profile import CompiledProfile, FloatMatrix, psi
from mlgate.workers.quality.profile_store import ProfileChanges, ProfileStore
from mlgate.workers.supervision import SupervisedTask
from mlgate.workers.telemetry import NO_QUALITY_TELEMETRY, QualityTelemetry

log = structlog.get_logger("mlgate.drift")
T = TypeVar("T")

# Observations taken from the mailbox at once; a stream's are counted in one pass.
MAX_TAKEN = 256
# The most the mailbox's matrices hold, whatever their width; a stream, half of it and
# of the rows.
MAILBOX_BYTES = 64 * 1024 * 1024
LOGGED_FEATURES = 32


@dataclass(slots=True)
class _Scored:
    psi: FloatMatrix
    out_of_range_share: FloatMatrix
    counts: npt.NDArray[np.int64]
    rows: int
    ended_at: str | None


@dataclass(slots=True)
class _Stream:
    profile: CompiledProfile
    counts: npt.NDArray[np.int64]
    out_of_range: npt.NDArray[np.int64]
    rows: int = 0
    windows: int = 0
    last: _Scored | None = None
    over: npt.NDArray[np.bool_] | None = None

    @classmethod
    def start(cls, profile: CompiledProfile) -> _Stream:
        return cls(
            profile=profile,
            counts=np.zeros((profile.n_features, profile.n_bins), dtype=np.int64),
            out_of_range=np.zeros(profile.n_features, dtype=np.int64),
        )

    def new_window(self) -> None:
        """A new window, empty; the closed one's arrays stay with its scores."""
        self.counts = np.zeros_like(self.counts)
        self.out_of_range = np.zeros_like(self.out_of_range)
        self.rows = 0


@dataclass(slots=True)
class _Counters:
    observed: int = 0
    dropped: int = 0
    rejected: int = 0
    flagged: int = 0


@dataclass(slots=True)
class _Observation:
    kind: ProfileKind
    name: str
    matrix: FloatMatrix


class DriftMonitor:
    name = "drift-monitor"

    def __init__(
        self,
        profiles: ProfileStore,
        *,
        window_records: int = 5000,
        psi_threshold: float = 0.2,
        mailbox_rows: int = 20_000,
        telemetry: QualityTelemetry = NO_QUALITY_TELEMETRY,
    ) -> None:
        self._profiles = profiles
        self.window_records = window_records
        self.psi_threshold = psi_threshold
        self._mailbox_rows = mailbox_rows
        self._telemetry = telemetry
        self._mailbox: asyncio.Queue[_Observation] = asyncio.Queue()
        self._queued_rows = 0
        self._queued_bytes = 0
        # By stream: rows and bytes waiting (``observe``'s share of the mailbox).
        self._waiting: dict[tuple[ProfileKind, str], tuple[int, int]] = {}
        self._streams: dict[tuple[ProfileKind, str], _Stream] = {}
        self._counters_of: dict[tuple[ProfileKind, str], _Counters] = {}
        # Supervised: a crash (a bug, or an observation it cannot score) is logged,
        # counted and restarted; what it had taken is dropped, what waits is kept.
        self._loop = SupervisedTask(self.name, self._run, telemetry)
        self._started = False
        self._executor: ThreadPoolExecutor | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # (kind, name, profile width) of profiles that rows of another width met, logged
        self._misfits_logged: set[tuple[str, str, int]] = set()
        # Held by a window's "profile still in force?" check and its gauge writes, and
        # by a refresh's retiring of one profile's gauges: a refresh landing between
        # check and write would have them re-created for a profile gone. Taken once per
        # profile retired, so the event loop (``_close_window``) waits at most for one
        # profile's gauges (a few ms for thousands of features), never a bulk retire.
        self._gauges_lock = threading.Lock()
        profiles.watch(self._profiles_changed)

    @property
    def mailbox_depth(self) -> int:
        """Rows waiting to be absorbed."""
        return self._queued_rows

    @property
    def healthy(self) -> bool:
        """Running, and not restarted within the last second."""
        return self._loop.healthy

    async def start(self) -> None:
        if not self._started and not self._closed:
            self._started = True
            self._event_loop = asyncio.get_running_loop()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            self._loop.start()

    async def close(self) -> None:
        self._closed = True
        await self._loop.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._discard_queued()

    def _discard_queued(self) -> None:
        while not self._mailbox.empty():
            self._mailbox.get_nowait()
            self._mailbox.task_done()
        self._queued_rows = self._queued_bytes = 0
        self._waiting.clear()

    # -- the callers' side: never waits ----------------------------------------------

    def observe(self, name: str, kind: ProfileKind, matrix: FloatMatrix) -> bool:
        """Queue a batch for scoring; False when none of it was (no profile, another
        width than the profile's, full, closed). A batch of more rows than the mailbox
        has room for queues evenly spaced rows to fill it, the rest dropped: one larger
        than the whole mailbox was dropped whole however empty it was (a review)."""
        profile = self._profiles.get(kind, name)
        if profile is None or matrix.ndim != 2:
            return False
        if matrix.dtype.kind not in "biuf":  # strings (an OIP BYTES tensor): no histogram
            return False
        rows = int(matrix.shape[0])
        if rows == 0:
            return False
        if matrix.shape[1] != profile.n_features:
            # A profile of another width than the model's input (or the model reloaded
            # wider): its drift is never scored, which is said once, and counted.
            # Once a profile's width (not a row's: a model with a free width would let
            # clients grow the set).
            if (kind, name, profile.n_features) not in self._misfits_logged:
                self._misfits_logged.add((kind, name, profile.n_features))
                log.warning(
                    "drift_profile_width_mismatch", kind=kind, name=name,
                    profile_features=profile.n_features, observed_features=int(matrix.shape[1]),
                )
            self._dropped(kind, name, rows)
            return False
        room = 0 if self._closed else self._room(kind, name, max(1, matrix.nbytes // rows))
        if room <= 0:
            self._dropped(kind, name, rows)
            return False
        if rows > room:
            matrix = matrix[:: math.ceil(rows / room)].copy()
            self._dropped(kind, name, rows - matrix.shape[0])
            rows = int(matrix.shape[0])
        self._queue(kind, name, rows, matrix.nbytes)
        self._mailbox.put_nowait(_Observation(kind, name, matrix))
        return True

    def _room(self, kind: ProfileKind, name: str, row_bytes: int) -> int:
        """Rows of ``row_bytes`` the stream may queue now: within the mailbox's rows and
        bytes, and within half of each for the stream."""
        rows, nbytes = self._waiting.get((kind, name), (0, 0))
        return min(
            self._mailbox_rows - self._queued_rows,
            (MAILBOX_BYTES - self._queued_bytes) // row_bytes,
            max(1, self._mailbox_rows // 2) - rows,
            (MAILBOX_BYTES // 2 - nbytes) // row_bytes,
        )

    def _queue(self, kind: ProfileKind, name: str, rows: int, nbytes: int) -> None:
        """Count rows and bytes in (positive) or out (negative) of the mailbox."""
        self._queued_rows += rows
        self._queued_bytes += nbytes
        key = (kind, name)
        held_rows, held_bytes = self._waiting.get(key, (0, 0))
        if held_rows + rows > 0:
            self._waiting[key] = (held_rows + rows, held_bytes + nbytes)
        else:
            self._waiting.pop(key, None)

    def _dropped(self, kind: ProfileKind, name: str, rows: int) -> None:
        self._counters(kind, name).dropped += rows
        self._telemetry.drift_observation_dropped(kind, name, rows)

    def record_violations(
        self, kind: ProfileKind, name: str, action: Literal["rejected", "flagged"], records: int
    ) -> None:
        """Count records rejected or flagged by a profile's hard range."""
        counters = self._counters(kind, name)
        if action == "rejected":
            counters.rejected += records
        else:
            counters.flagged += records
        self._telemetry.quality_violations(kind, name, action, records)

    def profile_unreadable(self, kind: ProfileKind, name: str) -> bool:
        """Whether the profile's file is there but cannot be loaded (none in force)."""
        return self._profiles.unreadable(kind, name)

    def _counters(self, kind: ProfileKind, name: str) -> _Counters:
        counters = self._counters_of.get((kind, name))
        if counters is None:
            counters = self._counters_of[(kind, name)] = _Counters()
        return counters

    def _profiles_changed(self, changes: ProfileChanges) -> None:
        """Retire the gauges of profiles gone or replaced; count unreadable ones.
        Runs in the profile store's refresh thread: touches telemetry only."""
        telemetry = self._telemetry
        removed = [(kind, name) for kind, name, _, now in changes.retired if now is None]
        if removed and self._event_loop is not None and not self._closed:
            # Their window, last scores and counters, on the loop that owns them (a
            # review: each kept ~450 MB of a large profile's counts for good).
            self._event_loop.call_soon_threadsafe(self._forget, removed)
        for kind, name, _, now in changes.retired:
            # Per profile: after a window's check-and-write, or before its check. The
            # store already holds the new profiles, so a window checking between two
            # profiles' retires sees its own profile gone (or replaced) and writes nothing.
            with self._gauges_lock:
                telemetry.feature_drift_retired(kind, name, now.names if now is not None else ())
        for kind, name in changes.failed:
            telemetry.quality_profile_load_failed(kind, name)
        for kind, count in changes.unreadable.items():
            telemetry.quality_profiles_unreadable(kind, count)

    def _forget(self, removed: list[tuple[ProfileKind, str]]) -> None:
        """The state of streams whose profile was removed (unless one came back)."""
        for kind, name in removed:
            if self._profiles.get(kind, name) is None:
                self._streams.pop((kind, name), None)
                self._counters_of.pop((kind, name), None)

    # -- the task -----------------------------------------------------------------------

    async def drained(self) -> None:
        """Return once everything observed so far has been absorbed."""
        await self._mailbox.join()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            taken = [await self._mailbox.get()]
            while not self._mailbox.empty() and len(taken) < MAX_TAKEN:
                taken.append(self._mailbox.get_nowait())
            # Out of the mailbox's bound at once: a crash on one stream drops the rest of
            # the take, and their rows must not stay counted against the bound.
            for observation in taken:
                matrix = observation.matrix
                self._queue(observation.kind, observation.name, -matrix.shape[0], -matrix.nbytes)
            try:
                for (kind, name), (matrices, other_width) in _by_stream(taken).items():
                    if other_width:
                        self._dropped(kind, name, other_width)
                    matrix = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
                    await self._take(loop, kind, name, matrix)
            finally:
                for _ in taken:
                    self._mailbox.task_done()

    async def _take(
        self, loop: asyncio.AbstractEventLoop, kind: ProfileKind, name: str, matrix: FloatMatrix
    ) -> None:
        profile = self._profiles.get(kind, name)
        if profile is None or matrix.shape[1] != profile.n_features:
            # The profile went away or changed shape while this waited.
            self._dropped(kind, name, matrix.shape[0])
            return
        stream = self._stream(kind, name, profile)
        self._counters(kind, name).observed += matrix.shape[0]
        start, rows = 0, matrix.shape[0]
        while start < rows:
            take = min(rows - start, self.window_records - stream.rows)
            part = matrix[start : start + take]
            counts, outside = await loop.run_in_executor(self._executor, _tally, profile, part)
            stream.counts += counts
            stream.out_of_range += outside
            stream.rows += take
            start += take
            if stream.rows >= self.window_records:
                await self._close_window(loop, kind, name, stream)

    def _stream(self, kind: ProfileKind, name: str, profile: CompiledProfile) -> _Stream:
        stream = self._streams.get((kind, name))
        if stream is None or stream.profile is not profile:
            # A new or replaced profile: windows scored against the old one no longer apply.
            stream = self._streams[(kind, name)] = _Stream.start(profile)
        return stream

    async def _close_window(
        self, loop: asyncio.AbstractEventLoop, kind: ProfileKind, name: str, stream: _Stream
    ) -> None:
        profile = stream.profile
        # Left in place while scored, as the window being filled (a report meanwhile
        # reads it so; a review read no window at all): nothing else adds to this
        # stream's window until the close is done, its tallies come from this task.
        ended_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        scored, in_force = await loop.run_in_executor(
            self._executor, self._published, kind, name, profile,
            stream.counts, stream.out_of_range, stream.rows, ended_at,
        )
        stream.new_window()
        stream.last = scored
        stream.windows += 1
        if not in_force:
            return  # removed or replaced while scored: nothing to say of it
        over = scored.psi > self.psi_threshold
        before = stream.over if stream.over is not None else np.zeros_like(over)
        crossed, recovered = np.flatnonzero(over & ~before), np.flatnonzero(before & ~over)
        if len(crossed):
            log.warning(
                "feature_drift", kind=kind, name=name, threshold=self.psi_threshold,
                window_records=scored.rows, features_over=int(over.sum()),
                crossed=_described(profile, scored, crossed),
            )
        if len(recovered):
            log.info(
                "feature_drift_recovered", kind=kind, name=name, threshold=self.psi_threshold,
                window_records=scored.rows, features_over=int(over.sum()),
                recovered=_described(profile, scored, recovered),
            )
        stream.over = over

    def _published(
        self,
        kind: ProfileKind,
        name: str,
        profile: CompiledProfile,
        counts: npt.NDArray[np.int64],
        outside: npt.NDArray[np.int64],
        rows: int,
        ended_at: str,
    ) -> tuple[_Scored, bool]:
        """A closed window scored and its gauges written, and whether its profile is
        still in force. Runs in the monitor's thread."""
        scored = _scored(profile, counts, outside, rows, ended_at)
        psi_values, shares = scored.psi.tolist(), scored.out_of_range_share.tolist()
        with self._gauges_lock:
            in_force = self._profiles.get(kind, name) is profile  # not retired meanwhile
            if in_force:
                self._telemetry.feature_drift_scored(kind, name, profile.names, psi_values, shares)
        return scored, in_force

    # -- reading ----------------------------------------------------------------------

    async def report(self, kind: ProfileKind, name: str, top: int = 10) -> DriftReport | None:
        """The drift of a source or model, ``top`` features by PSI; None without a profile.
        Its scores (of the window being filled, before the first completes) and its
        features are made in the monitor's thread."""
        profile = self._profiles.get(kind, name)
        if profile is None:
            return None
        counters = self._counters_of.get((kind, name), _Counters())
        stream = self._streams.get((kind, name))
        if stream is not None and stream.profile is not profile:
            stream = None
        scored: _Scored | None = None
        loop = asyncio.get_running_loop()
        # What the report says of its window, read at once: a window may close while
        # its scores are made (a review: a partial window's scores read as complete).
        complete = stream is not None and stream.last is not None
        windows = stream.windows if stream is not None else 0
        pending = stream.rows if stream is not None else 0
        if stream is not None:
            scored = stream.last
            if scored is None and stream.rows:
                # Copied now: the window goes on filling while its copy is scored.
                scored = await self._in_thread(
                    loop, _scored, profile, stream.counts.copy(), stream.out_of_range.copy(),
                    stream.rows, None,
                )
        features: list[FeatureDrift] = []
        over_count = 0
        if scored is not None:
            over_count = int((scored.psi > self.psi_threshold).sum())
            features = await self._in_thread(
                loop, _features, profile, scored, self.psi_threshold, top
            )
        return DriftReport(
            kind=kind,
            name=name,
            profile_version=profile.profile.version,
            profile_created_at=profile.profile.created_at,
            reference_count=profile.profile.reference_count,
            on_violation=profile.profile.on_violation,
            psi_threshold=self.psi_threshold,
            features=profile.n_features,
            features_over_threshold=over_count,
            window=DriftWindow(
                mode="tumbling",
                size=self.window_records,
                records=scored.rows if scored is not None else 0,
                complete=complete,
                windows_completed=windows,
                pending_records=pending,
                ended_at=scored.ended_at if scored is not None else None,
            ),
            records_observed=counters.observed,
            records_dropped=counters.dropped,
            records_rejected=counters.rejected,
            records_flagged=counters.flagged,
            top=features,
        )

    async def _in_thread(
        self, loop: asyncio.AbstractEventLoop, work: Callable[..., T], *args: object
    ) -> T:
        """``work(*args)`` in the monitor's thread; here when it has none (not started,
        or closed)."""
        if self._executor is None or self._closed:
            return work(*args)
        return await loop.run_in_executor(self._executor, work, *args)


def _scored(
    profile: CompiledProfile,
    counts: npt.NDArray[np.int64],
    outside: npt.NDArray[np.int64],
    rows: int,
    ended_at: str | None,
) -> _Scored:
    """A window's scores: ``counts`` is the window's own (kept, not copied)."""
    return _Scored(
        psi=psi(profile.reference, counts, max(rows, 1)),
        out_of_range_share=outside / max(rows, 1),
        counts=counts,
        rows=rows,
        ended_at=ended_at,
    )


def _features(
    profile: CompiledProfile, scored: _Scored, threshold: float, top: int
) -> list[FeatureDrift]:
    """The ``top`` features by PSI, with both distributions."""
    over = scored.psi > threshold
    order = np.argsort(-scored.psi, kind="stable")[: max(top, 0)]
    rows = max(scored.rows, 1)
    features = []
    for i in order.tolist():
        bins = profile.real_bins(i)
        features.append(
            FeatureDrift(
                index=i,
                name=profile.names[i],
                psi=float(scored.psi[i]),
                out_of_range_share=float(scored.out_of_range_share[i]),
                over_threshold=bool(over[i]),
                edges=profile.features[i].edges,
                reference=profile.reference[i, :bins].tolist(),
                recent=(scored.counts[i, :bins] / rows).tolist(),
            )
        )
    return features


def _by_stream(
    taken: list[_Observation],
) -> dict[tuple[ProfileKind, str], tuple[list[FloatMatrix], int]]:
    """The observations of ``taken`` by stream, those of one stream as wide as its
    last, and the rows of the others: rows queued under a profile since replaced by
    one of another width are not of this profile (a review: concatenated with the new
    rows, they crashed the task and lost the whole take, uncounted)."""
    streams: dict[tuple[ProfileKind, str], list[FloatMatrix]] = {}
    for item in taken:
        streams.setdefault((item.kind, item.name), []).append(item.matrix)
    kept: dict[tuple[ProfileKind, str], tuple[list[FloatMatrix], int]] = {}
    for key, matrices in streams.items():
        width = matrices[-1].shape[1]
        same = [matrix for matrix in matrices if matrix.shape[1] == width]
        kept[key] = (same, sum(matrix.shape[0] for matrix in matrices) - sum(m.shape[0] for m in same))
    return kept


def _tally(
    profile: CompiledProfile, matrix: FloatMatrix
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per-(feature, bin) counts and per-feature out-of-range counts. Runs in the
    monitor's thread: pure, and numpy lets go of the GIL while it compares and sums."""
    return profile.bin_counts(matrix), np.count_nonzero(profile.out_of_range(matrix), axis=0)


def _described(
    profile: CompiledProfile, scored: _Scored, indexes: npt.NDArray[np.intp]
) -> list[dict[str, object]]:
    """The features of a log line, highest PSI first, at most ``LOGGED_FEATURES``."""
    ranked = sorted(indexes.tolist(), key=lambda i: -scored.psi[i])[:LOGGED_FEATURES]
    return [
        {
            "feature": profile.names[i],
            "index": i,
            "psi": round(float(scored.psi[i]), 4),
            "out_of_range_share": round(float(scored.out_of_range_share[i]), 4),
        }
        for i in ranked
    ]
