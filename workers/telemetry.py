"""What the workers report about their work, as protocols the service implements.

Workers stay free of any metrics library: they call these methods, and the service's
``Metrics`` turns the calls into Prometheus series. ``NO_TELEMETRY`` ignores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class SupervisionTelemetry(Protocol):
    """What supervised background tasks report (``workers.supervision``)."""

    def background_task_crashed(self, task: str) -> None: ...


class _NoSupervisionTelemetry:
    def background_task_crashed(self, task: str) -> None:
        pass


NO_SUPERVISION_TELEMETRY: SupervisionTelemetry = _NoSupervisionTelemetry()


class WorkerTelemetry(SupervisionTelemetry, Protocol):
    def kafka_batch_acked(self, records: int, seconds: float) -> None: ...

    def kafka_batch_failed(self, records: int) -> None:
        """Records of a produce attempt that failed: no outcome of theirs (they spill,
        are sent again, or their write is answered 503, ``records_failed``)."""

    def records_spilled(self, records: int) -> None: ...

    def records_failed(self, records: int) -> None:
        """Records neither produced nor spilled: their write is answered 503."""

    def records_resent(self, records: int) -> None:
        """Records about to be sent again though a produce that timed out (or lost its
        connection) may have written them: each is possibly a duplicate in Kafka."""
        ...

    def inference_batch_ran(
        self, model: str, version: str, rows: int, queue_s: float, compute_s: float
    ) -> None: ...

    def model_load_failed(self, model: str, version: str) -> None: ...

    def local_log_write_failed(self) -> None: ...

    def local_log_batch_written(self, records: int) -> None: ...

    def local_log_batch_failed(self, records: int) -> None: ...


class _NoTelemetry(_NoSupervisionTelemetry):
    def kafka_batch_acked(self, records: int, seconds: float) -> None:
        pass

    def kafka_batch_failed(self, records: int) -> None:
        pass

    def records_spilled(self, records: int) -> None:
        pass

    def records_failed(self, records: int) -> None:
        pass

    def records_resent(self, records: int) -> None:
        pass

    def inference_batch_ran(
        self, model: str, version: str, rows: int, queue_s: float, compute_s: float
    ) -> None:
        pass

    def model_load_failed(self, model: str, version: str) -> None:
        pass

    def local_log_write_failed(self) -> None:
        pass

    def local_log_batch_written(self, records: int) -> None:
        pass

    def local_log_batch_failed(self, records: int) -> None:
        pass


NO_TELEMETRY: WorkerTelemetry = _NoTelemetry()


class QualityTelemetry(SupervisionTelemetry, Protocol):
    """What the data-quality checks and the drift monitor report (per source or model)."""

    def feature_drift_scored(
        self, kind: str, name: str, features: Sequence[str], psi: Sequence[float],
        out_of_range_share: Sequence[float],
    ) -> None: ...

    def quality_violations(self, kind: str, name: str, action: str, records: int) -> None: ...

    def drift_observation_dropped(self, kind: str, name: str, records: int) -> None: ...

    # The profile store's refreshes, reported from the refresh's thread.
    def feature_drift_retired(self, kind: str, name: str, keep: Sequence[str]) -> None:
        """The drift gauges of ``kind``/``name`` no longer apply, but for the features
        named in ``keep`` (none: the profile was removed)."""
        ...

    def quality_profile_load_failed(self, kind: str, name: str) -> None: ...

    def quality_profiles_unreadable(self, kind: str, count: int) -> None:
        """``count`` profile files of ``kind`` are there but cannot be loaded."""
        ...


class _NoQualityTelemetry(_NoSupervisionTelemetry):
    def feature_drift_scored(
        self, kind: str, name: str, features: Sequence[str], psi: Sequence[float],
        out_of_range_share: Sequence[float],
    ) -> None:
        pass

    def quality_violations(self, kind: str, name: str, action: str, records: int) -> None:
        pass

    def drift_observation_dropped(self, kind: str, name: str, records: int) -> None:
        pass

    def feature_drift_retired(self, kind: str, name: str, keep: Sequence[str]) -> None:
        pass

    def quality_profile_load_failed(self, kind: str, name: str) -> None:
        pass

    def quality_profiles_unreadable(self, kind: str, count: int) -> None:
        pass


NO_QUALITY_TELEMETRY: QualityTelemetry = _NoQualityTelemetry()

