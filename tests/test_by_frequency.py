"""AUC by the training frequency of a field (``dpn-jax evaluate --by-frequency``, paper Table 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli, write_user_csv

from dpn_jax.analysis.by_frequency import (
    Bucket,
    evaluate_by_frequency,
    parse_buckets,
    plot_auc_by_bucket,
    render_comparison,
    render_markdown,
    summarize_seeds,
    training_counts,
)
from dpn_jax.errors import ConfigError
from dpn_jax.metrics import auc, logloss, logloss_from_logits


def test_training_counts_match_a_python_loop() -> None:
    rng = np.random.default_rng(0)
    oov = 101
    train = rng.choice([oov, *range(102, 140)], size=500, p=None)
    ev = rng.integers(100, 150, size=300)  # ids unseen in train, and the OOV id
    ev[:5] = oov
    got = training_counts(train, ev, oov_id=oov)
    want = [0 if v == oov else sum(1 for t in train if t == v) for v in ev]
    assert got.tolist() == want and got.dtype == np.int64
    assert (training_counts(train, ev)[:5] == (train == oov).sum()).all()  # without oov_id: a plain id
    assert training_counts([], [3, 4]).tolist() == [0, 0]


def test_parse_buckets() -> None:
    assert [b.label for b in parse_buckets(None)] == ["0", "1-5", "6-20", "21-50", "51+"]
    assert parse_buckets(" 21+, 1-5 ,6-20") == (Bucket(1, 5), Bucket(6, 20), Bucket(21, None))
    assert parse_buckets("0,1,2-2") == (Bucket(0, 0), Bucket(1, 1), Bucket(2, 2))
    assert parse_buckets(parse_buckets("0,1+")) == (Bucket(0, 0), Bucket(1, None))


@pytest.mark.parametrize("spec, fragments", [
    ("1-5,4-20", ["'1-5'", "'4-20'", "overlap", "4-5"]),
    ("3+,10+", ["'3+'", "'10+'", "overlap", "10+"]),
    ("0,1-5,6+,10-12", ["'6+'", "'10-12'", "overlap"]),
    ("1-5,8-20", ["gap", "'1-5'", "'8-20'", "6-7"]),
    ("1-5,x", ["'x'"]),
    ("1-5,6-2x", ["'6-2x'"]),
    ("1-5,-3", ["'-3'"]),
    ("1-5,+", ["'+'"]),
    ("5-1", ["'5-1'", "below"]),
    ("1-5,,6+", ["bucket 2 is empty"]),
    ("  ", ["empty"]),
])  # fmt: skip
def test_parse_buckets_errors_name_the_problem(spec: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_buckets(spec)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)


def _fake(n: int = 2000, seed: int = 1):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 80, n)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    logits = rng.normal(size=n) + labels * (counts > 10)  # informative only for frequent values
    ids = rng.integers(0, 60, n)
    return logits, labels, counts, ids


def test_bucket_metrics_equal_the_project_metrics_on_the_subset() -> None:
    logits, labels, counts, ids = _fake()
    buckets = parse_buckets("0-10,11-40,41+")
    rows = evaluate_by_frequency(logits, labels, counts, buckets, ids=ids)
    assert [r["bucket"] for r in rows] == ["0-10", "11-40", "41+", "all"]
    for b, r in zip(buckets, rows):
        m = b.mask(counts)
        assert r["rows"] == m.sum() and r["distinct"] == len(set(ids[m].tolist()))
        assert r["auc"] == auc(labels[m], logits[m])
        assert r["logloss"] == logloss_from_logits(labels[m], logits[m])
        assert r["positive_rate"] == pytest.approx(labels[m].mean())
    assert rows[-1]["auc"] == auc(labels, logits) and rows[-1]["rows"] == len(labels)
    assert rows[0]["auc"] < rows[2]["auc"]  # the planted signal
    probs = 1 / (1 + np.exp(-logits))
    p_rows = evaluate_by_frequency(probs, labels, counts, buckets, logits=False)
    assert p_rows[1]["logloss"] == logloss(labels[buckets[1].mask(counts)], probs[buckets[1].mask(counts)])
    assert p_rows[1]["distinct"] is None


def test_empty_single_class_and_unbucketed_rows_never_crash(tmp_path: Path) -> None:
    counts = np.array([1, 1, 1, 7, 7, 7, 7, 30, 30])
    labels = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0], np.float32)
    logits = np.linspace(-1, 1, 9)
    ids = np.array([5, 5, 1, 6, 6, 7, 7, 8, 8])
    rows = evaluate_by_frequency(logits, labels, counts, "0,1-5,6-20", ids=ids, oov_id=1)
    by = {r["bucket"]: r for r in rows}
    assert list(by) == ["0", "1-5", "6-20", "not bucketed", "all"]
    assert by["0"]["rows"] == 0 and by["0"]["auc"] is None and by["0"]["note"] == "no rows"
    assert by["1-5"]["auc"] is None and "only positive" in by["1-5"]["note"]
    assert by["1-5"]["logloss"] is not None and by["1-5"]["oov_rows"] == 1
    assert by["not bucketed"]["rows"] == 2 and "only negative" in by["not bucketed"]["note"]
    assert by["6-20"]["auc"] == auc(labels[3:7], logits[3:7])
    table = render_markdown(rows, "user")
    assert "| 0 | 0 | 0 | - | - | - | no rows |" in table and "(OOV: 1 rows)" in table
    json.dumps(rows, allow_nan=False)  # strict JSON: missing metrics are null, not NaN
    assert plot_auc_by_bucket({"m": rows}, tmp_path / "a.png") == tmp_path / "a.png"
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_seeds_are_summarised_side_by_side(tmp_path: Path, monkeypatch) -> None:
    logits, labels, counts, ids = _fake()
    runs = {m: [evaluate_by_frequency(logits + k * np.random.default_rng(s).normal(size=len(labels)),
                                      labels, counts, "0-10,11+", ids=ids) for s in range(3)]
            for m, k in (("dnn", 1.0), ("dpn", 0.5))}
    summ = summarize_seeds(runs["dnn"])
    aucs = [r[1]["auc"] for r in runs["dnn"]]
    assert summ[1]["aucs"] == aucs and summ[1]["auc_mean"] == pytest.approx(np.mean(aucs))
    assert summ[1]["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    assert summarize_seeds(runs["dnn"][0])[1]["auc_std"] is None  # one run: no spread
    table = render_comparison(runs, "user")
    assert "`dnn` AUC | `dpn` AUC | Δ AUC (`dpn` − `dnn`)" in table and " ± " in table
    assert plot_auc_by_bucket(runs, tmp_path / "b.png").is_file()
    notes = []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the dev extra were missing
    assert plot_auc_by_bucket(runs, tmp_path / "c.png", log=notes.append) is None
    assert len(notes) == 1 and "matplotlib" in notes[0] and not (tmp_path / "c.png").exists()


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def synthetic_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bf") / "dnn"
    from dpn_jax.cli import main

    assert main(["train", "--model", "dnn", "--data", "synthetic", "--out", str(out), "--no-progress",
                 "--set", "hidden=16", "--set", "max_epochs=1", "--set", "batch_size=2048"]) == 0
    return out


def test_cli_evaluate_by_frequency_end_to_end(synthetic_bundle: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "eval"
    code, stdout, err = run_cli(["evaluate", str(synthetic_bundle), "--by-frequency", "f3",
                                 "--buckets", "0,1-2000,2001-6000,6001+", "--out", str(out)], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"by_frequency.md", "by_frequency.json", "by_frequency.png"}
    report = json.loads((out / "by_frequency.json").read_text())
    recorded = json.loads((synthetic_bundle / "results.json").read_text())["test_auc"]
    assert report["rows"][-1]["auc"] == recorded  # scored exactly as training evaluated
    assert [r["bucket"] for r in report["rows"]] == ["0", "1-2000", "2001-6000", "6001+", "all"]
    assert sum(r["rows"] for r in report["rows"][:-1]) == report["rows"][-1]["rows"] == 10_000
    assert report["rows"][0]["rows"] == 0 and report["rows"][0]["auc"] is None  # synthetic: no unseen values
    md = (out / "by_frequency.md").read_text()
    assert stdout.strip() == md.strip() and "train count of `f3`" in md and "| **all** | 10,000 |" in md
    code, stdout, err = run_cli(["evaluate", str(synthetic_bundle), "--by-frequency", "f0",
                                 "--split", "valid"], capsys)
    assert code == 0 and "(valid split)" in stdout and "| 51+ |" in stdout


def _error(args: list[str], capsys, *fragments: str) -> None:
    code, out, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dpn-jax: error:"), (code, err)
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_cli_errors_are_one_line(synthetic_bundle: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    b = str(synthetic_bundle)
    _error(["evaluate", b, "--by-frequency", "user"], capsys, "'user'", "unknown field", "f0, f1", "f7")
    _error(["evaluate", b, "--by-frequency", "f0", "--buckets", "0,1-5,7+"], capsys, "gap", "6")
    _error(["evaluate", b, "--by-frequency", "f0", "--buckets", "0,1-5,six+"], capsys, "'six+'")
    _error(["evaluate", str(tmp_path / "nope"), "--by-frequency", "f0"], capsys, "nope", "not found")
    spec = write_user_csv(tmp_path, rows=400)
    _error(["evaluate", b, "--by-frequency", "f0", "--data", str(spec)], capsys,
           "not the bundle's", "user_id", "'synthetic'")

    user_bundle = tmp_path / "lr"
    code, _, err = run_cli(["train", "--model", "lr", "--data", str(spec), "--out", str(user_bundle),
                            "--set", "max_epochs=1", "--no-progress"], capsys)
    assert code == 0, err
    for field, kind in (("genres", "a sequence field"), ("price", "a numeric field"),
                        ("age", "a bucketised numeric field")):
        _error(["evaluate", str(user_bundle), "--by-frequency", field], capsys, f"'{field}'", kind, "user_id")
    code, out, err = run_cli(["evaluate", str(user_bundle), "--by-frequency", "user_id",
                              "--buckets", "0,1-10,11+"], capsys)
    assert code == 0, err
    assert "(OOV:" in out  # min_count 2: rare users are OOV, counted 0
