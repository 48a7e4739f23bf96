"""Training-protocol options: FuxiCTR's dense init, min_delta, and the ``protocol=fuxictr`` preset."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import pytest

from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.train.config import PRESETS, TrainConfig, split_overrides
from dpn_jax.train.early_stopping import Rules, StopState, update
from dpn_jax.train.state import init_state, make_optimizer


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_xavier_normal_redraws_exactly_the_dense_kernels(tiny_synthetic):
    model = build_model("dnn", tiny_synthetic.schema, hidden=(400, 400))
    batch = {k: v[:8] for k, v in tiny_synthetic.train.items()}
    cfg = TrainConfig(seed=3)
    own = _leaves(init_state(model, batch, cfg, make_optimizer(cfg)).params)
    cfg_x = cfg.replace(dense_init="xavier_normal")
    xav = _leaves(init_state(model, batch, cfg_x, make_optimizer(cfg_x)).params)
    assert own.keys() == xav.keys()
    kernels = [k for k in own if k.endswith("['kernel']") and own[k].ndim == 2]
    assert len(kernels) == 3  # two hidden layers and the output unit
    for k, v in own.items():
        if k not in kernels:  # embeddings, BatchNorm scales, biases: untouched
            np.testing.assert_array_equal(xav[k], v, err_msg=k)
            continue
        w = xav[k]
        fan_in, fan_out = w.shape
        std = np.sqrt(2.0 / (fan_in + fan_out))
        assert not np.array_equal(w, v)
        assert abs(w.mean()) < 4 * std / np.sqrt(w.size)
        assert w.std() == pytest.approx(std, rel=0.05 if w.size > 10_000 else 0.3)
        if w.size > 100_000:  # untruncated: a 160k-draw normal exceeds 3.5 std; truncated stops at 2
            assert np.abs(w).max() > 3.5 * std
    # "model" keeps each layer's own (truncated) initialiser, bit for bit as before
    big = max(kernels, key=lambda k: own[k].size)
    assert np.abs(own[big]).max() <= 2.01 * own[big].std() / 0.8796


def test_min_delta_reaches_the_stopping_rules():
    rules = Rules.of(TrainConfig(min_delta=0.01, patience=1))
    assert rules.min_delta == 0.01
    state, d = update(rules, StopState(), 0.80, 1e-3)
    assert d.improved
    state, d = update(rules, state, 0.805, 1e-3)  # a gain of 0.005 < min_delta: not a new best
    assert not d.improved and d.stop


def test_protocol_preset_expands_first_and_explicit_keys_win():
    opts = model_options("dnn")
    train_kw, model_kw = split_overrides(["grad_clip=5", "protocol=fuxictr", "dropout=0.1"], opts, "dnn")
    assert train_kw["grad_clip"] == 5.0  # given explicitly: wins over the preset
    assert train_kw["reduce_lr_factor"] == 0.1 and train_kw["min_delta"] == 1e-6
    assert train_kw["bn_recalibrate"] is False and train_kw["dense_init"] == "xavier_normal"
    assert model_kw == {"dropout": 0.1}
    TrainConfig(**train_kw)  # every preset value is in range
    with pytest.raises(ConfigError, match="protocol=bars: unknown protocol"):
        split_overrides(["protocol=bars"], opts, "dnn")


def test_fuxictr_preset_matches_fuxictrs_own_defaults():
    """The preset's numbers read off FuxiCTR's BaseModel, so a FuxiCTR upgrade that changes them
    fails here instead of silently breaking the like-with-like comparison."""
    pytest.importorskip("torch")
    from dpn_jax.benchmark import peer_fuxictr

    if peer_fuxictr.available():
        pytest.skip(f"the optional peer is not installed ({peer_fuxictr.available()})")
    peer_fuxictr._import_layers()
    from fuxictr.pytorch.models import BaseModel

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    preset = PRESETS["fuxictr"]
    assert float(preset["grad_clip"]) == default(BaseModel.fit, "max_gradient_norm")
    assert float(preset["min_delta"]) == default(BaseModel.checkpoint_and_earlystop, "min_delta")
    assert float(preset["reduce_lr_factor"]) == default(BaseModel.lr_decay, "factor")
    assert float(preset["min_lr"]) == default(BaseModel.lr_decay, "min_lr")
    assert int(preset["patience"]) == default(BaseModel.__init__, "early_stop_patience")
    assert default(BaseModel.__init__, "reduce_lr_on_plateau") is True
    assert default(BaseModel.__init__, "monitor") == "AUC" and preset["monitor"] == "auc"
    assert "xavier_normal_" in inspect.getsource(BaseModel.reset_parameters)
