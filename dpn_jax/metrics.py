"""Evaluation metrics for binary CTR prediction, computed exactly in numpy (float64).

* :func:`auc` -- ROC AUC with ties counted 1/2, identical to ``sklearn.metrics.roc_auc_score``
  (including its ``sample_weight`` semantics), in O(n log n).
* :func:`logloss` -- mean binary cross-entropy of probabilities, clipped to ``[eps, 1 - eps]``.
* :func:`logloss_from_logits` -- the same loss from logits, numerically stable for any logit.

Every metric takes an optional ``weights`` array (usually a 0/1 mask that drops padded rows of the
last, partially filled evaluation batch): a row of weight 0 is exactly as if it were not there.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from dpn_jax.errors import DataError

__all__ = ["auc", "logloss", "logloss_from_logits"]


def _prepare(
    name: str, labels: ArrayLike, values: ArrayLike, weights: ArrayLike | None, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flatten, validate and cast to float64; drop zero-weight rows."""
    y = np.asarray(labels).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if y.shape[0] != v.shape[0]:
        raise DataError(f"{name}: labels has {y.shape[0]} rows but {what} has {v.shape[0]}")
    y = y.astype(np.float64)
    w: np.ndarray | None = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != y.shape[0]:
            raise DataError(f"{name}: weights has {w.shape[0]} rows but labels has {y.shape[0]}")
        if not np.all(np.isfinite(w)) or (w < 0).any():
            raise DataError(f"{name}: weights must be finite and >= 0")
        # Why drop instead of multiplying by 0: a masked row may hold garbage (NaN scores of
        # padding), which must not poison the result.
        keep = w > 0
        if not keep.all():
            y, v, w = y[keep], v[keep], w[keep]
    bad = (y != 0.0) & (y != 1.0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{name}: labels must be 0/1, found {float(y[i])} (row {i} of the kept rows)"
        )
    if y.shape[0] == 0:
        raise DataError(f"{name}: no rows to evaluate (empty input, or every weight is 0)")
    if np.isnan(v).any():
        i = int(np.argmax(np.isnan(v)))
        raise DataError(f"{name}: {what} contains NaN (first at row {i} of the kept rows)")
    return y, v, w


def auc(labels: ArrayLike, scores: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Exact ROC AUC: P(score of a random positive > score of a random negative), ties count 1/2.

    Equals ``sklearn.metrics.roc_auc_score(labels, scores, sample_weight=weights)``. Computed by
    sorting once and grouping tied scores: each group's positives beat every negative of a lower
    score group and tie with the negatives of their own group (the trapezoid of the ROC curve).

    Args:
        labels: 0/1 (or bool) array of any shape; flattened.
        scores: any monotone score (logits or probabilities), same number of elements.
        weights: optional non-negative per-row weights (a 0/1 mask ignores padded rows).

    Raises:
        DataError: if only one class is present among the (non-zero-weight) rows, on NaN scores,
            labels other than 0/1, or mismatched lengths.
    """
    y, s, w = _prepare("auc", labels, scores, weights, "scores")
    order = np.argsort(s)  # order inside a tie group does not matter: groups are summed
    s_sorted = s[order]
    pos = y[order] if w is None else (y * w)[order]
    neg = (1.0 - y)[order] if w is None else ((1.0 - y) * w)[order]
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= 0.0 or total_neg <= 0.0:
        present = "positive (1)" if total_pos > 0 else "negative (0)"
        raise DataError(
            f"auc: only {present} labels among {y.shape[0]} rows; ROC AUC needs both classes"
        )
    # Start index of each run of equal scores.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos_g = np.add.reduceat(pos, starts)
    neg_g = np.add.reduceat(neg, starts)
    neg_below = np.cumsum(neg_g) - neg_g  # negatives with a strictly lower score
    # With unit weights every term is an integer (times 1/2) < 2^53, so the sum is exact.
    num = float(np.dot(pos_g, neg_below) + 0.5 * np.dot(pos_g, neg_g))
    return num / (total_pos * total_neg)


def logloss(
    labels: ArrayLike, probs: ArrayLike, weights: ArrayLike | None = None, eps: float = 1e-7
) -> float:
    """Mean binary cross-entropy of predicted probabilities (natural log).

    Probabilities are clipped to ``[eps, 1 - eps]`` (as ``sklearn.metrics.log_loss`` clips) so a
    confident wrong prediction costs a large but finite loss. With ``weights`` the mean is
    weighted: ``sum(w * loss) / sum(w)``.
    """
    if not 0.0 < eps < 0.5:
        raise DataError(f"logloss: eps must be in (0, 0.5), got {eps!r}")
    y, p, w = _prepare("logloss", labels, probs, weights, "probs")
    p = np.clip(p, eps, 1.0 - eps)
    losses = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return float(np.average(losses, weights=w))


def logloss_from_logits(
    labels: ArrayLike, logits: ArrayLike, weights: ArrayLike | None = None
) -> float:
    """Mean binary cross-entropy computed from logits, stable for any finite logit.

    Uses ``loss = log(1 + exp(z)) - y * z = logaddexp(0, z) - y * z`` in float64, which never
    overflows and keeps full precision for confident predictions (no clipping needed).
    """
    y, z, w = _prepare("logloss_from_logits", labels, logits, weights, "logits")
    losses = np.logaddexp(0.0, z) - y * z
    return float(np.average(losses, weights=w))
