"""``dpn-jax tune``: every trial on the tuning seeds, selection on mean validation AUC (never
test), the selected configuration retrained on fresh seeds; deterministic draws; resumable."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import jax
import numpy as np
import pytest

import dpn_jax.sweep_runner as sweep_runner
import dpn_jax.tuning as tuning
from dpn_jax.cli import main
from dpn_jax.errors import ConfigError
from dpn_jax.models import available_models, build_model
from dpn_jax.sweep_runner import run_sweep
from dpn_jax.train import engine
from dpn_jax.tune_spaces import NO_DENSE_KERNELS, default_space, families, parse_space
from dpn_jax.tuning import draw_trials, rank_trials, run_tune, select_trial, trial_rows

TINY = ["hidden=8", "batch_size=512", "eval_batch_size=1024", "max_epochs=2"]
QUIET = {"progress": False, "log": lambda s: None}


def _space(path, text: str):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- selection


def _replica(label, seed, valid, test, status="done"):
    return {"configuration": label, "seed": seed, "status": status, "valid_auc": valid,
            "valid_logloss": 1 - valid, "test_auc": test, "test_logloss": 1 - test,
            "best_epoch": 1, "epochs": 2, "group": "g"}


def test_selection_follows_mean_validation_auc_not_test():
    """B has the best validation mean; A the best test mean; C a higher validation AUC on one
    seed but diverged on the other; D a higher validation AUC but only one of the tuning seeds.
    The selection is B, and the ranking never looks at test."""
    confs = [sweep_runner.Configuration(label, {}, {}) for label in "ABCDE"]
    options = [{"x": i} for i in range(5)]
    replicas = [_replica("A", 1, 0.80, 0.95), _replica("A", 2, 0.82, 0.95),
                _replica("B", 1, 0.83, 0.70), _replica("B", 2, 0.83, 0.70),
                _replica("C", 1, 0.99, 0.99), _replica("C", 2, float("nan"), float("nan"), "diverged"),
                _replica("D", 1, 0.999, 0.99),
                _replica("E", 1, 0.82, 0.60), _replica("E", 2, 0.80, 0.60)]  # A's mean, reversed
    rows = trial_rows(confs, options, replicas, seeds=[1, 2])
    assert [r["complete"] for r in rows] == [True, True, False, False, True]
    assert rows[1]["valid_auc_mean"] == pytest.approx(0.83)
    assert rows[4]["valid_auc_std"] == pytest.approx(statistics.stdev([0.82, 0.80]))
    best_test = max(range(5), key=lambda i: rows[i]["test_auc_mean"] if rows[i]["complete"] else -1)
    assert best_test == 0  # test would pick A
    assert select_trial(rows) == 1
    assert rank_trials(rows) == [1, 0, 4]  # A and E tie at 0.81: the earlier trial first
    with pytest.raises(Exception, match="every trial diverged"):
        select_trial([rows[2], rows[3]])


# ----------------------------------------------------------------------------- search


def test_grid_enumerates_the_product_in_order(tmp_path):
    dims = parse_space("dnn", _space(tmp_path / "s.yaml", "lr: {values: [1e-3, 3e-3]}\n"
                                     "embedding_dim: {values: [4, 6, 8]}\nhidden: {choice: ['8,8', [16]]}\n"))
    trials = draw_trials(dims, "grid")
    want = [dict(zip(("lr", "embedding_dim", "hidden"), v))
            for v in itertools.product([1e-3, 3e-3], [4, 6, 8], [(8, 8), (16,)])]
    assert trials == want
    with pytest.raises(ConfigError, match="--trials 5: a grid trains every combination of the space \\(12\\)"):
        draw_trials(dims, "grid", trials=5)
    ranged = parse_space("dnn", {"lr": {"log_uniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match="lr is searched over a range"):
        draw_trials(ranged, "grid")


def test_random_search_is_deterministic_and_within_the_space():
    space = {"lr": {"log_uniform": ["1e-4", "1e-2"]}, "dropout": {"uniform": [0.0, 0.5]},
             "embedding_dim": {"uniform": [4, 12]}, "rank": {"log_uniform": [1, 16]},
             "embedding_l2": {"choice": [0, 0.01, 0.1]}}
    dims = parse_space("dpn", space)
    a = draw_trials(dims, "random", 30, search_seed=7)
    assert a == draw_trials(parse_space("dpn", space), "random", 30, search_seed=7)
    assert a != draw_trials(dims, "random", 30, search_seed=8)
    assert len({tuning.label_of(t) for t in a}) == 30  # distinct trials
    for t in a:
        assert 1e-4 <= t["lr"] <= 1e-2 and float(f"{t['lr']:.3g}") == t["lr"]
        assert 0 <= t["dropout"] <= 0.5
        assert isinstance(t["embedding_dim"], int) and 4 <= t["embedding_dim"] <= 12
        assert isinstance(t["rank"], int) and 1 <= t["rank"] <= 16
        assert t["embedding_l2"] in (0.0, 0.01, 0.1)
    # log-uniform: about as many draws per decade
    lrs = np.log10([t["lr"] for t in draw_trials(parse_space("dnn", {"lr": space["lr"]}), "random", 400)])
    assert 0.35 < np.mean(lrs < -3) < 0.65
    # a finite space smaller than --trials
    small = parse_space("dnn", {"lr": {"values": [1e-3, 3e-3]}, "dropout": {"choice": [0, 0.1]}})
    assert len(draw_trials(small, "random", 4)) == 4
    with pytest.raises(ConfigError, match="holds only 4 distinct configurations"):
        draw_trials(small, "random", 5)


@pytest.mark.parametrize("text, message", [
    ("dropout: {values: [0, 1.5]}", "s.yaml: dropout=1.5: dropout must be >= 0 and < 1"),
    ("lr: {log_uniform: [0, 1.0e-2]}", "s.yaml: lr=0: lr must be > 0"),
    ("embedding_dim: {uniform: [0, 8]}", "s.yaml: embedding_dim=0: embedding_dim must be >= 1"),
    ("embedding_dim: {choice: [4.5]}", "s.yaml: embedding_dim=4.5: expected an integer"),
    ("dropuot: {values: [0.1]}", "s.yaml: dropuot: unknown key \\(did you mean 'dropout'\\?\\)"),
    ("lr: {between: [1, 2]}", "s.yaml: lr: expected one of values, choice, uniform, log_uniform"),
    ("hidden: {uniform: [1, 2]}", "s.yaml: hidden: uniform needs a numeric option"),
    ("dropout: {uniform: [0.3, 0.1]}", "low must be below high"),
    ("seed: {values: [1, 2]}", "seed is not a hyper-parameter"),
])
def test_bad_space_is_one_line_before_anything_trains(tmp_path, monkeypatch, capsys, text, message):
    def no_training(*a, **k):
        raise AssertionError("trained despite a bad space")

    monkeypatch.setattr(sweep_runner, "fit_sweep", no_training)
    monkeypatch.setattr(tuning, "load_dataset", no_training)
    space = _space(tmp_path / "s.yaml", text)
    rc = main(["tune", "--model", "dnn", "--data", "synthetic", "--space", str(space),
               "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("dpn-jax: error: ") and err[0].count(str(space)) == 1
    import re
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_default_spaces_are_valid_for_every_model():
    """Each model's default space passes the option checks, and net_l2 is searched exactly for
    the models with dense kernels (the parameters net_l2 penalises)."""
    from dpn_jax.data.synthetic import make_synthetic

    ds = make_synthetic(rows=64, fields=3, vocab=5)
    example = engine.example_batch(ds.train)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    for model in available_models():
        parse_space(model, None)
        net = build_model(model, ds.schema)
        shapes = jax.eval_shape(lambda b, net=net: net.init(rngs, b, train=False), example)["params"]
        kernels = any(getattr(p[-1], "key", None) == "kernel"
                      for p, _ in jax.tree_util.tree_leaves_with_path(shapes))
        assert ("net_l2" in default_space(model)) == kernels == (model not in NO_DENSE_KERNELS), model
    assert families("dpn") == ["base", "dense", "deep", "dpn"]
    assert "rank" in default_space("din_dpo") and "embedding_init_std" in default_space("din")


# ----------------------------------------------------------------------------- end to end


def test_tune_cli_end_to_end(tiny_synthetic, tmp_path, monkeypatch, capsys):
    """A 2 x 2 grid on two tuning seeds, the best on two fresh seeds: every trial reported with
    its seeds, the selection is the best mean validation AUC, the final sweep trained exactly
    the selected configuration on the final seeds."""
    monkeypatch.setattr(tuning, "load_dataset", lambda *a, **k: tiny_synthetic)
    space = _space(tmp_path / "space.yaml", "lr: {values: [1e-3, 1.0e-2]}\ndropout: {values: [0, 0.2]}\n")
    out = tmp_path / "tune"
    argv = ["tune", "--model", "dnn", "--data", "synthetic", "--space", str(space), "--search", "grid",
            "--seeds", "1-2", "--final-seeds", "5,6", "--out", str(out), "--no-progress",
            *(x for s in TINY for x in ("--set", s))]
    monkeypatch.setattr("sys.argv", ["dpn-jax", *argv])
    assert main(argv) == 0
    report = json.loads((out / "tune.json").read_text())
    md = (out / "tune.md").read_text()
    assert (out / "tune.png").stat().st_size > 0
    labels = [f"lr={lr} dropout={d}" for lr in ("0.001", "0.01") for d in ("0.0", "0.2")]
    assert [t["configuration"] for t in report["trials"]] == labels
    for t in report["trials"]:
        assert t["seeds"] == [1, 2] and len(t["valid_auc"]) == len(t["test_auc"]) == 2
        assert t["valid_auc_mean"] == pytest.approx(np.mean(t["valid_auc"]))
        assert f"`{t['configuration']}`" in md
    means = [t["valid_auc_mean"] for t in report["trials"]]
    best = int(np.argmax(means))
    assert report["selected"]["trial"] == best + 1 and report["trials"][best]["selected"]
    assert sum(t["selected"] for t in report["trials"]) == 1
    final = report["final"]
    assert [r["seed"] for r in final["replicas"]] == [5, 6] and final["diverged"] == 0
    assert final["test_auc"]["mean"] == pytest.approx(np.mean([r["test_auc"] for r in final["replicas"]]))
    assert final["test_auc"]["std"] == pytest.approx(np.std([r["test_auc"] for r in final["replicas"]], ddof=1))
    trained = json.loads((out / "final" / "sweep.json").read_text())["replicas"]
    assert {(r["configuration"], r["seed"]) for r in trained} == {(labels[best], 5), (labels[best], 6)}
    assert trained[0]["config"]["model"]["dropout"] == report["selected"]["options"]["dropout"]
    assert "not used for selection" in md and "dpn-jax tune --model dnn" in md
    assert f"{final['test_auc']['mean']:.4f} ± {final['test_auc']['std']:.4f}" in md
    assert "# tune: dnn" in capsys.readouterr().out


class Killed(Exception):
    """Stands for the process dying at the end of an epoch, before its checkpoint is written."""


def test_killed_tune_resumes_to_the_uninterrupted_result(tiny_synthetic, tmp_path, monkeypatch):
    """Two programs (embedding_dim 4 and 6, each with two learning rates). Killed in the second
    program's last epoch, the same call reads the first program back, resumes the second from
    its epoch-1 checkpoint and ends with the uninterrupted tune's trials, selection and final
    results; it draws the same trials, and a changed call is refused in the same folder."""
    space = {"embedding_dim": {"values": [4, 6]}, "lr": {"log_uniform": [1e-3, 1e-2]}}
    kw = dict(space=space, trials=4, search_seed=3, seeds=[1, 2], final_seeds=[7], sets=TINY, **QUIET)
    whole = run_tune("dnn", tiny_synthetic, out=tmp_path / "whole", **kw)
    assert len({t["group"] for t in whole["trials"]}) == 2

    real, calls = sweep_runner.fit_sweep, []

    def dies_in_second_program(*a, **k):
        calls.append(k.get("checkpoint_dir"))
        if len(calls) == 2:
            def kill(epoch, *rest):
                if epoch == 2:
                    raise Killed
            k = {**k, "on_epoch": kill}
        return real(*a, **k)

    monkeypatch.setattr(sweep_runner, "fit_sweep", dies_in_second_program)
    with pytest.raises(Killed):
        run_tune("dnn", tiny_synthetic, out=tmp_path / "again", **kw)
    assert not (tmp_path / "again" / "tune.json").exists()
    monkeypatch.setattr(sweep_runner, "fit_sweep", real)
    logs: list[str] = []
    again = run_tune("dnn", tiny_synthetic, out=tmp_path / "again", **{**kw, "log": logs.append})
    assert any("group 1/2: done before" in line for line in logs)
    assert any("resumed after epoch 1" in line for line in logs)
    assert [t["configuration"] for t in again["trials"]] == [t["configuration"] for t in whole["trials"]]
    for a, b in zip(whole["trials"], again["trials"]):
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-6)
        assert a["best_epoch"] == b["best_epoch"]
    assert again["selected"] == whole["selected"]
    assert again["final"]["test_auc"]["mean"] == pytest.approx(whole["final"]["test_auc"]["mean"], abs=1e-6)

    # another search seed draws other trials: refused in this folder before anything trains
    with pytest.raises(ConfigError, match="holds another tune \\(it differs in search_seed, trials\\)"):
        run_tune("dnn", tiny_synthetic, out=tmp_path / "again", **{**kw, "search_seed": 4})
    # a sweep folder read back with other seeds than it trained is refused, not mixed in
    confs = tuning.trial_configurations("dnn", [t["options"] for t in whole["trials"]], TINY)
    with pytest.raises(ConfigError, match="holds another sweep's results"):
        run_sweep("dnn", tiny_synthetic, seeds=[1, 3], confs=confs, out=tmp_path / "whole" / "search", **QUIET)


def test_select_seeds_trains_the_top_trials_on_the_other_seeds(tiny_synthetic, tmp_path):
    """--select-seeds 1 --select-top 2: all three trials on seed 1, the two best of them (by
    seed 1's validation AUC) on seed 2; only those two can be selected."""
    space = {"lr": {"values": [1e-3, 3e-3, 3e-2]}}
    report = run_tune("dnn", tiny_synthetic, out=tmp_path, space=space, search="grid", seeds=[1, 2],
                      select_seeds=1, select_top=2, final_seeds=[9], sets=TINY, **QUIET)
    first = {r["configuration"]: r["valid_auc"] for r in
             json.loads((tmp_path / "stage1" / "sweep.json").read_text())["replicas"]}
    top = sorted(first, key=lambda c: -first[c])[:2]
    for t in report["trials"]:
        assert t["seeds"] == ([1, 2] if t["configuration"] in top else [1])
        assert t["complete"] == (t["configuration"] in top)
        assert t["valid_auc"][0] == pytest.approx(first[t["configuration"]])
    kept = [t for t in report["trials"] if t["complete"]]
    assert report["selected"]["configuration"] == max(kept, key=lambda t: t["valid_auc_mean"])["configuration"]
    assert not math.isnan(report["final"]["test_auc"]["mean"])
    with pytest.raises(ConfigError, match="--select-seeds 2: expected 1 to 1"):
        run_tune("dnn", tiny_synthetic, out=tmp_path / "x", space=space, search="grid", seeds=[1, 2],
                 select_seeds=2, sets=TINY, **QUIET)
