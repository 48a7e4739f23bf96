"""dpn_jax.data.synthetic: encoding contract, determinism, and that the planted structure is there."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from dpn_jax.data.schema import Dataset
from dpn_jax.data.synthetic import UNIT, make_synthetic
from dpn_jax.errors import ConfigError
from dpn_jax.metrics import auc


@pytest.fixture(scope="module")
def default() -> Dataset:
    return make_synthetic(rows=200_000, vocab=100)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z.astype(np.float64)))


def test_shapes_dtypes_and_id_blocks(default: Dataset) -> None:
    ds = default
    assert ds.name == "synthetic"
    schema = ds.schema
    assert schema.field_names == tuple(f"f{i}" for i in range(8))
    assert schema.table_size == 8 * 102
    for i, f in enumerate(schema.fields):
        assert (f.kind, f.column, f.offset, f.vocab_size) == ("cat", i, i * 102, 102)
    sizes = {k: len(v["label"]) for k, v in ds.splits()}
    assert sizes == {"train": 160_000, "valid": 20_000, "test": 20_000}
    for _, split in ds.splits():
        n = len(split["label"])
        assert split["cat"].dtype == np.int32 and split["cat"].shape == (n, 8)
        assert split["num"].dtype == np.float32 and split["num"].shape == (n, 0)
        assert split["label"].dtype == np.float32 and set(np.unique(split["label"])) == {0.0, 1.0}
        for f in schema.fields:
            col = split["cat"][:, f.column]
            # Never pad/OOV: only the vocabulary block offset+2 .. offset+vocab+1.
            assert col.min() >= f.offset + 2 and col.max() <= f.offset + f.vocab_size - 1
    # Zipf-like: the most frequent value (local 2) is much more common than the rarest.
    counts = np.bincount(ds.train["cat"][:, 3] - schema.fields[3].offset, minlength=102)
    assert counts[2] > 20 * counts[101] > 0


def test_meta(default: Dataset) -> None:
    meta = default.meta
    assert meta["params"]["seed"] == 2021 and meta["params"]["contextual"] == 1.5
    assert meta["planted"]["context_field"] == "f0"
    pairs = meta["planted"]["pairwise_pairs"] + meta["planted"]["contextual_pairs"]
    assert len(pairs) == 5 and len({tuple(p) for p in pairs}) == 5
    assert all("f0" not in p for p in pairs)
    for k, split in default.splits():
        assert meta["true_logit"][k].shape == split["label"].shape


def test_deterministic_by_seed() -> None:
    a, b, c = (make_synthetic(seed=s, rows=5000) for s in (7, 7, 8))
    for k in ("train", "valid", "test"):
        for key in ("cat", "num", "label"):
            np.testing.assert_array_equal(getattr(a, k)[key], getattr(b, k)[key])
        np.testing.assert_array_equal(a.meta["true_logit"][k], b.meta["true_logit"][k])
    assert a.meta["bayes_auc"] == b.meta["bayes_auc"]
    assert not np.array_equal(a.train["cat"], c.train["cat"])
    assert not np.array_equal(a.meta["true_logit"]["test"], c.meta["true_logit"]["test"])


def test_bayes_auc_in_range_and_reproducible(default: Dataset) -> None:
    for k, split in default.splits():
        bayes = default.meta["bayes_auc"][k]
        assert 0.75 <= bayes <= 0.85, (k, bayes)
        probs = _sigmoid(default.meta["true_logit"][k])
        assert abs(bayes - auc(split["label"], probs)) <= 1e-12
    # The labels really are Bernoulli(sigmoid(logit)): calibrated on average.
    probs = _sigmoid(default.meta["true_logit"]["train"])
    assert abs(probs.mean() - default.train["label"].mean()) < 0.005


def test_every_effect_matters(default: Dataset) -> None:
    eff, bayes = default.meta["effects"], default.meta["bayes_auc"]["test"]
    for part, strength in (("additive", 1.0), ("pairwise", 1.0), ("contextual", 1.5)):
        assert eff["std"][part] == pytest.approx(UNIT * strength, rel=0.1)
        assert eff["auc_without"][part] < bayes - 0.03, part


def _r2_of_groups(values: np.ndarray, cols: np.ndarray, base: int) -> float:
    """Share of the variance of ``values`` explained by the mean within groups of ``cols``."""
    key = (cols * base ** np.arange(cols.shape[1])).sum(axis=1)
    n = np.bincount(key)
    means = np.bincount(key, weights=values)[key] / n[key]
    return float(means.var() / values.var())


def _local(ds: Dataset, name: str) -> np.ndarray:
    f = ds.schema.field(name)
    return ds.train["cat"][:, f.column] - f.offset


def test_contextual_part_is_a_pure_three_way_interaction() -> None:
    # Only the contextual part: the pair alone explains nothing, pair + context explains its share.
    ds = make_synthetic(rows=200_000, vocab=5, additive=0.0, pairwise=0.0, contextual=1.0)
    z = ds.meta["true_logit"]["train"].astype(np.float64) + 1.0
    ctx = _local(ds, ds.meta["planted"]["context_field"])
    for i, j in ds.meta["planted"]["contextual_pairs"]:
        pair = np.stack([_local(ds, i), _local(ds, j)], axis=1)
        assert _r2_of_groups(z, pair, 8) < 0.01
        assert _r2_of_groups(z, np.column_stack([pair, ctx]), 8) > 0.3


def test_pairwise_part_has_no_first_order_part() -> None:
    ds = make_synthetic(rows=200_000, vocab=5, additive=0.0, pairwise=1.0, contextual=0.0)
    z = ds.meta["true_logit"]["train"].astype(np.float64) + 1.0
    for i, j in ds.meta["planted"]["pairwise_pairs"]:
        xi, xj = _local(ds, i), _local(ds, j)
        assert _r2_of_groups(z, xi[:, None], 8) < 0.01
        assert _r2_of_groups(z, np.stack([xi, xj], axis=1), 8) > 0.2


def _logistic_regression_auc(ds: Dataset) -> float:
    enc = OneHotEncoder(handle_unknown="ignore")
    model = LogisticRegression(C=1.0, max_iter=1000)
    model.fit(enc.fit_transform(ds.train["cat"]), ds.train["label"])
    return auc(ds.test["label"], model.decision_function(enc.transform(ds.test["cat"])))


# vocab=10: 16k training rows then estimate the 8 x 10 first-order effects well, so the gap to
# the Bayes AUC measures missing interactions rather than estimation noise.
def test_logistic_regression_reaches_bayes_without_interactions() -> None:
    ds = make_synthetic(rows=20_000, vocab=10, pairwise=0.0, contextual=0.0)
    bayes = ds.meta["bayes_auc"]["test"]
    assert _logistic_regression_auc(ds) > bayes - 0.01


def test_logistic_regression_misses_contextual_interactions() -> None:
    ds = make_synthetic(rows=20_000, vocab=10, pairwise=0.0, contextual=1.5)
    bayes = ds.meta["bayes_auc"]["test"]
    assert _logistic_regression_auc(ds) < bayes - 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": 0}, "rows"),
        ({"fields": 2.5}, "fields"),
        ({"context_field": 8}, "context_field"),
        ({"valid": 0.6, "test": 0.5}, "valid"),
        ({"zipf": -1.0}, "zipf"),
        ({"contextual": float("nan")}, "contextual"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_synthetic(**kwargs)


def test_small_and_degenerate_configurations() -> None:
    # One field: no pairs can be planted; zero-fraction splits are empty with NaN Bayes AUC.
    ds = make_synthetic(rows=500, fields=1, valid=0.0, test=0.2)
    assert ds.meta["planted"]["pairwise_pairs"] == [] == ds.meta["planted"]["contextual_pairs"]
    assert len(ds.valid["label"]) == 0 and np.isnan(ds.meta["bayes_auc"]["valid"])
    assert ds.train["cat"].shape == (400, 1)
