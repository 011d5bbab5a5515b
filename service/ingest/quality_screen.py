"""QualityScreen: semantic validation of an ingest batch against its source's profile.

``RecordValidator.validate`` hands the screen every batch it accepted and gets a new
``ValidatedBatch`` back; without a
profile for the source the batch passes untouched. With one, the accepted records'
features become one numpy matrix and the profile's hard ranges are checked in one
vectorised pass. A record with a value out of range (or with another number of
features than the profile) is, by the profile's ``on_violation``:

- ``reject``: rejected with its index and the offending feature names (partial
  success, like any other bad record);
- ``flag``: accepted and marked with the Kafka header ``quality_flags``, the
  comma-separated names of the offending features (``dimension`` for a record of the
  wrong size; past 32 names, ``+N`` says how many more). Flags are kept by record
  (not by record_id), so they survive the route dropping duplicates from the batch and
  stay on the copy flagged.

Either way the violations are counted (flags once their records are written), and the whole matrix, violating rows included,
goes to the drift monitor once the batch is written (``observe_written``), but the
rows of records the dedup dropped: out-of-range values are drift too, a batch sent
again is not. With
``MLGATE_DRIFT_SAMPLE_EVERY`` = k, every k-th row of a source's stream of accepted
rows goes (the phase carries from one batch to the next, so single-record batches are
sampled too), copied: the monitor's mailbox holds the sampled rows, not the batch.

A source whose profile file is there but cannot be read, with no earlier version in
force (``ProfileStore.source_state``), fails closed: its records are refused with 503
and ``Retry-After`` (nothing is written) until the profile loads, since letting them
through would switch a ``reject`` check off. ``Retry-After`` is the profiles' poll
interval (at least 1 s), the time until the file is read again; with polling off,
``MLGATE_RETRY_AFTER_S``.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import numpy as np

from mlgate.config import Settings
from mlgate.schemas.ingest import FeaturesText, RecordError, StoredRecord
from mlgate.service.http.errors import Overloaded
from mlgate.service.ingest.batch import DriftRows, ValidatedBatch
from mlgate.workers.quality.drift_monitor import DriftMonitor
from mlgate.workers.quality.profile import CompiledProfile, FloatMatrix
from mlgate.workers.quality.profile_store import ProfileStore

QUALITY_FLAGS_HEADER = "quality_flags"
MAX_FLAGGED_NAMES = 32
DIMENSION = "dimension"
# Profiles are rescanned every MLGATE_PROFILES_POLL_INTERVAL_S (5 s by default).
UNREADABLE_RETRY_AFTER_S = 5


def unreadable_retry_after_s(settings: Settings) -> int:
    """Retry-After of a source refused for its unreadable profile: until the next poll
    reads it again (at least 1 s); with polling off (SIGHUP only), ``retry_after_s``."""
    interval = settings.profiles_poll_interval_s
    if interval <= 0:
        return settings.retry_after_s
    return max(1, math.ceil(interval))


class QualityScreen:
    def __init__(
        self, profiles: ProfileStore, monitor: DriftMonitor | None = None, sample_every: int = 1,
        *, unreadable_retry_after_s: int = UNREADABLE_RETRY_AFTER_S,
    ) -> None:
        self._profiles = profiles
        self._monitor = monitor
        self._unreadable_retry_after_s = unreadable_retry_after_s
        # Drift is a distribution estimate: every k-th row estimates it as well at high
        # rates, for a k-th of the monitor's CPU. Range checks always see every row.
        self._sample_every = sample_every
        # source -> the position in the next batch of the next row the sample takes
        self._sample_phase: dict[str, int] = {}

    @classmethod
    def for_settings(
        cls, settings: Settings, profiles: ProfileStore, monitor: DriftMonitor | None
    ) -> QualityScreen:
        return cls(
            profiles, monitor, settings.drift_sample_every,
            unreadable_retry_after_s=unreadable_retry_after_s(settings),
        )

    def screen(self, batch: ValidatedBatch) -> ValidatedBatch:
        """The batch with records outside the source profile rejected or flagged.

        Raises ``Overloaded`` (503) while the source's profile cannot be read."""
        if not batch.accepted:
            return batch
        # One read of one refresh: the profile and the refusal never from two refreshes.
        profile, unreadable = self._profiles.source_state(batch.source)
        if profile is None:
            if unreadable:
                raise Overloaded(
                    f"Source {batch.source}: its quality profile cannot be read, so its "
                    "records are refused until it loads",
                    retry_after_s=self._unreadable_retry_after_s,
                )
            return batch
        matrix, positions = _feature_matrix(batch.accepted, profile.n_features)
        # accepted position -> the offending feature names
        violations: dict[int, list[str]] = {
            position: [DIMENSION]
            for position in _misfits(positions, len(batch.accepted))
        }
        for row, features in profile.range_violations(matrix):
            position = row if positions is None else positions[row]
            violations[position] = [profile.names[f] for f in features]
        if self._monitor is not None:
            records = batch.accepted if positions is None else [batch.accepted[p] for p in positions]
            batch = replace(batch, drift=DriftRows(matrix, records))
        if not violations:
            return batch
        if profile.profile.on_violation == "flag":
            # Counted once written (``observe_written``): a resent batch's duplicates
            # are not flagged in Kafka again.
            flags = {id(batch.accepted[p]): _header_value(names) for p, names in violations.items()}
            return replace(batch, quality_flags=flags)
        return self._reject(batch, profile, violations)

    def observe_written(self, screened: ValidatedBatch, written: ValidatedBatch) -> None:
        """The drift monitor sees ``screened``'s rows once the batch is written (its
        rejected rows too: out-of-range values are drift), but not those of records
        ``written`` left out as duplicates: a batch sent again is not new data (a
        review: three sends of one batch were observed three times). Flagged records
        are counted here too, those written only (a review: a batch sent three times
        counted its flags three times, more than were observed)."""
        if screened.quality_flags:
            flags = screened.quality_flags
            if len(written.accepted) == len(screened.accepted):
                flagged = len(flags)
            else:
                flagged = sum(1 for record in written.accepted if id(record) in flags)
            if flagged:
                self._count(screened.source, "flagged", flagged)
        drift = screened.drift
        if drift is None or self._monitor is None:
            return
        matrix = drift.matrix
        if len(written.accepted) != len(screened.accepted):
            dropped = {id(record) for record in screened.accepted} - {
                id(record) for record in written.accepted
            }
            matrix = matrix[[row for row, record in enumerate(drift.records) if id(record) not in dropped]]
        if matrix.shape[0]:
            self._monitor.observe(screened.source, "source", self._sample(screened.source, matrix))

    def _sample(self, source: str, matrix: FloatMatrix) -> FloatMatrix:
        """Every k-th row of the source's stream in ``matrix``, as a copy."""
        every = self._sample_every
        if every == 1:
            return matrix
        phase = self._sample_phase.get(source, 0)
        self._sample_phase[source] = (phase - matrix.shape[0]) % every
        return matrix[phase::every].copy()

    def _reject(
        self, batch: ValidatedBatch, profile: CompiledProfile, violations: dict[int, list[str]]
    ) -> ValidatedBatch:
        failed = {error.index for error in batch.errors}
        item_index = [i for i in range(batch.size) if i not in failed]
        errors = list(batch.errors)
        accepted: list[StoredRecord] = []
        for position, record in enumerate(batch.accepted):
            names = violations.get(position)
            if names is None:
                accepted.append(record)
            else:
                # A record sent without an id was given one that nothing stored: its
                # error names none, as a schema refusal's does (a review).
                sent_id = None if record.record_id in batch.generated_ids else record.record_id
                errors.append(
                    RecordError(
                        index=item_index[position],
                        record_id=sent_id,
                        error=_reason(batch.source, profile, record, names),
                    )
                )
        errors.sort(key=lambda error: error.index)
        self._count(batch.source, "rejected", len(violations))
        return replace(batch, accepted=accepted, errors=errors)

    def _count(self, source: str, action: Literal["rejected", "flagged"], records: int) -> None:
        if self._monitor is not None:
            self._monitor.record_violations("source", source, action, records)


@functools.cache
def _packer(width: int) -> Callable[..., bytes]:
    return struct.Struct(f"{width}d").pack


def _feature_matrix(
    records: list[StoredRecord], width: int
) -> tuple[FloatMatrix, list[int] | None]:
    """The records' features as rows (read-only); with records of another width left
    out, the accepted position of each row (None when every record fits).

    ``struct.pack`` of each list, joined, is about twice as fast as ``np.array`` on the
    nested lists, and refuses a list of another length by itself.
    """
    # Rows of a packed batch's matrix (service.ingest.validation), with their JSON text
    # or not: stacked as they are.
    rows = [
        features.values if isinstance(features, FeaturesText) else features
        for features in (record.features for record in records)
    ]
    if rows and all(isinstance(row, np.ndarray) and row.shape == (width,) for row in rows):
        return np.stack(rows).astype(np.float64, copy=False), None
    pack = _packer(width)
    try:
        data = b"".join([pack(*features) for features in rows])
        return np.frombuffer(data, dtype=np.float64).reshape(-1, width), None
    except struct.error:  # records of another dimension
        pass
    positions = [i for i, features in enumerate(rows) if len(features) == width]
    data = b"".join([pack(*rows[i]) for i in positions])
    return np.frombuffer(data, dtype=np.float64).reshape(-1, width), positions


def _misfits(positions: list[int] | None, count: int) -> list[int]:
    if positions is None:
        return []
    fitting = set(positions)
    return [i for i in range(count) if i not in fitting]


def _header_value(names: list[str]) -> bytes:
    shown = ",".join(names[:MAX_FLAGGED_NAMES])
    if len(names) > MAX_FLAGGED_NAMES:
        shown += f",+{len(names) - MAX_FLAGGED_NAMES}"
    return shown.encode()


def _reason(source: str, profile: CompiledProfile, record: StoredRecord, names: list[str]) -> str:
    if len(record.features) != profile.n_features:
        return (
            f"features has {len(record.features)} values; "
            f"the profile of source {source} expects {profile.n_features}"
        )
    shown = ", ".join(names[:MAX_FLAGGED_NAMES])
    more = f" and {len(names) - MAX_FLAGGED_NAMES} more" if len(names) > MAX_FLAGGED_NAMES else ""
    return f"features outside the range of source {source}'s profile: {shown}{more}"
