"""Data-quality types: the feature profile file, and the drift report the service answers.

A profile (``QualityProfile``) is a small versioned JSON file, one per source
(``<profiles_dir>/sources/<source>.profile.json``) or per model
(``<model_repository>/<model>/profile.json``), written by
``mlgate quality profile``. Per feature it holds the hard range a value
must fall in and the reference distribution as quantile bins: ``edges`` are the inner
bin edges in ascending order (bin ``k`` holds ``edges[k-1] <= v < edges[k]``, the
first and last bins are open-ended), ``proportions`` the reference share per bin
(``len(edges) + 1`` values summing to 1).

``DriftReport`` is the answer of ``GET /api/v2/quality/{sources|models}/{name}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PROFILE_VERSION = 1
MAX_PROFILE_FEATURES = 4096
# The most inner bin edges a feature may have (1,001 bins).
MAX_EDGES = 1000

FeatureName = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=256, pattern="^(?!dimension$)[^,+\\s](?:[^,]*[^,\\s])?$",
        description=(
            "Any text but a comma, not 'dimension', neither beginning with '+' (the "
            "header's count of names left out) nor with or ending in a blank"
        ),
    ),
]
ProfileKind = Literal["source", "model"]
OnViolation = Literal["reject", "flag"]


class FeatureProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One feature of a profile: its hard range and reference distribution."""

    index: Annotated[int, msgspec.Meta(ge=0)]
    # Named in the ``quality_flags`` header, comma-separated, where ``dimension`` says a
    # record of another width: a name may be neither (a review: ``a,b`` read as two).
    name: FeatureName | None = None
    min: float
    max: float
    edges: Annotated[list[float], msgspec.Meta(min_length=1, max_length=MAX_EDGES)]
    proportions: Annotated[list[float], msgspec.Meta(min_length=2, max_length=1001)]


class QualityProfile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a source's records or a model's inputs are expected to look like."""

    # A later version than this server knows is refused, not read as this one.
    version: Annotated[int, msgspec.Meta(ge=1, le=PROFILE_VERSION)] = PROFILE_VERSION
    kind: ProfileKind
    name: str
    created_at: str
    reference_count: Annotated[int, msgspec.Meta(gt=0)]
    on_violation: OnViolation = "reject"
    features: Annotated[list[FeatureProfile], msgspec.Meta(min_length=1, max_length=MAX_PROFILE_FEATURES)]


class FeatureDrift(msgspec.Struct, frozen=True, kw_only=True):
    """One feature's drift over the scored window, with both distributions per bin."""

    index: int
    name: str
    psi: float
    out_of_range_share: float
    over_threshold: bool
    edges: list[float]
    reference: list[float]
    recent: list[float]


class DriftWindow(msgspec.Struct, frozen=True, kw_only=True):
    """Which records the scores cover.

    Windows tumble: every ``size`` records observed are scored together, then a new
    window starts empty. The scores are those of the last complete window, or of the
    window being filled (``complete`` false) before the first one completes.
    """

    mode: Literal["tumbling"]
    size: int
    records: int
    complete: bool
    windows_completed: int
    pending_records: int
    ended_at: str | None


class DriftReport(msgspec.Struct, frozen=True, kw_only=True):
    """Drift of one source or model against its profile, as seen by this process."""

    kind: ProfileKind
    name: str
    profile_version: int
    profile_created_at: str
    reference_count: int
    on_violation: OnViolation
    psi_threshold: float
    features: int
    features_over_threshold: int
    window: DriftWindow
    records_observed: int
    records_dropped: int
    records_rejected: int
    records_flagged: int
    top: list[FeatureDrift]


profile_decoder = msgspec.json.Decoder(QualityProfile)
report_decoder = msgspec.json.Decoder(DriftReport)
_profile_encoder = msgspec.json.Encoder()


def encode_profile(profile: QualityProfile) -> bytes:
    """The profile as indented JSON, for a file people may read and edit."""
    return msgspec.json.format(_profile_encoder.encode(profile), indent=1)
