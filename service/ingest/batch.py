"""ValidatedBatch: an ingest batch after validation, before it is written.

Built by ``RecordValidator.validate`` and, when the source has a profile, replaced by
``QualityScreen.screen`` with records rejected or flagged; never changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from mlgate.schemas.ingest import RecordError, StoredRecord


@dataclass(frozen=True, slots=True)
class DriftRows:
    """The screened records' features for the drift monitor, given to it once the
    batch is written (``QualityScreen.observe_written``): the rows of records the
    dedup drops are left out then."""

    matrix: npt.NDArray[np.float64]
    records: list[StoredRecord]  # each row's record


@dataclass(frozen=True, slots=True)
class ValidatedBatch:
    source: str
    accepted: list[StoredRecord]
    errors: list[RecordError]
    # ``id`` of an accepted record -> its ``quality_flags`` header (profiles with
    # on_violation=flag): the copy flagged is the copy written, not another of its
    # record_id in the batch (a review: a clean record carried a duplicate's flags).
    quality_flags: dict[int, bytes] = field(default_factory=dict)
    # The record_ids mlgate made for records sent without one: unique, never tracked
    # by the record dedup.
    generated_ids: frozenset[str] = frozenset()
    drift: DriftRows | None = None  # from the quality screen, with a drift monitor

    @property
    def size(self) -> int:
        return len(self.accepted) + len(self.errors)
