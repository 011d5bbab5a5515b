"""QualityScreen against the profile store: one read of one refresh; the Retry-After
of a source refused for its unreadable profile."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlgate.config import Settings
from mlgate.schemas.ingest import StoredRecord
from mlgate.service.http.errors import Overloaded
from mlgate.service.ingest.batch import ValidatedBatch
from mlgate.service.ingest.quality_screen import QualityScreen
from mlgate.workers.quality.profile import CompiledProfile
from mlgate.workers.quality.profile_store import ProfileStore
from tests.conftest import AppClientFactory
from tests.quality_data import FEATURES, write_profile


class RefreshedMidRead(ProfileStore):
    """A store whose next read is followed by a refresh that fixes a broken profile:
    where a thread switch to the poll would land between two reads of the screen."""

    fix: Callable[[], None] | None = None

    def _then_refresh(self) -> None:
        fix, self.fix = self.fix, None
        if fix is not None:
            fix()
            self.refresh()

    def source(self, name: str) -> CompiledProfile | None:
        profile = super().source(name)
        self._then_refresh()
        return profile

    def unreadable(self, kind: Any, name: str) -> bool:
        answer = super().unreadable(kind, name)
        self._then_refresh()
        return answer

    def source_state(self, name: str) -> tuple[CompiledProfile | None, bool]:
        state = super().source_state(name)
        self._then_refresh()
        return state


def out_of_range(source: str = "sensors") -> ValidatedBatch:
    records = [
        StoredRecord(record_id=f"r{i}", timestamp="2026-01-01T00:00:00Z",
                     features=[1e6] * FEATURES, label=None, metadata={}, source=source)
        for i in range(3)
    ]
    return ValidatedBatch(source=source, accepted=records, errors=[])


def test_a_profile_fixed_while_a_batch_is_screened_never_lets_it_through_unchecked(
    tmp_path: Path,
) -> None:
    """A review: the screen read the profile (none), a refresh loaded the fixed file,
    the screen read "unreadable" (no longer): the batch passed neither refused nor
    screened."""
    path = write_profile(tmp_path, "sensors", on_violation="reject")
    good = path.read_bytes()
    path.write_text('{"kind": "sou')
    store = RefreshedMidRead(tmp_path, tmp_path / "models")
    store.refresh()

    def fix() -> None:
        path.write_bytes(good)

    store.fix = fix
    try:
        screened = QualityScreen(store).screen(out_of_range())
    except Overloaded:
        pass  # refused for the profile as read: fine
    else:
        assert screened.accepted == [] and len(screened.errors) == 3
    assert store.fix is None and store.source("sensors") is not None


@pytest.mark.parametrize(
    ("overrides", "retry_after"),
    [
        ({"profiles_poll_interval_s": 30}, "30"),
        ({"profiles_poll_interval_s": 0.2}, "1"),
        ({"profiles_poll_interval_s": 2.5}, "3"),
        ({"profiles_poll_interval_s": 0, "retry_after_s": 7}, "7"),
    ],
)
async def test_an_unreadable_profile_asks_to_retry_after_the_next_poll(
    app_client: AppClientFactory, make_settings: Callable[..., Settings], tmp_path: Path,
    overrides: dict[str, Any], retry_after: str,
) -> None:
    """A review: Retry-After was 5 s whatever MLGATE_PROFILES_POLL_INTERVAL_S said."""
    profiles_dir = tmp_path / "profiles"
    write_profile(profiles_dir, "sensors").write_text("{")
    client = await app_client(
        make_settings(profiles_dir=str(profiles_dir), feature_dims=(FEATURES,), **overrides)
    )
    response = await client.post(
        "/api/v2/ingest",
        json={"source": "sensors", "records": [{"record_id": "a", "features": [0.0] * FEATURES}]},
    )
    assert response.status == 503
    assert response.headers["Retry-After"] == retry_after
