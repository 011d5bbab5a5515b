"""Reference and drifted feature samples the data-quality tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from mlgate.schemas.quality import OnViolation, ProfileKind
from mlgate.workers.quality.profile import build_profile
from mlgate.workers.quality.profile_store import ProfileStore

FEATURES = 8
SWAPPED = (0, 1)
RESCALED = 5
DRIFTED = {f"f{SWAPPED[0]}", f"f{SWAPPED[1]}", f"f{RESCALED}"}


def reference_sample(rows: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """Feature j ~ Normal(2j, 1 + j/2): every feature has its own place and spread."""
    rng = np.random.default_rng(seed)
    columns = np.arange(FEATURES)
    return rng.normal(loc=2.0 * columns, scale=1.0 + columns / 2, size=(rows, FEATURES))


def drifted(sample: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The producer's bug: two features swapped, one sent in another unit."""
    out = sample.copy()
    out[:, list(SWAPPED)] = out[:, list(reversed(SWAPPED))]
    out[:, RESCALED] *= 2.0
    return out


def write_profile(
    profiles_dir: Path,
    name: str,
    *,
    kind: ProfileKind = "source",
    on_violation: OnViolation = "reject",
    rows: int = 20_000,
) -> Path:
    profile = build_profile(reference_sample(rows, seed=99), kind=kind, name=name, on_violation=on_violation)
    return ProfileStore(profiles_dir, profiles_dir / "models").save(profile)


def records(matrix: npt.NDArray[np.float64], prefix: str = "r") -> list[dict[str, object]]:
    return [
        {"record_id": f"{prefix}-{i}", "features": row}
        for i, row in enumerate(matrix.tolist())
    ]
