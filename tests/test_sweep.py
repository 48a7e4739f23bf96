"""Vmapped sweeps: each replica equals its own sequential ``fit``; stopped replicas freeze;
configurations that change the program are grouped; sweeps resume."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest

from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.models import build_model
from dpn_jax.sweep_runner import parse_grid, parse_seeds, run_sweep
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit
from dpn_jax.train.sweep import fit_sweep, plan_chunk, replica_bytes

# Tolerance: a replica runs fit's arithmetic, but XLA sums the vmapped matmuls in another order,
# so each step differs by float32 rounding (~1e-7 relative). Adam's normalised updates move a
# parameter by at most ~lr per step, so over these ~20 steps the gap stays far below lr = 1e-3;
# measured: 1.2e-7 (no dropout) to 2e-4 (dropout 0.3, lr 3e-3, 3 epochs) on synthetic data.
# Long, high-lr runs amplify rounding chaotically (as two compilations of fit itself do,
# notebook 04), so the check is kept to a short run where it is meaningful.
PARAM_ATOL = 1e-4
AUC_ATOL = 1e-4

BASE = TrainConfig(batch_size=512, eval_batch_size=1024, max_epochs=2, reduce_lr_factor=0.5)


def _frozen(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with lr = 0: a replica whose parameters never move, so it never improves after
    epoch 1. TrainConfig refuses lr = 0 from users (a mistake there); the engine handles it."""
    frozen = copy.copy(cfg)
    object.__setattr__(frozen, "lr", 0.0)
    return frozen


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_replicas_equal_sequential_runs(tiny_synthetic):
    """Seeds, learning rates, L2, gradient clipping and dropout as data: every replica's best
    parameters, epochs and test metrics equal ``fit`` with that configuration alone."""
    ds = tiny_synthetic
    cfgs = [BASE.replace(seed=1), BASE.replace(seed=2, lr=3e-3, embedding_l2=1e-3),
            BASE.replace(seed=1, lr=2e-3, grad_clip=0.05, net_l2=1e-4)]
    dropouts = [0.0, 0.2, 0.0]
    sweep = fit_sweep(build_model("dnn", ds.schema, hidden=(16, 16)), ds, cfgs, dropouts=dropouts,
                      log=lambda s: None, progress=False)
    assert [r.status for r in sweep] == ["done"] * 3
    for cfg, rate, rep in zip(cfgs, dropouts, sweep):
        alone = fit(build_model("dnn", ds.schema, hidden=(16, 16), dropout=rate), ds, cfg,
                    log=lambda s: None, progress=False)
        got = rep.result
        assert got.best_epoch == alone.best_epoch and got.epochs == alone.epochs
        assert _max_diff(got.params, alone.params) < PARAM_ATOL
        assert _max_diff(got.batch_stats, alone.batch_stats) < PARAM_ATOL
        assert abs(got.test["auc"] - alone.test["auc"]) < AUC_ATOL
        assert abs(got.test["logloss"] - alone.test["logloss"]) < 1e-4
        assert [h["lr"] for h in got.history] == pytest.approx([h["lr"] for h in alone.history])
    # Different configurations really trained differently.
    assert _max_diff(sweep[0].result.params, sweep[1].result.params) > 1e-3


def test_stopped_replica_stops_updating(tiny_synthetic):
    """lr = 0 never improves after epoch 1, so with patience 2 that replica stops after epoch 3
    while three others train on: 3 of 4 active keeps the stack (no compaction), the stopped
    replica is masked, and its parameters must not move after it stopped."""
    ds = tiny_synthetic
    base = BASE.replace(max_epochs=5, patience=2, reduce_lr_factor=0.0, lr=3e-3)
    cfgs = [base.replace(seed=s) for s in (1, 2, 3)] + [_frozen(base.replace(seed=1))]
    snapshots: list = []
    held_log, active_log = [], []

    def record(epoch, state, held, active):
        held_log.append(held.tolist())
        active_log.append(active.tolist())
        snapshots.append(jax.tree_util.tree_map(lambda x: np.array(x[3]), state.params))

    out = fit_sweep(build_model("lr", ds.schema), ds, cfgs, log=lambda s: None, progress=False,
                    on_epoch=record)
    assert out[3].result.epochs == 3 and out[3].result.best_epoch == 1
    assert [r.result.epochs for r in out[:3]] == [5, 5, 5]
    assert active_log[2] == [True, True, True, False] and held_log[-1] == [0, 1, 2, 3]
    assert _max_diff(snapshots[2], snapshots[4]) == 0.0  # frozen once stopped


def test_stopped_replicas_are_compacted_away(tiny_synthetic):
    """With 1 of 2 replicas active the stack shrinks to the active one; its result still equals
    its own sequential run."""
    ds = tiny_synthetic
    base = BASE.replace(max_epochs=4, patience=1, reduce_lr_factor=0.0)
    cfgs = [base.replace(seed=1), _frozen(base.replace(seed=1))]
    held_log = []
    out = fit_sweep(build_model("lr", ds.schema), ds, cfgs, log=lambda s: None, progress=False,
                    on_epoch=lambda e, state, held, active: held_log.append(
                        (held.tolist(), jax.tree_util.tree_leaves(state.params)[0].shape[0])))
    assert out[1].result.epochs == 2 and out[0].result.epochs == 4
    assert held_log[1] == ([0, 1], 2) and held_log[2] == ([0], 1)
    alone = fit(build_model("lr", ds.schema), ds, cfgs[0], log=lambda s: None, progress=False)
    assert _max_diff(out[0].result.params, alone.params) < PARAM_ATOL
    assert abs(out[0].result.test["auc"] - alone.test["auc"]) < AUC_ATOL


class Killed(Exception):
    """Stands for the process dying at the end of an epoch, before its checkpoint is written."""


def test_killed_sweep_resumes_from_its_checkpoint(tiny_synthetic, tmp_path):
    """Killed during epoch 3 (after the two lr = 0 replicas stopped at epoch 2 and the stack was
    compacted to the other two), the sweep resumes after epoch 2's checkpoint and ends as the
    uninterrupted sweep: same epochs, best epochs, histories, parameters and test metrics."""
    ds, model = tiny_synthetic, build_model("lr", tiny_synthetic.schema)
    base = BASE.replace(max_epochs=5, patience=1, reduce_lr_factor=0.0, lr=3e-3)
    cfgs = [base.replace(seed=1), _frozen(base.replace(seed=2)), base.replace(seed=3),
            _frozen(base.replace(seed=4))]
    quiet = dict(log=lambda s: None, progress=False)
    whole = fit_sweep(model, ds, cfgs, **quiet)

    def kill_at_3(epoch, state, held, active):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed):
        fit_sweep(model, ds, cfgs, checkpoint_dir=tmp_path, on_epoch=kill_at_3, **quiet)
    logs, held_log = [], []
    resumed = fit_sweep(model, ds, cfgs, checkpoint_dir=tmp_path, resume=True, log=logs.append,
                        progress=False, on_epoch=lambda e, state, held, active: held_log.append((e, held.tolist())))
    assert any("resumed after epoch 2" in line for line in logs)
    assert held_log[0] == (3, [0, 2])  # continued in the compacted program
    assert [r.result.epochs for r in resumed] == [5, 2, 5, 2]
    for a, b in zip(whole, resumed):
        assert (a.status, a.result.best_epoch, a.result.epochs) == (b.status, b.result.best_epoch, b.result.epochs)
        assert [h["valid_auc"] for h in a.result.history] == pytest.approx([h["valid_auc"] for h in b.result.history], abs=1e-6)
        assert _max_diff(a.result.params, b.result.params) < 1e-6
        assert abs(a.result.test["auc"] - b.result.test["auc"]) < 1e-6
    # a finished sweep's last checkpoint only needs the test evaluation
    again = fit_sweep(model, ds, cfgs, checkpoint_dir=tmp_path, resume=True, **quiet)
    assert [r.result.test["auc"] for r in again] == pytest.approx([r.result.test["auc"] for r in resumed], abs=1e-9)


def test_sweep_checkpoints_refuse_another_run(tiny_synthetic, tmp_path):
    ds, model = tiny_synthetic, build_model("lr", tiny_synthetic.schema)
    cfgs = [BASE.replace(seed=1, max_epochs=1), BASE.replace(seed=2, max_epochs=1)]
    quiet = dict(log=lambda s: None, progress=False)
    fit_sweep(model, ds, cfgs, checkpoint_dir=tmp_path, **quiet)
    with pytest.raises(DpnError, match="already holds checkpoints"):
        fit_sweep(model, ds, cfgs, checkpoint_dir=tmp_path, **quiet)
    with pytest.raises(DpnError, match="different run.*seed=3"):
        fit_sweep(model, ds, [cfgs[0], cfgs[1].replace(seed=3)], checkpoint_dir=tmp_path, resume=True, **quiet)
    # resume without any checkpoint yet: a fresh start
    assert fit_sweep(model, ds, cfgs, checkpoint_dir=tmp_path / "new", resume=True, **quiet)[0].status == "done"


def test_min_epochs_holds_early_stop_and_lr_cuts_in_fit_and_sweep(tiny_synthetic):
    """lr = 0 never improves after epoch 1: with patience 1 the run stops after epoch 2, with
    min_epochs 4 after epoch 4, its learning rate uncut until then (fit and sweep alike)."""
    ds, model = tiny_synthetic, build_model("lr", tiny_synthetic.schema)
    base = BASE.replace(max_epochs=10, patience=1, reduce_lr_factor=0.5)
    quiet = dict(log=lambda s: None, progress=False)
    assert fit(model, ds, _frozen(base), **quiet).epochs == 2
    held = _frozen(base.replace(min_epochs=4))
    for result in (fit(model, ds, held, **quiet), fit_sweep(model, ds, [held], **quiet)[0].result):
        assert result.epochs == 4 and result.best_epoch == 1
        # a cut would raise lr 0 to min_lr (1e-6) from the next epoch's row
        assert [row["lr"] for row in result.history] == [0.0] * 4


def test_chunks_equal_one_program_and_memory_plan(tiny_synthetic):
    ds = tiny_synthetic
    model = build_model("fm", ds.schema)
    cfgs = [BASE.replace(seed=s) for s in (1, 2, 3)]
    together = fit_sweep(model, ds, cfgs, log=lambda s: None, progress=False)
    logs = []
    state_bytes, act_bytes = replica_bytes(model, {k: v[:8] for k, v in ds.train.items()}, cfgs[0])
    chunked = fit_sweep(model, ds, cfgs, log=logs.append, progress=False,
                        memory_budget=2 * (state_bytes + act_bytes))
    assert any("running 2 programs of at most 2 replicas" in line for line in logs)
    for a, b in zip(together, chunked):
        assert _max_diff(a.result.params, b.result.params) < PARAM_ATOL
    # fm: table (V x 10) + linear (V x 1) + bias; Adam keeps two moments; plus grads and updates.
    n_params = together[0].result.num_params
    assert state_bytes >= 5 * 4 * n_params
    assert act_bytes > 4 * cfgs[0].batch_size  # at least one float per example
    assert plan_chunk(10, 100, 350) == 3 and plan_chunk(10, 100, 50) == 1 and plan_chunk(2, 1, 10**9) == 2


def test_static_options_must_agree(tiny_synthetic):
    ds = tiny_synthetic
    with pytest.raises(ConfigError, match="batch_size"):
        fit_sweep(build_model("lr", ds.schema), ds, [BASE, BASE.replace(batch_size=256)], progress=False)
    with pytest.raises(ConfigError, match="no `dropout` option"):
        fit_sweep(build_model("lr", ds.schema), ds, [BASE], dropouts=[0.1], progress=False)


def test_run_sweep_groups_by_shape_and_resumes(tiny_synthetic, tmp_path, monkeypatch):
    import dpn_jax.sweep_runner as sr

    calls = []
    real = sr.fit_sweep

    def counting(model, data, cfgs, **kw):
        calls.append((model.embedding_dim, [c.lr for c in cfgs], kw.get("dropouts")))
        return real(model, data, cfgs, **kw)

    monkeypatch.setattr(sr, "fit_sweep", counting)
    grid = parse_grid(["embedding_dim=4,6", "lr=1e-3,2e-3"])
    sets = ["hidden=8", "max_epochs=1", "batch_size=1024", "eval_batch_size=1024"]
    summary = run_sweep("dnn", tiny_synthetic, seeds=[1, 2], grid=grid, sets=sets, out=tmp_path,
                        log=lambda s: None, progress=False)
    # Width changes the program: two programs, each with 2 learning rates x 2 seeds.
    assert sorted(c[0] for c in calls) == [4, 6]
    assert all(c[1] == [1e-3, 1e-3, 2e-3, 2e-3] and c[2] is None for c in calls)
    assert len(summary["rows"]) == 4 and all(len(r["test_auc"]) == 2 for r in summary["rows"])
    text = (tmp_path / "sweep.md").read_text()
    assert "`embedding_dim=4 lr=1e-3`" in text and "±" in text
    assert len(json.loads((tmp_path / "sweep.json").read_text())["replicas"]) == 8
    assert list((tmp_path / "checkpoints").iterdir()) == []  # each finished group's are removed

    calls.clear()  # a rerun reads both finished programs instead of training
    again = run_sweep("dnn", tiny_synthetic, seeds=[1, 2], grid=grid, sets=sets, out=tmp_path,
                      log=lambda s: None, progress=False)
    assert calls == [] and again["rows"] == summary["rows"]


def test_sweep_table_shows_one_seed_without_a_spread():
    from dpn_jax.sweep_runner import mean_std

    assert mean_std([0.9123]) == "0.9123"  # not "0.9123 ± 0.0000": one seed has no spread
    assert mean_std([0.9, 0.92]) == "0.9100 ± 0.0141"
    assert mean_std([float("nan")]) == "-"


def test_parse_seeds_and_grid_errors():
    assert parse_seeds("2021-2023") == [2021, 2022, 2023]
    assert parse_seeds("5,1-2") == [1, 2, 5]
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("2021-x")
    assert parse_grid(["lr=1e-3, 3e-4"]) == {"lr": ["1e-3", "3e-4"]}
    for bad, msg in [(["lr"], "key=v1,v2"), (["lr="], "no values"), (["lr=1", "lr=2"], "twice"),
                     (["seed=1,2"], "--seeds")]:
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)
