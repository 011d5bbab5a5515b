"""A feature profile as numbers: built from a reference sample, checked against batches.

``build_profile`` turns a reference matrix (rows x features) into a
``schemas.quality.QualityProfile``: per feature, the hard range (the reference's
min/max widened by a margin) and quantile bin edges with the reference share per bin.
``CompiledProfile`` holds the same profile as numpy arrays so every check is one
vectorised pass over a batch matrix: the hard-range check (``range_violations``),
the per-bin counts (``bin_counts``) and the out-of-range counts the drift monitor
accumulates, and ``psi`` scores a window's counts against the reference.

Features have different numbers of distinct edges (ties collapse quantiles), so
edges are padded to a common count with ``+inf``: a padded edge is never reached,
its bin stays empty in both the reference and the window, and adds 0 to the PSI.

A value that is not finite (NaN or +-inf, which an OIP binary tensor can carry) is
out of range and in no bin. Every number of a profile is finite: a profile holding
another is refused (``NonFiniteProfile``), as a bound msgspec would write as ``null``
makes a file the service cannot load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from mlgate.schemas.quality import FeatureProfile, OnViolation, ProfileKind, QualityProfile

# Shares below this are clipped for the PSI's logarithm (an empty bin is not infinite drift).
PSI_EPSILON = 1e-4
DEFAULT_BINS = 10
DEFAULT_MARGIN = 0.1
_SUM_ROWS = 65_535  # rows summed at once: a uint16 count cannot overflow
FLOAT_MAX = float(np.finfo(np.float64).max)

FloatMatrix = npt.NDArray[np.float64]


class UnloadableProfile(ValueError):
    """A profile the service could not load back: nothing is written of it."""


class NonFiniteProfile(UnloadableProfile):
    """A profile holding a number that is not finite: it cannot be written as JSON."""


@dataclass(frozen=True, slots=True)
class CompiledProfile:
    profile: QualityProfile
    lows: FloatMatrix  # (features,)
    highs: FloatMatrix  # (features,)
    edges: FloatMatrix  # (max edges, features), padded with +inf
    reference: FloatMatrix  # (features, max edges + 1), padded with 0
    names: tuple[str, ...]
    features: tuple[FeatureProfile, ...]  # by index
    counting_edges: npt.NDArray[np.float32]  # for the float32 path (``bin_counts``)
    float32_suffices: bool  # for float64 values too (``bin_counts``)

    @classmethod
    def compile(cls, profile: QualityProfile) -> CompiledProfile:
        """Checked as a whole, each check over every feature at once (a review: checked
        number by number in Python, a profile of 4096 features of 1001 bins held the
        GIL ~1 s at each reload, and the event loop with it)."""
        features = sorted(profile.features, key=lambda f: f.index)
        if [f.index for f in features] != list(range(len(features))):
            raise ValueError("feature indexes must be 0..n-1, each once")
        lengths = np.array([len(f.edges) for f in features])
        width = int(lengths.max())
        edges = np.full((width, len(features)), np.inf)
        reference = np.zeros((len(features), width + 1))
        shaped = np.array([len(f.proportions) == len(f.edges) + 1 for f in features])
        for column, feature in enumerate(features):
            edges[: len(feature.edges), column] = feature.edges
            if shaped[column]:
                reference[column, : len(feature.proportions)] = feature.proportions
        lows = np.array([f.min for f in features])
        highs = np.array([f.max for f in features])
        real = np.arange(width)[:, None] < lengths[None, :]  # the edges given, not the padding
        with np.errstate(invalid="ignore"):
            finite = (
                np.isfinite(lows)
                & np.isfinite(highs)
                & (np.isfinite(edges) | ~real).all(axis=0)
                & np.isfinite(reference).all(axis=1)
                & np.array([all(map(math.isfinite, f.proportions)) if not shaped[i] else True
                            for i, f in enumerate(features)])
            )
            descending = np.asarray(((np.diff(edges, axis=0) <= 0) & real[1:]).any(axis=0), dtype=bool)
            # A hand-edited file (a review: ``[-5, 100]`` loaded, and every PSI of it was
            # wrong without a word).
            unweighted = (reference < 0).any(axis=1) | (np.abs(reference.sum(axis=1) - 1) > 1e-3)
        if not finite.all():  # before any other check, whichever feature it is
            feature = features[int(np.flatnonzero(~finite)[0])]
            raise NonFiniteProfile(
                f"feature {feature.index} of the {profile.kind} profile {profile.name} holds "
                "a number that is not finite (min, max, edges or proportions)"
            )
        failing = np.flatnonzero(~shaped | descending | (lows > highs) | unweighted)
        if len(failing):
            index = int(failing[0])
            feature = features[index]
            if not shaped[index]:
                raise ValueError(f"feature {feature.index}: proportions need len(edges) + 1 values")
            if descending[index]:
                raise ValueError(f"feature {feature.index}: edges must be strictly ascending")
            if lows[index] > highs[index]:
                raise ValueError(f"feature {feature.index}: min exceeds max")
            raise ValueError(f"feature {feature.index}: proportions must be 0 or more and sum to 1")
        names = tuple(f.name or f"f{f.index}" for f in features)
        if len(set(names)) != len(names):
            # Gauges and rejections name features: two of one name were one series.
            raise ValueError("feature names must differ")
        return cls(
            profile=profile,
            lows=lows,
            highs=highs,
            edges=edges,
            reference=reference,
            names=names,
            features=tuple(features),
            counting_edges=_counting_edges(edges),
            float32_suffices=all(_float32_suffices(feature) for feature in features),
        )

    @property
    def n_features(self) -> int:
        return len(self.names)

    @property
    def n_bins(self) -> int:
        return int(self.reference.shape[1])

    def out_of_range(self, matrix: FloatMatrix) -> npt.NDArray[np.bool_]:
        """Mask (rows x features) of values outside the hard range, NaN included (a
        comparison with NaN is false, so "not inside" rather than "below or above")."""
        outside = np.greater_equal(matrix, self.lows)
        outside &= np.less_equal(matrix, self.highs)
        return np.logical_not(outside, out=outside)

    def range_violations(self, matrix: FloatMatrix) -> list[tuple[int, list[int]]]:
        """``(row, violating feature indexes)`` for each row with a value out of range."""
        bad = self.out_of_range(matrix)
        rows = np.flatnonzero(bad.any(axis=1))
        return [(int(row), np.flatnonzero(bad[row]).tolist()) for row in rows]

    def bin_counts(self, matrix: FloatMatrix) -> npt.NDArray[np.int64]:
        """Rows per (feature, bin): counts of ``v >= edge`` per edge, then differences.

        Compared in float32 (edges and values each rounded to the nearest float32,
        so a value equal to an edge, as quantile edges of discrete features are, stays
        on it: a review saw edges rounded up put every 0.7 below its own edge, PSI 18)
        for float32 rows (a model's), and for float64 values where float32's spacing is
        under 1e-4 of every bin's width (a value then crosses an edge in rounding once
        in ~10,000 of its bin); else in float64: an epoch-seconds feature, 128 apart in
        float32 around 1.7e9, read PSI 0.18 against its own reference (a review).
        Summed as uint16 per slice of rows: the float32 path is half the memory
        traffic and a third of the time of float64 compares and int64 sums. A value
        that is not finite is in no bin: made NaN (never ``>=`` an edge) and left out
        of the first bin's count.
        """
        rows = matrix.shape[0]
        finite = np.isfinite(matrix)
        in_bins = np.full(self.n_features, rows, dtype=np.int64)
        if not finite.all():
            in_bins = finite.sum(axis=0, dtype=np.int64)
            matrix = np.where(finite, matrix, np.nan)
        values: npt.NDArray[np.floating[Any]] = matrix
        counting_edges: npt.NDArray[np.floating[Any]] = self.edges
        if matrix.dtype == np.float32 or self.float32_suffices:
            with np.errstate(over="ignore"):
                values = matrix.astype(np.float32, copy=False)
            counting_edges = self.counting_edges
        at_least = np.zeros((self.edges.shape[0], self.n_features), dtype=np.int64)
        for start in range(0, rows, _SUM_ROWS):
            part = values[start : start + _SUM_ROWS]
            scratch = np.empty(part.shape, dtype=np.bool_)
            as_bytes = scratch.view(np.uint8)
            for k, edge in enumerate(counting_edges):
                np.greater_equal(part, edge, out=scratch)
                at_least[k] += as_bytes.sum(axis=0, dtype=np.uint16)
        counts = np.empty((self.n_features, self.n_bins), dtype=np.int64)
        counts[:, 0] = in_bins - at_least[0]
        counts[:, 1:-1] = (at_least[:-1] - at_least[1:]).T
        counts[:, -1] = at_least[-1]
        return counts

    def real_bins(self, feature: int) -> int:
        return len(self.features[feature].edges) + 1


def _counting_edges(edges: FloatMatrix) -> npt.NDArray[np.float32]:
    """The edges rounded to the nearest float32, as values are (edges past float32's
    range become +-inf, as such values do). Edges that meet once rounded leave an
    empty bin between them: float32 values cannot tell them apart."""
    with np.errstate(over="ignore"):
        return edges.astype(np.float32)


# float32's spacing at a feature's largest magnitude, at most this share of its
# narrowest bin: a float64 value is then binned in float32 (``bin_counts``).
FLOAT32_SPACING_SHARE = 1e-4


def _float32_suffices(feature: FeatureProfile) -> bool:
    bounds = np.array([feature.min, *feature.edges, feature.max])
    widths = np.diff(bounds)
    widths = widths[widths > 0]
    if not feature.edges or not len(widths):
        return True  # one bin: nothing to cross
    scale = float(np.abs(bounds).max())
    if scale > float(np.finfo(np.float32).max):
        return False
    return float(np.spacing(np.float32(scale))) <= FLOAT32_SPACING_SHARE * float(widths.min())


def psi(reference: FloatMatrix, counts: npt.NDArray[np.int64], rows: int) -> FloatMatrix:
    """Population stability index per feature: sum over bins of (a - e) ln(a / e)."""
    actual = np.maximum(counts / max(rows, 1), PSI_EPSILON)
    expected = np.maximum(reference, PSI_EPSILON)
    scores: FloatMatrix = ((actual - expected) * np.log(actual / expected)).sum(axis=1)
    return scores


def build_profile(
    matrix: FloatMatrix,
    *,
    kind: ProfileKind,
    name: str,
    on_violation: OnViolation = "reject",
    bins: int = DEFAULT_BINS,
    margin: float = DEFAULT_MARGIN,
    feature_names: Sequence[str] | None = None,
) -> QualityProfile:
    """A profile from a reference sample: quantile bins and a range widened by ``margin``.

    The hard range is ``[min - margin * span, max + margin * span]`` of the reference
    (span = max - min), within the finite float64 range; bin edges are the reference's
    ``bins``-quantiles, ties merged. Near the float64 extremes the span and the
    quantiles' interpolation would overflow: both are computed on halved values.
    """
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError("the reference sample needs at least one record")
    if not np.isfinite(matrix).all():
        raise ValueError("the reference sample holds values that are not finite")
    if bins < 2:
        raise ValueError("at least two bins")
    if feature_names is not None and len(feature_names) != matrix.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {matrix.shape[1]} features")
    quantiles = _quantiles(matrix, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    lows, highs = matrix.min(axis=0), matrix.max(axis=0)
    with np.errstate(over="ignore"):
        # margin * (highs - lows), rounded alike, without the difference overflowing;
        # a huge margin still makes it inf, which the clip turns into the float extremes.
        widen = margin * (highs / 2 - lows / 2) * 2
        mins = np.maximum(lows - widen, -FLOAT_MAX)
        maxs = np.minimum(highs + widen, FLOAT_MAX)
    features = []
    for column in range(matrix.shape[1]):
        edges = np.unique(quantiles[:, column])
        binned = np.searchsorted(edges, matrix[:, column], side="right")
        shares = np.bincount(binned, minlength=len(edges) + 1) / matrix.shape[0]
        features.append(
            FeatureProfile(
                index=column,
                name=feature_names[column] if feature_names is not None else None,
                min=float(mins[column]),
                max=float(maxs[column]),
                edges=edges.tolist(),
                proportions=shares.tolist(),
            )
        )
    return QualityProfile(
        kind=kind,
        name=name,
        created_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        reference_count=int(matrix.shape[0]),
        on_violation=on_violation,
        features=features,
    )


def _quantiles(matrix: FloatMatrix, levels: FloatMatrix) -> FloatMatrix:
    """``np.quantile`` per column; a column whose interpolation overflowed (values
    near both float64 extremes) again on halved values, then doubled: exact, and the
    result lies between two values of the column, so it cannot overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        quantiles: FloatMatrix = np.quantile(matrix, levels, axis=0)
    broken = ~np.isfinite(quantiles).all(axis=0)
    if broken.any():
        quantiles[:, broken] = np.quantile(matrix[:, broken] / 2, levels, axis=0) * 2
    return quantiles
