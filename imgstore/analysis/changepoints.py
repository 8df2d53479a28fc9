"""Change points in one benchmark's history: found by ruptures, confirmed with the saved runs.

Finding
    The series is one figure per commit (the median over that commit's runs of each run's fastest
    round: interference on a shared machine only adds time, as in the gate), on the log scale, and
    divided by a robust estimate of its noise: the median absolute deviation of successive
    differences, which a few steps barely move.  ruptures' binary segmentation (``Binseg``: split
    where the cost falls most, then each part again, while a split gains more than a penalty; the
    search E-Divisive, Hunter's and Otava's method, makes too) then segments it with the ``l1`` cost
    (deviations from each segment's median): a single run hit by a neighbour costs little under
    it, where the squared cost (``l2``) would cut it out as a segment of its own.  (PELT, exact
    under the same penalty, took 3 s for one series of 300 commits here; Binseg 0.3 s.)  Segments
    hold at least :data:`MIN_SEGMENT` commits.
    The penalty (:data:`PENALTY`) is calibrated on simulated noise: log figures with Student's t
    noise (4 degrees of freedom, scale 0.05: heavy tails, as runs on a shared machine have),
    standardized as above, 150 series each: at 6 binary segmentation proposes a change in 3%, 2%
    and 1% of stationary series of 30, 60 and 120 points (4: 7-11%), and puts a 20% step in the
    middle at the right point in 79-86% of them.  Confirmation removes what is proposed on noise.

Confirming
    Each proposed change is then tested on the runs themselves, between the segments on either
    side of it: a two-sided Mann-Whitney test (scipy) of the runs' figures before against after,
    at ``alpha`` (the caller divides it among the benchmarks: Bonferroni), and a bootstrap
    interval of the ratio of the medians after/before (runs resampled with replacement on each
    side) that must exclude 1, and a ratio at least ``min_change`` away from 1.  The test is on
    runs, not on pooled rounds: rounds of one run share its machine's state, so pooling them
    would treat drift between two runs as a change (the false regression of one-file-a-side
    ``imgstore compare``).  A change that fails is dropped and its neighbours are tested again on
    the merged segment, until every change left holds.

Everything is deterministic: the bootstrap has a fixed seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgstore.errors import MissingDependencyError

__all__ = ["Change", "MIN_SEGMENT", "PENALTY", "confirm", "find_changes", "propose"]

MIN_SEGMENT = 3  # commits on each side of a change, at least: a change needs runs to be confirmed
PENALTY = 6.0  # per change point, on the standardized l1 cost (see the module docstring)
BOOTSTRAP = 4000
_SEED = 20261129


@dataclass(frozen=True)
class Change:
    """A confirmed change between point ``index - 1`` and point ``index`` of a series."""

    index: int
    ratio: float  # median of the runs' figures after / before
    low: float  # bootstrap interval of the ratio, at the caller's confidence
    high: float
    p_value: float  # Mann-Whitney, two-sided, runs before against after
    before_runs: int
    after_runs: int


def _ruptures() -> Any:
    try:
        import ruptures
        import scipy.stats  # noqa: F401  (confirm's test; ruptures needs scipy too)
    except ImportError:
        raise MissingDependencyError(
            "imgstore history needs ruptures (change points) and scipy: pip install 'imgstore-ml[history]'"
        ) from None
    return ruptures


def noise_scale(logs: np.ndarray) -> float:
    """Robust sd of the noise of a series with a few steps: MAD of successive differences / sqrt(2)."""
    if len(logs) < 3:
        return 0.0
    steps = np.diff(logs)
    mad = float(np.median(np.abs(steps - np.median(steps))))
    return mad / 0.6745 / math.sqrt(2)


def propose(logs: Sequence[float] | np.ndarray, penalty: float = PENALTY, min_segment: int = MIN_SEGMENT) -> list[int]:
    """Indices where binary segmentation starts a new segment (never 0); [] for a series too short to split."""
    values = np.asarray(logs, dtype=float)
    if len(values) < 2 * min_segment:
        return []
    scale = noise_scale(values)
    if scale <= 0:  # identical figures (or nearly): any spread at all is a change, so scale by a tiny one
        scale = max(float(np.std(values)), 1e-12) / 10
    standard = ((values - np.median(values)) / scale).reshape(-1, 1)
    ends = _ruptures().Binseg(model="l1", min_size=min_segment, jump=1).fit(standard).predict(pen=penalty)
    return [int(end) for end in ends[:-1]]  # the last is always len(values)


def confirm(
    before: Sequence[float], after: Sequence[float], *, alpha: float, confidence: float, min_change: float
) -> Change | None:
    """The change from runs ``before`` to runs ``after`` (each run's figure, seconds), or None if
    the runs do not show one (see the module docstring)."""
    from scipy.stats import mannwhitneyu

    x, y = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return None
    p_value = float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    ratio = float(np.median(y) / np.median(x))
    low, high = bootstrap_ratio(x, y, confidence)
    if p_value > alpha or low <= 1 <= high or abs(math.log(ratio)) < math.log1p(min_change):
        return None
    return Change(0, ratio, low, high, p_value, len(x), len(y))


def bootstrap_ratio(before: np.ndarray, after: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval of median(after) / median(before), runs resampled on each side."""
    rng = np.random.default_rng(_SEED)
    x = before[rng.integers(0, len(before), size=(BOOTSTRAP, len(before)))]
    y = after[rng.integers(0, len(after), size=(BOOTSTRAP, len(after)))]
    ratios = np.median(y, axis=1) / np.median(x, axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)


def find_changes(
    points: Sequence[Sequence[float]],
    *,
    alpha: float,
    confidence: float,
    min_change: float,
    penalty: float = PENALTY,
) -> tuple[list[Change], int]:
    """Confirmed changes of a series given as each point's run figures (seconds), and how many
    proposed changes the runs did not confirm."""
    figures = [float(np.median(runs)) for runs in points]
    if any(not runs for runs in points):
        raise ValueError("every point of a series needs at least one run")
    proposed = propose(np.log(figures), penalty)
    kept = list(proposed)
    while True:
        changes: list[Change] = []
        for k, index in enumerate(kept):
            start = kept[k - 1] if k else 0
            stop = kept[k + 1] if k + 1 < len(kept) else len(points)
            before = [t for runs in points[start:index] for t in runs]
            after = [t for runs in points[index:stop] for t in runs]
            change = confirm(before, after, alpha=alpha, confidence=confidence, min_change=min_change)
            if change is not None:
                changes.append(Change(index, *_fields(change)))
        if len(changes) == len(kept):
            return changes, len(proposed) - len(kept)
        kept = [change.index for change in changes]


def _fields(change: Change) -> tuple[float, float, float, float, int, int]:
    return change.ratio, change.low, change.high, change.p_value, change.before_runs, change.after_runs
