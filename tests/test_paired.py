"""Seed-paired differences and their bootstrap interval, against direct numpy formulas."""

import numpy as np
import pytest

from dpn_jax.analysis.paired import paired_difference


def test_differences_mean_std_and_wins_are_the_direct_formulas():
    a = {1: 0.90, 2: 0.92, 3: 0.91, 4: 0.95}
    b = {1: 0.89, 2: 0.93, 3: 0.90, 5: 0.50}  # seed 5 unpaired, 4 unpaired
    p = paired_difference(a, b)
    assert p.seeds == (1, 2, 3)
    np.testing.assert_allclose(p.diffs, [0.01, -0.01, 0.01], atol=1e-12)
    np.testing.assert_allclose(p.mean, np.mean([0.01, -0.01, 0.01]))
    np.testing.assert_allclose(p.std, np.std([0.01, -0.01, 0.01], ddof=1))
    assert p.wins == 2
    assert p.low <= p.mean <= p.high


def test_interval_is_the_percentile_bootstrap_of_the_mean():
    rng = np.random.default_rng(1)
    a = {s: float(x) for s, x in enumerate(rng.normal(0.8, 0.01, 7))}
    b = {s: float(x) for s, x in enumerate(rng.normal(0.8, 0.01, 7))}
    p = paired_difference(a, b, resamples=2000, seed=3)
    d = np.array([a[s] - b[s] for s in range(7)])
    idx = np.random.default_rng(3).integers(0, 7, size=(2000, 7))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    np.testing.assert_allclose([p.low, p.high], [lo, hi])


def test_verdict_needs_the_interval_to_exclude_zero():
    base = {s: 0.9 for s in range(5)}
    assert paired_difference({s: 0.91 + 0.001 * s for s in range(5)}, base).verdict == "wins"
    assert paired_difference({s: 0.89 - 0.001 * s for s in range(5)}, base).verdict == "loses"
    noisy = {0: 0.91, 1: 0.89, 2: 0.905, 3: 0.895, 4: 0.9}
    assert paired_difference(noisy, base).verdict == "ties"


def test_no_common_seed_and_bad_level_are_refused():
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({1: 0.5}, {2: 0.5})
    with pytest.raises(ValueError, match="level"):
        paired_difference({1: 0.5}, {1: 0.5}, level=1.5)


def test_paired_script_reads_a_results_folder_and_writes_the_table(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import paired

    runs = tmp_path / "t" / "runs"
    runs.mkdir(parents=True)
    for model, aucs in {"dpn": [0.93, 0.94, 0.95], "dnn": [0.92, 0.93, 0.94]}.items():
        for seed, auc in zip((1, 2, 3), aucs):
            (runs / f"{model}_monitor=auc-{seed}.json").write_text(
                json.dumps({"model": model, "seed": seed, "status": "done", "test_auc": auc}))
    assert paired.main(["--runs", str(tmp_path / "t"), "--pair", "dpn:dnn_monitor=auc",
                        "--out", str(tmp_path / "p")]) == 0
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    np.testing.assert_allclose(row["mean"], 0.01)
    assert row["wins"] == 3 and row["verdict"] == "wins"
    assert "| `dpn` | `dnn_monitor=auc` | 3 | +0.0100" in (tmp_path / "p.md").read_text()
    (runs / "dpn_lr=3e-3_hidden=128_64-1.json").write_text(
        json.dumps({"model": "dpn", "seed": 1, "status": "done", "test_auc": 0.97}))
    assert paired.main(["--runs", str(tmp_path / "t"), "--pair", "dpn hidden=128,64:dnn",
                        "--out", str(tmp_path / "p")]) == 0
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    assert row["seeds"] == [1] and abs(row["mean"] - 0.05) < 1e-12
    with pytest.raises(SystemExit, match="no single run named 'dpn'"):  # two dpn runs now
        paired.main(["--runs", str(tmp_path / "t"), "--pair", "dpn:dnn", "--out", str(tmp_path / "q")])
    with pytest.raises(SystemExit, match="no single run named 'fm'"):
        paired.main(["--runs", str(tmp_path / "t"), "--pair", "fm:dnn", "--out", str(tmp_path / "q")])


def _experiments():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def _fake_tune(folder, model, final, configuration, valid=0.9):
    import json

    folder.mkdir(parents=True)
    (folder / "tune.json").write_text(json.dumps({
        "model": model, "data": "toy", "command": f"dpn-jax tune --model {model}",
        "selected": {"configuration": configuration, "valid_auc_mean": valid},
        "final": {"replicas": [{"seed": s, "test_auc": a} for s, a in final.items()]},
        "trials": [{"seeds": [1]}, {"seeds": [1, 2, 3]}]}))


def test_tuned_table_pairs_the_final_seeds_and_finds_the_best_baseline(tmp_path):
    import json

    _experiments()
    import tuned_table

    _fake_tune(tmp_path / "a", "dnn", {7: 0.90, 8: 0.91, 9: 0.92}, "dropout=0.1")
    _fake_tune(tmp_path / "b", "dcn", {7: 0.91, 8: 0.92, 9: 0.93}, "")
    _fake_tune(tmp_path / "c", "dpn", {7: 0.905, 8: 0.915, 9: 0.925}, "rank=2")
    untuned = tmp_path / "t1.json"
    untuned.write_text(json.dumps({"rows": [{"run": "dnn", "test_auc": [0.88, 0.89]}]}))
    tuned_table.main(["--tune", str(tmp_path / "a"), "--tune", str(tmp_path / "b"),
                      "--tune", str(tmp_path / "c"), "--untuned", str(untuned),
                      "--pair", "dpn:dnn", "--pair", "dpn:best-baseline", "--pair", "dpn:dcn",
                      "--out", str(tmp_path / "o")])
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["best_baseline"] == "dcn"  # dpn* models are not baselines
    (vs_dnn, vs_best) = out["pairs"]  # dpn:dcn is dpn:best-baseline again, listed once
    np.testing.assert_allclose([vs_dnn["mean"], vs_best["mean"]], [0.005, -0.005])
    assert (vs_dnn["verdict"], vs_best["verdict"], vs_best["b"]) == ("wins", "loses", "dcn")
    md = (tmp_path / "o.md").read_text()
    assert "| `dnn` | `dropout=0.1` | 2 (4) | 0.9000 | 0.9100 ± 0.0100 | 0.8850 ± 0.0071 | +0.0250 |" in md
    assert "| `dcn` | `defaults` |" in md
    _fake_tune(tmp_path / "d", "fm", {1: 0.9, 2: 0.9}, "")
    with pytest.raises(SystemExit, match="final seeds differ"):
        tuned_table.main(["--tune", str(tmp_path / "a"), "--tune", str(tmp_path / "d"),
                          "--out", str(tmp_path / "o")])


def test_knockout_table_summarises_reports_over_seeds():
    _experiments()
    import knockout_table

    def report(seed, trained, knocked, share):
        return {"seed": seed, "with": {"auc": trained}, "without": {"auc": knocked},
                "mean_abs_delta_logit": 0.5, "logit_std": 5.0,
                "layers": [{"layer": "dpo_0", "kind": "feature", "share": share}]}

    row = knockout_table.summarise("dpn rank=2", [report(1, 0.90, 0.85, 0.2), report(2, 0.92, 0.86, 0.4)])
    np.testing.assert_allclose(row["delta_auc"], [-0.05, -0.06])
    np.testing.assert_allclose(row["shift_over_std"], [0.1, 0.1])
    assert row["dynamic_share"] == {"dpo_0 (feature)": [0.2, 0.4]}
    md = knockout_table.render([row], "cmd", "toy")
    assert "| `dpn rank=2` | 2 | 0.9100 ± 0.0141 | 0.8550 ± 0.0071 | -0.05500 ± 0.00707 | 10.0 ± 0.0% |" in md
    assert "`dpo_0 (feature)` 0.300 ± 0.141" in md
