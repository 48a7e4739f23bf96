"""dpn_jax.metrics against scikit-learn: exact AUC (ties!), log loss, masking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from dpn_jax.errors import DataError
from dpn_jax.metrics import auc, logloss, logloss_from_logits


def _labels(rng: np.random.Generator, n: int, rate: float = 0.3) -> np.ndarray:
    y = (rng.random(n) < rate).astype(np.float32)
    y[:2] = [0, 1]  # both classes always present
    return y


# --- auc ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 10, 1000, 50_000])
def test_auc_random_scores_equals_sklearn(n: int) -> None:
    rng = np.random.default_rng(n)
    y, s = _labels(rng, n), rng.normal(size=n)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("decimals", [0, 1, 2])
def test_auc_heavy_ties_equals_sklearn(decimals: int) -> None:
    rng = np.random.default_rng(decimals)
    y = _labels(rng, 20_000)
    s = np.round(rng.random(20_000) * 0.9 + 0.3 * y, decimals)  # 1-2 (or a few) distinct values
    assert len(np.unique(s)) <= {0: 2, 1: 13, 2: 121}[decimals]
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_all_equal_scores_is_half() -> None:
    y = _labels(np.random.default_rng(0), 1000)
    assert auc(y, np.full(1000, 0.37)) == 0.5


def test_auc_perfect_and_inverted() -> None:
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.3, 0.9, 0.7])
    assert auc(y, s) == 1.0
    assert auc(y, -s) == 0.0
    assert auc(y.astype(bool), s) == 1.0  # bool labels
    assert auc(y.reshape(2, 3), s.reshape(3, 2)) == 1.0  # any shape, flattened


def test_auc_large_n_is_exact() -> None:
    # Speed is measured by the benchmark harness, not asserted here (no timed unit tests).
    rng = np.random.default_rng(1)
    n = 1_000_000
    y, s = _labels(rng, n), rng.random(n).astype(np.float32)  # float32: many exact ties
    got = auc(y, s)
    assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_weights_mask_equals_dropping_rows() -> None:
    rng = np.random.default_rng(2)
    n = 5000
    y, s = _labels(rng, n), np.round(rng.normal(size=n), 1)
    mask = (rng.random(n) < 0.7).astype(np.float32)
    mask[:2] = 1
    s_padded = s.copy()
    s_padded[mask == 0] = np.nan  # garbage in padded rows must not matter
    keep = mask == 1
    assert auc(y, s_padded, weights=mask) == pytest.approx(auc(y[keep], s[keep]), abs=1e-15)
    assert auc(y, s, weights=mask) == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-12)


def test_auc_real_valued_weights_equal_sklearn() -> None:
    rng = np.random.default_rng(3)
    y, s, w = _labels(rng, 3000), np.round(rng.normal(size=3000), 1), rng.random(3000)
    assert auc(y, s, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


def test_auc_single_class_raises() -> None:
    with pytest.raises(DataError, match="both classes"):
        auc(np.ones(10), np.arange(10.0))
    with pytest.raises(DataError, match="both classes"):
        auc(np.zeros(10), np.arange(10.0))
    # One class left after masking.
    with pytest.raises(DataError, match="both classes"):
        auc([0, 1, 1], [0.1, 0.2, 0.3], weights=[0, 1, 1])


def test_auc_bad_input_raises() -> None:
    with pytest.raises(DataError, match="rows"):
        auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="NaN"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match="no rows"):
        auc([], [])
    with pytest.raises(DataError, match="weights"):
        auc([0, 1], [0.1, 0.2], weights=[1, -1])


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=300
    ).filter(lambda rows: len({r[0] for r in rows}) == 2)
)
def test_auc_property_small_integer_scores(data: list[tuple[int, int]]) -> None:
    y = np.array([r[0] for r in data])
    s = np.array([r[1] for r in data], dtype=np.float64)
    assert abs(auc(y, s) - roc_auc_score(y, s)) <= 1e-12


@settings(max_examples=100, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 4), st.integers(0, 1)),
        min_size=2,
        max_size=200,
    ).filter(lambda rows: len({r[0] for r in rows if r[2]}) == 2)
)
def test_auc_property_mask_equals_drop(data: list[tuple[int, int, int]]) -> None:
    y, s, m = (np.array(c) for c in zip(*data))
    keep = m == 1
    assert abs(auc(y, s, weights=m) - roc_auc_score(y[keep], s[keep])) <= 1e-12


# --- logloss --------------------------------------------------------------------------------


def test_logloss_equals_sklearn() -> None:
    rng = np.random.default_rng(4)
    y, p = _labels(rng, 10_000), rng.uniform(0.01, 0.99, 10_000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-12)
    w = rng.random(10_000)
    assert logloss(y, p, w) == pytest.approx(log_loss(y, p, sample_weight=w), abs=1e-12)


def test_logloss_clips_to_eps() -> None:
    # A certain wrong prediction costs -log(eps), not infinity.
    assert logloss([1, 0], [0.0, 1.0]) == pytest.approx(-np.log(1e-7), rel=1e-9)
    assert logloss([1], [0.0], eps=1e-3) == pytest.approx(-np.log(1e-3), rel=1e-12)
    assert np.isfinite(logloss([1, 0], [1.0, 0.0]))


def test_logloss_weights_mask_equals_dropping_rows() -> None:
    rng = np.random.default_rng(5)
    y, p = _labels(rng, 1000), rng.uniform(0.05, 0.95, 1000)
    m = (rng.random(1000) < 0.5).astype(np.float32)
    p_padded = np.where(m == 1, p, np.nan)
    keep = m == 1
    assert logloss(y, p_padded, m) == pytest.approx(logloss(y[keep], p[keep]), abs=1e-15)


def test_logloss_from_logits_matches_probabilities() -> None:
    rng = np.random.default_rng(6)
    y, z = _labels(rng, 10_000), rng.normal(scale=3.0, size=10_000)
    p = 1.0 / (1.0 + np.exp(-z))
    assert logloss_from_logits(y, z) == pytest.approx(log_loss(y, p), abs=1e-10)
    m = (rng.random(10_000) < 0.5).astype(np.float32)
    keep = m == 1
    assert logloss_from_logits(y, z, m) == pytest.approx(
        logloss_from_logits(y[keep], z[keep]), abs=1e-15
    )


def test_logloss_from_logits_is_stable_for_huge_logits() -> None:
    z = np.array([1000.0, -1000.0, 1000.0, -1000.0, 40.0], dtype=np.float32)
    y = np.array([1, 0, 0, 1, 1])
    got = logloss_from_logits(y, z)
    # Exact: 0, 0, 1000, 1000, log1p(exp(-40)).
    assert got == pytest.approx((2000.0 + np.log1p(np.exp(-40.0))) / 5, rel=1e-12)
    assert logloss_from_logits([1], [40.0]) == pytest.approx(np.exp(-40.0), rel=1e-9)


def test_logloss_bad_input_raises() -> None:
    with pytest.raises(DataError, match="0/1"):
        logloss([0.5], [0.5])
    with pytest.raises(DataError, match="eps"):
        logloss([1], [0.5], eps=0.0)
    with pytest.raises(DataError, match="rows"):
        logloss_from_logits([0, 1], [0.0])
