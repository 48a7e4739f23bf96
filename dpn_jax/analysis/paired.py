"""Seed-paired comparison of two models: per-seed differences and a bootstrap confidence interval.

Two models trained with the same seeds on the same split share initialisation seed, dropout seed
and data order, so their per-seed difference ``d_s = a_s - b_s`` removes the seed-to-seed spread
they have in common. The interval resamples the seeds with replacement (percentile bootstrap of
the mean difference). With five seeds it is coarse: it says whether a difference is
distinguishable from the seed noise, not how large it is to the third decimal.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Paired(NamedTuple):
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]  # a - b per seed, in the order of ``seeds``
    mean: float
    std: float  # sample standard deviation of the differences (0 for one seed)
    low: float  # bootstrap percentile interval of the mean difference
    high: float
    wins: int  # seeds where a > b

    @property
    def verdict(self) -> str:
        """'wins' / 'loses' when the interval excludes 0, else 'ties' (indistinguishable)."""
        if self.low > 0:
            return "wins"
        if self.high < 0:
            return "loses"
        return "ties"


def paired_difference(a: dict[int, float], b: dict[int, float], *, level: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> Paired:
    """``a`` and ``b`` map seed -> metric (e.g. test AUC); only the seeds both have are paired."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} vs {sorted(b)}")
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Paired(seeds, tuple(float(x) for x in d), float(d.mean()),
                  float(d.std(ddof=1)) if len(d) > 1 else 0.0, float(low), float(high),
                  int((d > 0).sum()))
