"""Delivery reports: what became of each record, read from mlgate's answer to its batch.

A 202 lists rejected records by index with their reason; the others were written
(``records_accepted``) or had been written before (``records_duplicate``). The answer
counts the two without naming them, so when one batch has both, its written records
are reported as ``ACCEPTED_OR_DUPLICATE``: written either way. Delivery is at least
once (mlgate's guarantee; its record-id dedup drops repeats within its window). A 422
whose errors all carry an index means every record was rejected.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    ACCEPTED_OR_DUPLICATE = "accepted_or_duplicate"
    REJECTED = "rejected"


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 5x as much to make, per record
class Delivery:
    """One record's report. ``delivered``: it is in the topic (at least once; repeats
    within the server's dedup window are dropped by ``record_id``)."""

    record_id: str
    outcome: Outcome
    reason: str | None = None
    tracking_id: str | None = None
    attempts: int = 1

    @property
    def delivered(self) -> bool:
        return self.outcome is not Outcome.REJECTED


def counts_every_record(answer: Any, records: int) -> bool:
    """Whether ``answer`` is a 202 ``IngestResponse`` accounting for ``records``: counts
    that add up to them, and ``errors`` naming ``records_rejected`` of them by index, each
    in the batch (an index past it would leave a rejected record reported written)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("tracking_id"), str):
        return False
    counts = [answer.get(name) for name in ("records_accepted", "records_rejected", "records_duplicate")]
    numbers: list[int] = [n for n in counts if _is_count(n)]
    if len(numbers) != len(counts) or sum(numbers) != records:
        return False
    errors = answer.get("errors", [])
    if not isinstance(errors, list):
        return False
    indices = {error.get("index") if isinstance(error, dict) else None for error in errors}
    in_batch = all(_is_count(index) and index < records for index in indices)
    return in_batch and len(indices) == answer["records_rejected"]


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def from_accepted(
    record_ids: Sequence[str], answer: Any, attempts: int
) -> list[Delivery]:
    """Reports from a 202 ``IngestResponse``."""
    answer = answer if isinstance(answer, dict) else {}
    tracking_id = answer.get("tracking_id")
    reasons = _reasons_by_index(answer.get("errors"), "error")
    if not answer.get("records_duplicate"):
        written = Outcome.ACCEPTED
    elif not answer.get("records_accepted"):
        written = Outcome.DUPLICATE
    else:
        written = Outcome.ACCEPTED_OR_DUPLICATE
    return [
        Delivery(record_id, Outcome.REJECTED, reasons[index], tracking_id, attempts)
        if index in reasons
        else Delivery(record_id, written, None, tracking_id, attempts)
        for index, record_id in enumerate(record_ids)
    ]


def all_rejected(
    record_ids: Sequence[str], field_errors: list[dict[str, Any]], detail: str, attempts: int
) -> list[Delivery] | None:
    """Reports from a 422 that rejected every record, or None when the 422 is about the
    batch itself (errors without an index)."""
    if not field_errors or any(not isinstance(e.get("index"), int) for e in field_errors):
        return None
    reasons = _reasons_by_index(field_errors, "msg")
    return [
        Delivery(record_id, Outcome.REJECTED, reasons.get(index, detail), None, attempts)
        for index, record_id in enumerate(record_ids)
    ]


def _reasons_by_index(errors: Any, member: str) -> dict[int, str]:
    reasons: dict[int, str] = {}
    if isinstance(errors, list):
        for error in errors:
            if isinstance(error, dict) and isinstance(error.get("index"), int):
                reasons[error["index"]] = str(error.get(member) or error.get("error") or "")
    return reasons
