"""The train step, precise BatchNorm, early stopping, determinism and the fit loop."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpn_jax.data import batches
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.train import batchnorm
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.early_stopping import EarlyStopping
from dpn_jax.train.loop import evaluate, fit
from dpn_jax.train.state import (
    get_lr,
    init_state,
    make_optimizer,
    make_predict,
    make_train_step,
    set_lr,
)


def _batch(data, n=64, start=0):
    return {k: jnp.asarray(v[start:start + n]) for k, v in data.train.items()}


class TestTrainStep(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_step_same_with_and_without_jit(self):
        from dpn_jax.data.synthetic import make_synthetic

        data = make_synthetic(seed=1, rows=1000, fields=4, vocab=10)
        cfg = TrainConfig(embedding_l2=1e-3, net_l2=1e-4, grad_clip=1.0)
        model = build_model("dnn", data.schema, hidden=(16, 8), dropout=0.1)
        tx = make_optimizer(cfg)
        ref_state = init_state(model, _batch(data, 8), cfg, tx)
        step = self.variant(make_train_step(model, cfg, tx))
        state = ref_state
        for i in range(3):
            state, loss = step(state, _batch(data, 64, 64 * i))
        plain = make_train_step(model, cfg, tx)
        ref = ref_state
        for i in range(3):
            ref, ref_loss = plain(ref, _batch(data, 64, 64 * i))
        chex.assert_trees_all_close(state.params, ref.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(state.batch_stats, ref.batch_stats, rtol=1e-5, atol=1e-6)
        assert int(state.step) == 3
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)


def test_embedding_l2_gradient(tiny_synthetic):
    """A row never looked up gets only the L2 gradient 2 * l2 * E (Adam-free check via grads)."""
    model = build_model("lr", tiny_synthetic.schema)
    cfg = TrainConfig(embedding_l2=0.5)
    tx = make_optimizer(cfg)  # only initialises the state: the test takes gradients
    state = init_state(model, _batch(tiny_synthetic, 8), cfg, tx)
    params = jax.tree_util.tree_map(lambda x: x + 1.0, state.params)
    batch = _batch(tiny_synthetic, 8)
    used = set(np.asarray(batch["cat"]).ravel().tolist())
    unused = next(i for i in range(tiny_synthetic.schema.table_size) if i not in used)

    def loss(p):
        logits = model.apply({"params": p}, batch)
        data_loss = jnp.mean(optax_bce(logits, batch["label"]))
        return data_loss + 0.5 * jnp.sum(p["linear"]["weights"]["table"] ** 2)

    import optax

    def optax_bce(lg, y):
        return optax.sigmoid_binary_cross_entropy(lg, y)

    g = jax.grad(loss)(params)["linear"]["weights"]["table"]
    np.testing.assert_allclose(np.asarray(g[unused]), 2 * 0.5 * np.asarray(params["linear"]["weights"]["table"][unused]))
    # and the train step's loss uses the same term: its gradient on that row moves it
    step = make_train_step(model, cfg, make_optimizer(cfg))
    st = state.replace(params=params, opt_state=make_optimizer(cfg).init(params))
    new, _ = step(st, batch)
    assert float(new.params["linear"]["weights"]["table"][unused, 0]) < float(params["linear"]["weights"]["table"][unused, 0])


def test_set_lr_changes_updates_without_retrace():
    for clip in (0.0, 5.0):
        cfg = TrainConfig(lr=1e-2, grad_clip=clip)
        tx = make_optimizer(cfg)
        from dpn_jax.train.state import TrainState

        params = {"w": jnp.ones(3)}
        st = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                        opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
        assert get_lr(st) == pytest.approx(1e-2)
        st2 = set_lr(st, 1e-3)
        assert get_lr(st2) == pytest.approx(1e-3)
        assert get_lr(st) == pytest.approx(1e-2)  # the original is untouched
        g = {"w": jnp.ones(3)}
        u1, _ = tx.update(g, st.opt_state, params)
        u2, _ = tx.update(g, st2.opt_state, params)
        np.testing.assert_allclose(np.asarray(u1["w"]) / 10, np.asarray(u2["w"]), rtol=1e-5)


class _DenseBN(nn.Module):
    momentum: float

    @nn.compact
    def __call__(self, batch, train: bool = False):
        x = nn.Dense(3)(batch["x"])
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)[:, 0]


@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_precise_batchnorm_equals_average_of_batch_statistics(momentum):
    rng = np.random.default_rng(0)
    xs = [rng.normal(loc=2.0, scale=3.0, size=(50, 4)).astype(np.float32) for _ in range(4)]
    model = _DenseBN(momentum)
    v = model.init(jax.random.PRNGKey(0), {"x": jnp.asarray(xs[0])})
    stats = batchnorm.recalibrate(batchnorm.make_batch_stats_fn(model), v["params"], v["batch_stats"],
                                  [{"x": jnp.asarray(x)} for x in xs], jax.random.PRNGKey(0))
    w = np.asarray(v["params"]["Dense_0"]["kernel"])
    b = np.asarray(v["params"]["Dense_0"]["bias"])
    hs = [x @ w + b for x in xs]
    mean = np.mean([h.mean(0) for h in hs], axis=0)
    var = np.mean([h.var(0) for h in hs], axis=0)
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["mean"]), mean, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["var"]), var, rtol=1e-3)


def test_early_stopping():
    es = EarlyStopping(patience=2)
    assert es.update(0.7) and es.update(0.71)
    assert not es.update(0.70) and not es.should_stop
    assert es.update(0.72) and es.bad_epochs == 0
    assert not es.update(0.72) and not es.update(float("nan")) and es.should_stop
    assert es.best == 0.72 and es.best_epoch == 4
    # min_epochs: no stop (and warming_up: no lr cut) before that many epochs, then the usual rule
    es = EarlyStopping(patience=1, min_epochs=3)
    assert es.update(0.7) and es.warming_up
    assert not es.update(0.6) and not es.should_stop and es.warming_up
    assert not es.update(0.6) and es.should_stop and not es.warming_up
    # a resumed stopper keeps its counters and takes patience / min_epochs from the config
    again = EarlyStopping.for_config(TrainConfig(patience=4, min_epochs=5), es.state_dict())
    assert (again.patience, again.min_epochs, again.epoch, again.bad_epochs, again.best) == (
        4, 5, 3, 2, 0.7) and again.warming_up and not again.should_stop


def test_lr_after_bad_epoch():
    """The one lr-cut rule of fit and the sweep: times the factor, floored at min_lr, never raised,
    none while warming up or with the factor 0."""
    cfg = TrainConfig(reduce_lr_factor=0.1, min_lr=1e-5)
    es = EarlyStopping(patience=3)
    es.update(0.7)
    assert es.lr_after_bad_epoch(1e-3, cfg) == pytest.approx(1e-4)
    assert es.lr_after_bad_epoch(5e-5, cfg) == 1e-5  # floored
    assert es.lr_after_bad_epoch(1e-6, cfg) == 1e-6  # below the floor already: not raised
    assert es.lr_after_bad_epoch(1e-3, TrainConfig(reduce_lr_factor=0.0)) == 1e-3
    warm = EarlyStopping(patience=3, min_epochs=2)
    warm.update(0.7)
    assert warm.lr_after_bad_epoch(1e-3, cfg) == 1e-3


def test_split_overrides_types_and_errors():
    opts = model_options("dnn")
    train_kw, model_kw = split_overrides(["lr=3e-4", "hidden=64,32", "dropout=0.2", "bn_recalibrate=false"], opts, "dnn")
    assert train_kw == {"lr": 3e-4, "bn_recalibrate": False}
    assert model_kw == {"hidden": (64, 32), "dropout": 0.2}
    with pytest.raises(ConfigError, match="did you mean 'dropout'"):
        split_overrides(["dropuot=0.1"], opts, "dnn")
    with pytest.raises(ConfigError, match="expected a number"):
        split_overrides(["lr=fast"], opts, "dnn")
    with pytest.raises(ConfigError, match="expected an integer"):
        split_overrides(["batch_size=10.5"], opts, "dnn")
    with pytest.raises(ConfigError, match="key=value"):
        split_overrides(["lr"], opts, "dnn")


def _fit(data, seed, **kw):
    model = build_model("dnn", data.schema, hidden=(32, 16), dropout=0.1)
    cfg = TrainConfig(seed=seed, batch_size=256, max_epochs=3, patience=5, **kw)
    return model, cfg, fit(model, data, cfg, log=lambda s: None, progress=False)


def test_same_seed_bit_identical_and_best_restored(tiny_synthetic):
    model, cfg, a = _fit(tiny_synthetic, 7)
    _, _, b = _fit(tiny_synthetic, 7)
    _, _, c = _fit(tiny_synthetic, 8)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
    assert a.history == [dict(h, epoch_seconds=g["epoch_seconds"]) for h, g in zip(b.history, a.history)]
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(a.params, c.params)
    # the returned parameters are the best epoch's: re-evaluating them gives the best valid AUC
    assert a.valid["auc"] == max(h["valid_auc"] for h in a.history)
    again = evaluate(jax.jit(make_predict(model)), a.params, a.batch_stats, tiny_synthetic.valid, 1000)
    assert again["auc"] == pytest.approx(a.valid["auc"], abs=1e-12)


def test_batches_cover_train_each_epoch(tiny_synthetic):
    seen = np.concatenate([b["cat"] for b in batches(tiny_synthetic.train, 700, shuffle=True, seed=1, epoch=1)])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, np.asarray(tiny_synthetic.train["cat"]).tolist()))


def test_reduce_lr_on_plateau_and_early_stop(tiny_synthetic, monkeypatch):
    """Scripted validation AUCs: 0.70, 0.72, then worse -> lr x0.1 per bad epoch, stop at patience."""
    import dpn_jax.train.loop as loop

    aucs = iter([0.70, 0.72, 0.71, 0.69, 0.68, 0.99])
    real = loop.evaluate

    def scripted(predict, params, stats, split, bs):
        out = real(predict, params, stats, split, bs)
        return dict(out, auc=next(aucs)) if split is tiny_synthetic.valid else out

    monkeypatch.setattr(loop, "evaluate", scripted)
    logs: list[str] = []
    model = build_model("lr", tiny_synthetic.schema)
    cfg = TrainConfig(lr=1e-2, batch_size=256, max_epochs=10, patience=3, reduce_lr_factor=0.1)
    res = fit(model, tiny_synthetic, cfg, log=logs.append, progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3, 1e-4])
    assert res.epochs == 5 and res.best_epoch == 2 and res.valid["auc"] == 0.72
    assert any("early stop" in s for s in logs)
