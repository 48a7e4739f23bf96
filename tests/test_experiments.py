"""The experiment scripts: seeds.py trains each run's seeds as one sweep, writes the table with
its command, and resumes from the per-seed files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


@pytest.fixture
def seeds_script(monkeypatch, tiny_synthetic):
    import seeds

    monkeypatch.setattr(seeds, "load_dataset", lambda *a, **k: tiny_synthetic)
    return seeds


def test_seeds_script_sweeps_writes_and_resumes(seeds_script, tmp_path, monkeypatch):
    out = tmp_path / "t"
    argv = ["--data", "synthetic", "--seeds", "1,2", "--out", str(out), "--protocol", "max_epochs=2",
            "--protocol", "batch_size=1024", "--run", "lr", "--run", "fm embedding_dim=4"]
    assert seeds_script.main(argv, command="python experiments/seeds.py ...") == 0
    table = (out.parent / "t.md").read_text()
    assert "Protocol for every run: `max_epochs=2 batch_size=1024`" in table
    assert "| `fm embedding_dim=4` |" in table and "| `lr` |" in table
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["fm_max_epochs=2_batch_size=1024_embedding_dim=4-1.json",
                    "fm_max_epochs=2_batch_size=1024_embedding_dim=4-2.json",
                    "lr_max_epochs=2_batch_size=1024-1.json", "lr_max_epochs=2_batch_size=1024-2.json"]
    first = json.loads((out / "runs" / runs[0]).read_text())
    assert first["sweep_replicas"] == 2 and first["config"]["model"]["embedding_dim"] == 4
    assert first["config"]["train"]["max_epochs"] == 2
    assert list((out / "checkpoints").iterdir()) == []  # removed once the seeds' results are written

    # A rerun trains nothing: every (run, seed) is on disk.
    monkeypatch.setattr(seeds_script, "train_seeds", lambda *a, **k: pytest.fail("retrained"))
    assert seeds_script.main(argv) == 0
    assert (out.parent / "t.json").exists()


def test_seeds_script_continues_a_killed_sweep(seeds_script, tmp_path, monkeypatch, capsys):
    """Killed in epoch 2 of 3, a rerun of the same command continues after epoch 1's checkpoint
    and writes what an uninterrupted run writes."""
    import dpn_jax.sweep_runner as sr

    argv = ["--data", "synthetic", "--seeds", "1,2", "--protocol", "max_epochs=3", "--protocol",
            "patience=5", "--protocol", "batch_size=1024", "--run", "lr"]
    seeds_script.main([*argv, "--out", str(tmp_path / "whole")])
    real = sr.fit_sweep

    def killed_in_epoch_2(*a, **k):
        def kill(epoch, *_):
            if epoch == 2:
                raise KeyboardInterrupt
        return real(*a, **k, on_epoch=kill)

    monkeypatch.setattr(sr, "fit_sweep", killed_in_epoch_2)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        seeds_script.main([*argv, "--out", str(out)])
    assert not list((out / "runs").iterdir()) and len(list((out / "checkpoints").iterdir())) == 1
    monkeypatch.setattr(sr, "fit_sweep", real)
    capsys.readouterr()
    seeds_script.main([*argv, "--out", str(out)])
    assert "resumed after epoch 1" in capsys.readouterr().err
    for seed in (1, 2):
        name = f"lr_max_epochs=3_patience=5_batch_size=1024-{seed}.json"
        a, b = (json.loads((d / "runs" / name).read_text()) for d in (tmp_path / "whole", out))
        assert (a["epochs"], a["best_epoch"]) == (b["epochs"], b["best_epoch"]) == (3, b["best_epoch"])
        assert a["test_auc"] == pytest.approx(b["test_auc"], abs=1e-6)
    assert list((out / "checkpoints").iterdir()) == []


def test_data_options_reach_the_loader_and_the_table(monkeypatch, tmp_path, tiny_synthetic):
    """table45 --max-users forwards a load_dataset option to seeds.py and writes a separate table;
    seeds.py passes it to the loader and states it in the header."""
    import seeds
    import table45

    seeds_main = seeds.main  # table45.seeds is this module
    forwarded, commands = [], []
    monkeypatch.setattr(table45.seeds, "main", lambda argv, command: commands.append(command)
                        or forwarded.append(argv) or 0)
    assert table45.main(["--data", "amazon_videogames", "--table", "5", "--models", "din",
                         "--max-users", "15000", "--seeds", "1"]) == 0
    assert commands == ["python experiments/table45.py --data amazon_videogames --max-users "
                        "15000 --seeds 1 --table 5"] * 2  # the header reproduces the whole table
    argv, report = forwarded  # train the asked model, then table every finished run
    assert argv[argv.index("--data-option") + 1] == "max_users=15000"
    assert argv[argv.index("--out") + 1].endswith("table5_amazon_videogames_users15000")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--run"] == ["din"]
    assert "--report-only" in report and report.count("--run") == len(table45.TABLES["5"])

    seen = {}
    monkeypatch.setattr(seeds, "load_dataset", lambda *a, **k: seen.update(k) or tiny_synthetic)
    out = tmp_path / "t"
    assert seeds_main(["--data", "synthetic", "--seeds", "1", "--out", str(out), "--protocol",
                       "max_epochs=1", "--run", "lr", "--data-option", "max_users=7",
                       "--synthetic", "rows=300,noise=0.5"], command="c") == 0
    assert seen == {"data_dir": None, "max_users": 7, "rows": 300, "noise": 0.5}
    assert type(seen["rows"]) is int and type(seen["noise"]) is float
    table = (out.parent / "t.md").read_text()
    assert "Data options: `max_users=7`" in table and "Synthetic generator: `rows=300,noise=0.5`" in table
    with pytest.raises(SystemExit):
        seeds_main(["--data", "x", "--out", str(out), "--run", "lr", "--data-option", "max_users=a"])
    with pytest.raises(SystemExit):
        seeds_main(["--data", "x", "--out", str(out), "--run", "lr", "--synthetic", "rows=1"])


def test_dien_probe_knockouts_match_independent_routes():
    """The probe's knock-outs equal the same model with parameters edited by hand: zero rows of
    the tower for the final interest (zeroed interest), a zero score layer (uniform softmax)."""
    import dien_probe
    from seq_fixtures import DIEN_SMALL, jbatch, make_split, random_variables, seq_schema

    from dpn_jax.models import build_model

    model = build_model("dien", seq_schema(), **DIEN_SMALL)
    split = {k: v[:32] for k, v in make_split(32, 3).items()}
    v = random_variables(model.init, jbatch(split, 8))
    v = {k: x for k, x in v.items() if k != "losses"}
    # sigmoid-sigmoid MLP then softmax(s/sqrt(d)): scores of N(0, 0.5) weights are near-uniform
    # too (the probe's finding); a steeper score layer makes the knock-outs visible
    v["params"]["attention_0"]["score"]["kernel"] = 50 * v["params"]["attention_0"]["score"]["kernel"]
    base, atts, spread = dien_probe.scores(model, v, split, None, batch_size=16)
    peak, entropy = dien_probe.attention_stats(atts)
    assert peak > 1.05 and entropy < 0.999  # random weights: far from uniform
    # the spread is that of the extractor's states, over each row's valid steps
    _, inter = model.apply(v, jbatch(split), capture_intermediates=True)
    states = np.asarray(inter["intermediates"]["extractor_0"]["__call__"][0][0])
    valid = np.concatenate([a[0] for a in atts]) > 0
    np.testing.assert_allclose(spread, dien_probe.state_spread(states, valid), rtol=1e-5)
    assert np.all(np.isfinite(spread)) and spread.min() > 0

    units = v["params"]["evolution_0"]["hidden_kernel"].shape[0]
    cut = jax.tree.map(lambda t: t, v)
    cut["params"]["mlp"]["dense_0"]["kernel"] = v["params"]["mlp"]["dense_0"]["kernel"].at[-units:].set(0)
    zeroed, _, _ = dien_probe.scores(model, v, split, "zero_interest", batch_size=16)
    np.testing.assert_allclose(zeroed, dien_probe.scores(model, cut, split, None, batch_size=16)[0],
                               atol=1e-5)
    flat = jax.tree.map(lambda t: t, v)
    flat["params"]["attention_0"]["score"] = jax.tree.map(jnp.zeros_like, v["params"]["attention_0"]["score"])
    uniform, _, _ = dien_probe.scores(model, v, split, "uniform_attention", batch_size=16)
    ref, ref_atts, _ = dien_probe.scores(model, flat, split, None, batch_size=16)
    np.testing.assert_allclose(uniform, ref, atol=1e-5)
    assert not np.allclose(uniform, base, atol=1e-3) and not np.allclose(zeroed, base, atol=1e-3)
    np.testing.assert_allclose(dien_probe.attention_stats(ref_atts), (1.0, 1.0), atol=1e-5)


def test_dien_probe_uniform_knockout_keeps_the_sigmoid_level():
    """With ``attention_norm=sigmoid`` the knock-out spreads each row's mean weight evenly (not
    1/n): on a zero score layer (every weight σ(0) = 1/2 already) it changes nothing, while on
    trained-looking scores it does."""
    import dien_probe
    from seq_fixtures import DIEN_SMALL, jbatch, make_split, random_variables, seq_schema

    from dpn_jax.models import build_model

    model = build_model("dien", seq_schema(), **DIEN_SMALL, attention_norm="sigmoid")
    split = {k: v[:32] for k, v in make_split(32, 3).items()}
    v = random_variables(model.init, jbatch(split, 8))
    v = {k: x for k, x in v.items() if k != "losses"}
    score = v["params"]["attention_0"]["score"]
    v["params"]["attention_0"]["score"] = {"kernel": 50 * score["kernel"], "bias": score["bias"]}
    base, _, _ = dien_probe.scores(model, v, split, None, batch_size=16)
    uniform, _, _ = dien_probe.scores(model, v, split, "uniform_attention", batch_size=16)
    assert not np.allclose(uniform, base, atol=1e-3)
    flat = jax.tree.map(lambda t: t, v)
    flat["params"]["attention_0"]["score"] = jax.tree.map(jnp.zeros_like, score)
    ref, ref_atts, _ = dien_probe.scores(model, flat, split, None, batch_size=16)
    assert all(np.isin(a, (0.0, 0.5)).all() for batch in ref_atts for a in batch)
    np.testing.assert_allclose(dien_probe.scores(model, flat, split, "uniform_attention",
                                                 batch_size=16)[0], ref, atol=1e-6)


def test_dien_probe_state_spread_is_the_direct_formula():
    import dien_probe

    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 5, 3))
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], bool)
    h[0, 3:] = 1e6  # padded steps never count
    got = dien_probe.state_spread(h, valid)
    want = []
    for row, m in zip(h, valid, strict=True):
        if m.sum() >= 2:
            steps = row[m]
            centre = steps.mean(0)
            want.append(np.sqrt(np.mean(np.sum((steps - centre) ** 2, -1))) / np.linalg.norm(centre))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    same = np.repeat(rng.normal(size=(2, 1, 3)), 4, axis=1)  # one state at every step: no spread
    np.testing.assert_allclose(dien_probe.state_spread(same, np.ones((2, 4), bool)), 0, atol=1e-12)


def test_dien_probe_attention_stats():
    import dien_probe

    uniform = np.array([[0.25, 0.25, 0.25, 0.25, 0.0]])
    one_hot = np.array([[0.0, 1.0, 0.0, 0.0, 0.0]])  # a single positive score: 1 valid step
    peaked = np.array([[0.7, 0.1, 0.1, 0.1, 0.0]])
    np.testing.assert_allclose(dien_probe.attention_stats([[uniform]]), (1.0, 1.0))
    ent = -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1)) / np.log(4)
    np.testing.assert_allclose(dien_probe.attention_stats([[peaked, one_hot]]), (2.8, ent))
    # unnormalised (sigmoid) rows are divided by their sum first
    np.testing.assert_allclose(dien_probe.attention_stats([[0.5 * uniform], [0.2 * peaked]]),
                               (1.9, (1.0 + ent) / 2))


def test_table1_names_the_models_it_still_lacks(tmp_path):
    import table1

    stem = tmp_path / "table1_x"
    (stem / "runs").mkdir(parents=True)
    for seed in (1, 2):
        (stem / "runs" / f"dnn_monitor=auc-{seed}.json").write_text(json.dumps({"model": "dnn", "seed": seed}))
    (stem / "runs" / "dpn_field_monitor=auc-1.json").write_text(json.dumps({"model": "dpn_field", "seed": 1}))
    stem.with_suffix(".md").write_text("# t\n\nVersions: {}\n\n| run | test AUC |\n|---|---|\n| `dnn` | 0.9 |\n")
    table1.note_missing(stem, ["dnn", "dpn", "dpn_field"], 2)
    text = stem.with_suffix(".md").read_text()
    assert "Not in the table yet" in text and "`dpn` (0), `dpn_field` (1)." in text and "`dnn`" not in text.split("|")[0]
    assert text.index("Not in the table yet") < text.index("| run |")


def test_train_bundle_trains_once_then_reuses_and_keeps_no_checkpoints(tmp_path):
    import seeds
    from csv_fixtures import write_tiny_csv_spec

    spec = write_tiny_csv_spec(tmp_path)
    sets = ["max_epochs=1", "batch_size=256"]
    bundle, trained = seeds.train_bundle("lr", str(spec), 3, sets, tmp_path / "work", None,
                                         str(tmp_path / "cache"))
    assert trained and bundle.name == "lr_max_epochs=1_batch_size=256-3"
    assert (bundle / "bundle.json").is_file() and not (bundle / "checkpoints").exists()
    again, trained = seeds.train_bundle("lr", str(spec), 3, sets, tmp_path / "work", None,
                                        str(tmp_path / "cache"))
    assert again == bundle and not trained
