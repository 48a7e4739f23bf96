"""End-to-end quality: the whole pipeline (encoding, training, BatchNorm, early stopping,
evaluation) reaches known targets. These train for real: tens of seconds each."""

from __future__ import annotations

import pytest

from dpn_jax.data import load_dataset
from dpn_jax.data.synthetic import make_synthetic
from dpn_jax.models import build_model
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit

pytestmark = pytest.mark.slow


def test_dnn_on_synthetic_gets_close_to_bayes_auc():
    # Additive + pairwise structure only (learnable from 160k rows); measured: DNN 0.7357 test
    # AUC against a Bayes-optimal 0.7465 (2026-11-27, seed 2021).
    data = make_synthetic(seed=2021, rows=200_000, vocab=10, contextual=0.0)
    bayes = data.meta["bayes_auc"]["test"]
    model = build_model("dnn", data.schema, hidden=(128, 128))
    res = fit(model, data, TrainConfig(batch_size=1024), log=lambda s: None, progress=False)
    assert res.test["auc"] > bayes - 0.02, (res.test, bayes)
    assert res.test["auc"] <= bayes + 0.01  # no model beats the true probabilities (up to noise)


@pytest.mark.realdata
def test_dnn_on_frappe_reaches_measured_auc(frappe_dir):
    # Measured: 0.9362 / 0.9366 test AUC for seed 2021 under the plain protocol (Adam 1e-3,
    # batch 4096, patience 2, no regularisation), best epoch 9.
    data = load_dataset("frappe", data_dir=frappe_dir)
    model = build_model("dnn", data.schema)
    res = fit(model, data, TrainConfig(seed=2021), log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.930, res.test
    assert res.valid["auc"] > 0.94
    assert 3 <= res.best_epoch <= 15


def test_dpn_beats_dnn_with_planted_context():
    """The paper's comparison: the DNN with its first layer replaced by a feature DPO, same widths,
    same data, seed and training budget. Measured over seeds 2021-2023
    (experiments/results/synthetic_context_margin.md): dpn - dnn = +0.0104 / +0.0094 / +0.0154,
    mean +0.0118; we assert half the mean. (A DNN widened to dpn's parameter count matches dpn
    there: the margin is capacity spent on the context, not a free lunch - see that table.)"""
    data = make_synthetic(seed=2021, rows=60_000, vocab=10, contextual=3.0)
    cfg = TrainConfig(batch_size=512, lr=3e-3, max_epochs=8, seed=2021)
    quiet = {"log": lambda s: None, "progress": False}
    dnn = fit(build_model("dnn", data.schema, hidden=(128, 64)), data, cfg, **quiet)
    dpn = fit(build_model("dpn", data.schema, hidden=(128, 64)), data, cfg, **quiet)
    assert dpn.test["auc"] - dnn.test["auc"] > 0.0059, (dpn.test, dnn.test)
