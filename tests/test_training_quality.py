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
    # Measured for seed 2021 under the defaults (clip 10, learning rate /10 on a plateau): test AUC
    # 0.9433, best epoch 7, and 0.9397-0.9424 for seeds 2022-2025
    # (experiments/results/fuxictr_parity_frappe.md); 0.9362 under the protocol before the
    # ablation. The bound leaves room for another CPU's rounding.
    data = load_dataset("frappe", data_dir=frappe_dir)
    model = build_model("dnn", data.schema)
    res = fit(model, data, TrainConfig(seed=2021), log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.937, res.test
    assert res.valid["auc"] > 0.94
    assert 3 <= res.best_epoch <= 15


def test_dpn_beats_dnn_with_planted_context_under_the_unclipped_protocol():
    """The paper's comparison: the DNN with its first layer replaced by a feature DPO, same widths,
    same data, seeds and training budget, seeds trained as one sweep per model, under the protocol
    of the measurement (experiments/results/synthetic_context_margin.md: no gradient clip, no
    learning-rate cut): dpn - dnn = +0.0104 / +0.0094 / +0.0154 for seeds 2021-2023, mean +0.0118;
    under this suite's compilation settings the same sweeps gave dpn 0.8014 vs dnn 0.7968
    (+0.0046): at lr 3e-3 float-rounding differences between compilations move single runs by
    ~0.004, so we assert half of the smaller measurement on the 3-seed mean. If the generated
    weights were ignored or wrong, the two models would tie.

    Under today's defaults (clip 10) the margin is gone: dnn 0.8052 vs dpn 0.8047
    (experiments/results/synthetic_context_margin_new_defaults.md): the clip helps the DNN
    (+0.012), not the DPN. What that means for the verdict on DPN is on the results pages."""
    from dpn_jax.train.sweep import fit_sweep

    data = make_synthetic(seed=2021, rows=60_000, vocab=10, contextual=3.0)
    cfgs = [TrainConfig(batch_size=512, lr=3e-3, max_epochs=8, seed=s, grad_clip=0.0,
                        reduce_lr_factor=0.0) for s in (2021, 2022, 2023)]
    quiet = {"log": lambda s: None, "progress": False}

    def mean_auc(name):
        runs = fit_sweep(build_model(name, data.schema, hidden=(128, 64)), data, cfgs, **quiet)
        return sum(r.result.test["auc"] for r in runs) / len(runs)

    dnn, dpn = mean_auc("dnn"), mean_auc("dpn")
    assert dpn - dnn > 0.0023, (dpn, dnn)
