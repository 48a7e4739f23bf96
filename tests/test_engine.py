"""The shared training pieces (dpn_jax.train.engine): the evaluator, the epoch runner's loss
reading and timing, the feeder, the learning-rate accessor, and fit against a hand-written loop."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from dpn_jax.data import batches
from dpn_jax.models import build_model
from dpn_jax.train import batchnorm
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.engine import (
    EpochTally,
    Feeder,
    Program,
    evaluate,
    evaluate_replicas,
    predict_logits,
    run_epoch,
)
from dpn_jax.train.loop import fit
from dpn_jax.train.optimizer import learning_rate, with_learning_rate
from dpn_jax.train.progress import EpochProgress
from dpn_jax.train.state import init_state, make_optimizer, make_predict, make_train_step

# ----------------------------------------------------------------------------- the evaluator


def _split(n: int = 23, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 3)).astype(np.float32),
            "label": (rng.random(n) < 0.4).astype(np.float32)}


def _linear_predict(params, batch_stats, batch):
    """Logits x @ w; stacked params ``[R, 3]`` give ``[R, rows]``."""
    return jnp.einsum("...k,bk->...b", params, jnp.asarray(batch["x"])) + batch_stats


def test_evaluate_is_exact_on_every_row_and_replicas_agree():
    split = _split()
    w = np.asarray([[0.5, -1.0, 2.0], [1.0, 0.0, -0.3]], np.float32)
    logits = split["x"] @ w.T  # [rows, R]
    # batch 5 over 23 rows: the last batch is padded; the padding must not count
    one = predict_logits(_linear_predict, w[0], 0.0, split, 5)
    np.testing.assert_allclose(one, logits[:, 0], rtol=1e-6)
    stacked = predict_logits(_linear_predict, w, 0.0, split, 5)
    assert stacked.shape == (2, 23)
    np.testing.assert_allclose(stacked, logits.T, rtol=1e-6)
    got = evaluate(_linear_predict, w[1], 0.0, split, 5)
    p = 1 / (1 + np.exp(-logits[:, 1].astype(np.float64)))
    assert got["auc"] == pytest.approx(roc_auc_score(split["label"], logits[:, 1]), abs=1e-12)
    assert got["logloss"] == pytest.approx(log_loss(split["label"], p), rel=1e-6)
    reps = evaluate_replicas(_linear_predict, w, 0.0, split, 5)
    assert reps[1] == got and reps[0] == evaluate(_linear_predict, w[0], 0.0, split, 5)


# ----------------------------------------------------------------------------- the epoch runner


def _fake_program(losses_of_step, steps_per_dispatch: int = 1):
    """A 'state' counting steps; dispatch returns the scripted losses ``[steps, replicas]``."""

    def dispatch(state, block):
        n = state + np.arange(1, steps_per_dispatch + 1)
        return state + steps_per_dispatch, jnp.asarray(np.stack([losses_of_step(i) for i in n]))

    return Program(dispatch=dispatch, predict=None, batch_stats=None)


def _blocks(sizes, steps_per_dispatch=1):
    for rows in sizes:
        yield {"label": np.zeros((steps_per_dispatch, rows) if steps_per_dispatch > 1 else (rows,))}


@pytest.mark.parametrize("per_dispatch", [1, 2])
def test_run_epoch_reads_every_fourth_step_and_the_last(per_dispatch):
    """10 steps: the loss is read at steps 4, 8 and 10 (one value per replica); a non-finite one
    is shown but not summed; the first dispatch of each shape is timed apart. With two steps per
    dispatch the same steps' losses are read (a change the runner needs none for)."""

    def loss(i):
        return [float(i), np.nan if i == 8 else 10.0 * i]

    seen, calls = set(), []

    def check(state, step, values):
        calls.append((int(state), step, values.tolist()))
        return float(values[0])

    n_dispatches = 10 // per_dispatch
    sizes = [4] * (n_dispatches - 1) + [2]  # a last, smaller batch: a second shape
    ep = run_epoch(0, _fake_program(loss, per_dispatch), _blocks(sizes, per_dispatch),
                   tally=EpochTally.start(2), steps_per_epoch=10, seen_shapes=seen,
                   bar=EpochProgress(10, 4, enabled=False), check=check)
    assert [c[1] for c in calls] == [4, 8, 10]
    np.testing.assert_array_equal([c[2] for c in calls], [[4.0, 40.0], [8.0, np.nan], [10.0, 100.0]])
    assert ep.tally.steps == 10 and ep.state == 10
    np.testing.assert_array_equal(ep.tally.losses, [3, 2])
    np.testing.assert_allclose(ep.tally.mean_loss(), [(4 + 8 + 10) / 3, (40 + 100) / 2])
    assert len(seen) == 2 and ep.untimed_rows == (4 + 2) * per_dispatch  # rows of the compiling steps


def test_run_epoch_continues_a_tally_and_checkpoints_after_each_dispatch():
    after = []
    tally = EpochTally(6, np.asarray([1.5]), np.asarray([1]), first_step=6)
    ep = run_epoch(6, _fake_program(lambda i: [1.0]), _blocks([4] * 4), tally=tally, steps_per_epoch=10,
                   seen_shapes={(4,)}, bar=EpochProgress(10, 4, enabled=False),
                   check=lambda s, n, v: float(v[0]), checkpoint=lambda s, t: after.append(t.steps),
                   checkpoint_every=1)
    # the epoch's last step is saved by the checkpoint at the epoch's end, not mid-epoch
    assert after == [7, 8, 9] and ep.untimed_rows == 0 and ep.compile_seconds == 0.0
    np.testing.assert_allclose(ep.tally.loss_sum, [1.5 + 1.0 + 1.0])  # steps 8 and 10 read
    assert ep.tally.first_step == 6 and ep.state == 10


def test_stacked_feeder_zips_each_seeds_order():
    split = _split(50)
    feeder = Feeder(split, 16, (3, 5), stacked=True)
    got = list(feeder.batches(2, seed_offset=7, drop_last=True))
    for k, seed in enumerate((3, 5)):
        alone = list(batches(split, 16, shuffle=True, seed=seed + 7, epoch=2, drop_last=True))
        assert len(got) == len(alone) == 3
        for g, a in zip(got, alone):
            np.testing.assert_array_equal(g["x"][k], a["x"])
    np.testing.assert_array_equal(feeder.keys(4)[1], jax.random.PRNGKey(9))
    single = Feeder(split, 16, (3,))
    np.testing.assert_array_equal(next(single.blocks(2, 1))["x"][0], next(batches(split, 16, shuffle=True, seed=3,
                                                                              epoch=2, start_batch=1))["x"])


# ----------------------------------------------------------------------------- the learning rate


@pytest.mark.parametrize("cfg", [TrainConfig(lr=2e-3), TrainConfig(lr=2e-3, grad_clip=1.0),
                                 TrainConfig(lr=2e-3, optimizer="lazy_adam")])
def test_one_learning_rate_accessor_for_every_optimiser(tiny_synthetic, cfg):
    model = build_model("lr", tiny_synthetic.schema)
    batch = {k: v[:8] for k, v in tiny_synthetic.train.items()}
    states = [init_state(model, batch, cfg.replace(seed=s), make_optimizer(cfg, clip_as_data=True)) for s in (1, 2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.opt_state for s in states])
    np.testing.assert_allclose(np.asarray(learning_rate(stacked)), [2e-3, 2e-3])
    cut = with_learning_rate(stacked, np.asarray([1e-4, 2e-3], np.float32))
    np.testing.assert_allclose(np.asarray(learning_rate(cut)), [1e-4, 2e-3])
    assert learning_rate(cut).dtype == jnp.float32
    one = init_state(model, batch, cfg, make_optimizer(cfg)).opt_state
    assert float(learning_rate(with_learning_rate(one, 5e-4))) == pytest.approx(5e-4)


# ----------------------------------------------------------------------------- fit, by hand


def test_fit_equals_a_hand_written_loop_bit_for_bit(tiny_synthetic):
    """Two epochs of fit (BatchNorm, dropout) against the loop written out: the same batches,
    steps, BatchNorm re-estimation (its own order, seed + 7919, and keys seed + epoch) and
    evaluation give the same parameters, statistics and validation AUCs, bit for bit."""
    data = tiny_synthetic
    model = build_model("dnn", data.schema, hidden=(16,), dropout=0.1)
    cfg = TrainConfig(batch_size=256, eval_batch_size=1000, max_epochs=2, patience=5, seed=11,
                      bn_recalibrate_batches=3)
    res = fit(model, data, cfg, log=lambda s: None, progress=False)

    tx = make_optimizer(cfg)
    state = init_state(model, {k: np.asarray(v[:8]) for k, v in data.train.items()}, cfg, tx)
    step = jax.jit(make_train_step(model, cfg, tx), donate_argnums=0)
    stats_of = batchnorm.make_batch_stats_fn(model)
    predict = jax.jit(make_predict(model))
    kept = []
    for epoch in (1, 2):
        for batch in batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch):
            state, _ = step(state, batch)
        calib = batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7919, epoch=epoch, drop_last=True)
        state = state.replace(batch_stats=batchnorm.recalibrate(
            stats_of, state.params, state.batch_stats, itertools.islice(calib, cfg.bn_recalibrate_batches),
            jax.random.PRNGKey(cfg.seed + epoch)))
        valid = evaluate(predict, state.params, state.batch_stats, data.valid, cfg.eval_batch_size)
        kept.append((jax.device_get((state.params, state.batch_stats)), valid))
    assert [h["valid_auc"] for h in res.history] == [v["auc"] for _, v in kept]
    best = max(range(2), key=lambda i: kept[i][1]["auc"])
    assert res.best_epoch == best + 1
    chex.assert_trees_all_equal(res.params, kept[best][0][0])
    chex.assert_trees_all_equal(res.batch_stats, kept[best][0][1])
