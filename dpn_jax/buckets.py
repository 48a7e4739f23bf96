"""Buckets of a bucketised numeric field (``type: numeric, buckets: B``): fit on train, look up.

The one definition used by the training encoder (:mod:`dpn_jax.data.encode`) and by the
numpy-only loader of exported models (:mod:`dpn_jax.serving.exported`). It lives at the package
top level and imports numpy only, because the exported-model loader must not import
:mod:`dpn_jax.data` (pyarrow, YAML).

Edges are stored as ``[train min, c_1, ..., c_{m-1}, train max]``: the cuts ``c_1 < ... <
c_{m-1}`` split the line into ``m`` buckets, bucket ``k`` holding ``c_k <= x < c_{k+1}`` (with
``c_0 = -inf``, ``c_m = +inf``); the first and last entries only record the train range. This
lookup is the same for every encoder version, so edges fitted by an older dpn-jax (stored in its
bundles) keep the buckets the model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def fit_bucket_edges(x: ArrayLike, buckets: int) -> list[float]:
    """Edges of at most ``buckets`` buckets for the finite values of ``x`` (NaN/inf are ignored).

    Rules (``n`` finite train values, ``k`` of them distinct):

    * no finite value: ``[]`` -- a field whose every value is missing (OOV);
    * ``k <= buckets``: one bucket per distinct value;
    * otherwise a *mass point* -- a value holding more than ``n / buckets`` rows -- gets a bucket
      of its own, and each run of other values between mass points (a *rest run*) gets at least
      one bucket; the buckets left over go to the rest runs one at a time, each to the run whose
      buckets are currently the largest (rows per bucket). A run given ``r`` buckets is split by
      the same rules with ``r`` for ``buckets`` (a value holding more than 1/r of the run is
      alone), down to a run without such values, which is cut at the quantiles of its values
      (``np.quantile``, linear). A column without mass points is one such run: its cuts are the
      plain quantiles.
    * if mass points and rest runs together exceed ``buckets``, the smallest rest run shares
      the bucket of its smaller neighbouring mass point, until they fit;
    * a cut that would leave a bucket empty on the train values is dropped.

    Every cut is a train value or a quantile between two, so bucket ids grow with the value,
    and a value below (above) the train range falls into the first (last) bucket.

    >>> fit_bucket_edges([0.0] * 93 + [1, 2, 3, 4, 5, 6, 7], 4)  # 0 alone; 1..7 in three
    [0.0, 1.0, 3.0, 5.0, 7.0]
    >>> fit_bucket_edges([5, 5, 9], 10)  # two distinct values: two buckets, x < 9 and x >= 9
    [5.0, 9.0, 9.0]
    """
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    ok = np.sort(a[np.isfinite(a)])
    if ok.size == 0:
        return []
    values, counts = np.unique(ok, return_counts=True)
    start = np.concatenate([[0], np.cumsum(counts)])  # rows of values[i:j]: start[j] - start[i]
    cuts = np.unique(np.asarray(_split(ok, values, start, 0, values.size, buckets), np.float64))
    # A quantile cut with no train value in [c_k, c_{k+1}) leaves bucket k empty: drop it (the
    # range joins the bucket below; the train rows keep their buckets).
    first_row = np.searchsorted(ok, cuts, side="left")
    cuts = cuts[np.append(first_row[1:], ok.size) > first_row]
    return [float(values[0]), *(float(c) for c in cuts), float(values[-1])]


def n_buckets(edges: Sequence[float]) -> int:
    """Buckets the edges define (an empty edge list still reserves one, which nothing uses)."""
    return max(len(edges) - 1, 1)


def bucketize(x: ArrayLike, edges: Sequence[float], *, first: int = 0, missing: int = -1) -> np.ndarray:
    """Bucket ids (int64) of ``x``: ``first + k`` for bucket ``k``; ``missing`` for NaN, +-inf,
    or every value when ``edges`` is empty (no train values)."""
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    cuts = np.asarray(edges[1:-1], dtype=np.float64)
    ids = first + np.searchsorted(cuts, v, side="right")  # c_k <= x < c_{k+1} -> bucket k
    return np.where(np.isfinite(v) & (len(edges) > 0), ids, missing).astype(np.int64)


# ----------------------------------------------------------------------------- fitting


def _split(ok: np.ndarray, values: np.ndarray, start: np.ndarray, lo: int, hi: int,
           budget: int) -> list[float]:
    """Cuts above ``values[lo]`` that split the rows of ``values[lo:hi]`` into at most
    ``budget`` buckets (the rules of :func:`fit_bucket_edges`)."""
    if budget >= hi - lo:
        return values[lo + 1 : hi].tolist()
    if budget <= 1:
        return []
    rows = int(start[hi] - start[lo])
    mass = np.diff(start[lo : hi + 1]) * budget > rows
    if not mass.any():
        q = np.quantile(ok[start[lo] : start[hi]], np.linspace(0.0, 1.0, budget + 1)[1:-1])
        return q[q > values[lo]].tolist()
    # Segments [a, b) of distinct-value indices: a mass point alone, or a maximal rest run.
    segs: list[list] = []  # [a, b, kind], kind "mass" | "run" | "mixed"
    for i in range(lo, hi):
        if mass[i - lo]:
            segs.append([i, i + 1, "mass"])
        elif segs and segs[-1][2] == "run":
            segs[-1][1] = i + 1
        else:
            segs.append([i, i + 1, "run"])

    def size(s: list) -> int:
        return int(start[s[1]] - start[s[0]])

    while len(segs) > budget:  # more mass points + runs than buckets: merge the smallest run
        j = min((j for j, s in enumerate(segs) if s[2] == "run"), key=lambda j: (size(segs[j]), j))
        t = min((t for t in (j - 1, j + 1) if 0 <= t < len(segs)), key=lambda t: (size(segs[t]), t))
        segs[min(j, t)] = [min(segs[j][0], segs[t][0]), max(segs[j][1], segs[t][1]), "mixed"]
        del segs[max(j, t)]
    runs = [j for j, s in enumerate(segs) if s[2] == "run"]
    alloc = dict.fromkeys(runs, 1)
    for _ in range(budget - len(segs)):
        open_ = [j for j in runs if alloc[j] < segs[j][1] - segs[j][0]]
        if not open_:
            break
        j = max(open_, key=lambda j: (size(segs[j]) / alloc[j], -j))
        alloc[j] += 1
    cuts = [float(values[s[0]]) for s in segs[1:]]  # every segment starts a bucket
    for j in runs:
        cuts += _split(ok, values, start, segs[j][0], segs[j][1], alloc[j])
    return cuts
