"""ValidatedBatch: an ingest batch after validation, before it is written.

Built by ``RecordValidator.validate`` and, when the source has a profile, replaced by
``QualityScreen.screen`` with records rejected or flagged; never changed in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlgate.schemas.ingest import RecordError, StoredRecord


@dataclass(frozen=True, slots=True)
class ValidatedBatch:
    source: str
    accepted: list[StoredRecord]
    errors: list[RecordError]
    # record_id -> value of the ``quality_flags`` header (profiles with on_violation=flag)
    quality_flags: dict[str, bytes] = field(default_factory=dict)
    # The record_ids mlgate made for records sent without one: unique, never tracked
    # by the record dedup.
    generated_ids: frozenset[str] = frozenset()

    @property
    def size(self) -> int:
        return len(self.accepted) + len(self.errors)
