"""The ``dpn-jax`` command: end to end on a user's CSV spec, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import serialization

from dpn_jax.cli import RESULT_KEYS, main


def write_user_csv(dirpath: Path, rows: int = 3000, seed: int = 0) -> Path:
    """A CSV with categorical, numeric (bucketised and dense) and multi-valued columns, a label
    that depends on them, and a spec describing it."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 50, rows)
    age = rng.uniform(18, 70, rows)
    price = rng.lognormal(2, 1, rows)
    genres = ["|".join(rng.choice(list("abcdef"), rng.integers(0, 4), replace=False)) for _ in range(rows)]
    logit = (user % 3 - 1) * 1.5 + (age > 40) * 1.0 - 0.3 * np.log(price) + np.array(
        [1.5 * ("a" in g) - 1.0 * ("b" in g) for g in genres])
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    lines = ["clicked,user_id,age,price,genres"]
    lines += [f"{y},u{u},{a:.1f},{p:.3f},{g}" for y, u, a, p, g in zip(label, user, age, price, genres)]
    (dirpath / "data.csv").write_text("\n".join(lines) + "\n")
    spec = dirpath / "spec.yaml"
    spec.write_text(textwrap.dedent("""\
        name: my_data
        format: csv
        train: data.csv
        split: {valid: 0.2, test: 0.2, seed: 1}
        label: clicked
        fields:
          - {name: user_id, type: categorical, min_count: 2}
          - {name: age, type: numeric, buckets: 5}
          - {name: price, type: numeric}
          - {name: genres, type: sequence, sep: "|", max_len: 3}
        """))
    return spec


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("model", ["lr", "fm", "dnn"])
def test_train_user_csv_end_to_end(tmp_path: Path, capsys, model: str) -> None:
    spec = write_user_csv(tmp_path)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--model", model, "--data", str(spec), "--out", str(out_dir),
                              "--set", "batch_size=256", "--set", "max_epochs=8", "--no-progress"]
                             + (["--set", "hidden=32,16"] if model == "dnn" else []), capsys)
    assert code == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert set(RESULT_KEYS) <= set(final)
    saved = json.loads((out_dir / "results.json").read_text())
    assert {k: saved[k] for k in RESULT_KEYS} == final
    assert final["test_auc"] > 0.7, final  # the planted signal is strong
    assert 1 <= final["best_epoch"] <= final["epochs"] <= 8
    restored = serialization.msgpack_restore((out_dir / "params.msgpack").read_bytes())
    n = sum(np.asarray(x).size for x in __import__("jax").tree_util.tree_leaves(restored["params"]))
    assert n == final["num_params"]
    assert "valid auc" in err


def test_models_lists_registry(capsys) -> None:
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0 and "dnn" in out and "hidden=(400, 400, 400)" in out


def _expect_error(args: list[str], capsys, *fragments: str) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpn-jax: error:"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_errors_are_one_clear_line(tmp_path: Path, capsys) -> None:
    spec = write_user_csv(tmp_path, rows=200)
    base = ["train", "--model", "lr", "--no-progress"]
    _expect_error(base + ["--data", str(tmp_path / "nope.yaml")], capsys, "nope.yaml")
    _expect_error(["train", "--model", "dnm", "--data", str(spec)], capsys, "unknown model", "dnn")
    _expect_error(base + ["--data", str(spec), "--set", "lrate=1"], capsys, "lrate", "lr")
    _expect_error(base + ["--data", "kdd2012"], capsys, "unknown dataset", "frappe", ".yaml")

    typo = tmp_path / "typo.yaml"
    typo.write_text(spec.read_text().replace("label:", "lable:"))
    _expect_error(base + ["--data", str(typo)], capsys, "lable", "label")

    missing_col = tmp_path / "missing.yaml"
    missing_col.write_text(spec.read_text().replace("name: price", "name: cost"))
    _expect_error(base + ["--data", str(missing_col)], capsys, "cost", "data.csv")

    bad = tmp_path / "bad"
    bad.mkdir()
    text = (tmp_path / "data.csv").read_text().splitlines()
    row = text[5].split(",")
    (bad / "data.csv").write_text("\n".join(text[:5] + [",".join(["2"] + row[1:])] + text[6:]) + "\n")
    (bad / "spec.yaml").write_text(spec.read_text())
    _expect_error(base + ["--data", str(bad / "spec.yaml")], capsys, "clicked", "2")

    (bad / "data.csv").write_text("\n".join(text[:5] + [",".join(row[:2] + ["old"] + row[3:])] + text[6:]) + "\n")
    _expect_error(base + ["--data", str(bad / "spec.yaml")], capsys, "age", "old")

    (bad / "data.csv").write_text(text[0] + "\n")
    _expect_error(base + ["--data", str(bad / "spec.yaml")], capsys, "data.csv")


def test_console_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dpn_jax.cli", "train", "--model", "nope",
                           "--data", "synthetic"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model" in proc.stderr and "Traceback" not in proc.stderr
