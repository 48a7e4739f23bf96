"""Serving: shared helpers (a small raw CSV dataset, one trained bundle per session) and the
encoding checks that need no training."""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

import dpn_jax
from dpn_jax.data import load_dataset, load_spec
from dpn_jax.data.encode import FittedEncoders, columns_needed
from dpn_jax.serving.exported import RawEncoder
from dpn_jax.train.loop import predict_logits
from dpn_jax.train.state import make_predict

SPEC = """\
name: serve_data
format: csv
train: train.csv
test: test.csv
split: {valid: 0.2, seed: 1}
label: clicked
fields:
  - {name: user_id, type: categorical, min_count: 2}
  - {name: age, type: numeric, buckets: 4}
  - {name: price, type: numeric}
  - {name: genres, type: sequence, sep: "|", max_len: 3}
  - {name: item_id, type: categorical}
  - {name: hist, type: sequence, sep: "^", max_len: 4, share_vocab: item_id}
"""
HEADER = ["id", "clicked", "user_id", "age", "price", "genres", "item_id", "hist"]


def write_serving_data(d: Path, n_train: int = 600, n_test: int = 150, seed: int = 0) -> Path:
    """train.csv / test.csv / spec.yaml. The test file has what serving meets: unseen users,
    genres and items, empty (missing) numbers and categories, histories longer than max_len."""
    rng = np.random.default_rng(seed)

    def rows(n: int, test: bool) -> list[list[str]]:
        out = []
        for i in range(n):
            u = f"u{rng.integers(0, 30)}"
            age, price = f"{rng.uniform(18, 70):.1f}", f"{rng.lognormal(2, 1):.3f}"
            genres = "|".join(rng.choice(list("abcdef"), rng.integers(0, 5), replace=False))
            item = f"i{rng.integers(0, 25)}"
            hist = "^".join(f"i{k}" for k in rng.integers(0, 25, rng.integers(0, 7)))
            if test and i % 7 == 0:
                u, genres, hist = f"new{i}", genres + "|zz|yy", hist + "^i999"
            if test and i % 5 == 1:
                age = ""
            if test and i % 6 == 2:
                price = ""
            if test and i % 9 == 3:
                u = ""
            logit = (int(u[1:]) % 3 - 1 if u.startswith("u") else 0) + 1.5 * ("a" in genres) - (
                "b" in genres) + (float(age or 40) > 40)
            y = int(rng.random() < 1 / (1 + np.exp(-logit)))
            out.append([f"r{i}", str(y), u, age, price, genres, item, hist])
        return out

    for name, n, test in (("train.csv", n_train, False), ("test.csv", n_test, True)):
        with open(d / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(HEADER)
            w.writerows(rows(n, test))
    (d / "spec.yaml").write_text(textwrap.dedent(SPEC))
    return d / "spec.yaml"


def read_raw(path: Path) -> dict[str, list[str]]:
    """A csv as a dict of text columns, cells exactly as written ("" = missing)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: [r[k] for r in rows] for k in rows[0]}


_BUNDLES: dict[str, Path] = {}


def trained_bundle(tmp_path_factory, model: str = "dnn") -> Path:
    """Train once per session through the public API (``dpn_jax.train_model``) into a bundle."""
    if model not in _BUNDLES:
        root = tmp_path_factory.mktemp(f"serving-{model}")
        spec = write_serving_data(root)
        sets = ["batch_size=128", "max_epochs=2", "eval_batch_size=64"]
        sets += ["hidden=16,8"] if model in ("dnn", "dpn", "dyjoint") else []
        # A module-scoped fixture runs before conftest's per-test fast-compile switch: set it here.
        old = jax.config.values["jax_disable_most_optimizations"]
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            dpn_jax.train_model(model, str(spec), sets=sets, out=root / "bundle", progress=False,
                                log=lambda s: None)
        finally:
            jax.config.update("jax_disable_most_optimizations", old)
        _BUNDLES[model] = root / "bundle"
    return _BUNDLES[model]


def eval_scores(predictor, spec: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) as the fit loop's evaluation computes them on the encoded test split."""
    ds = load_dataset(spec)
    v = predictor.variables
    logits = predict_logits(jax.jit(make_predict(predictor.model)), v["params"], v.get("batch_stats", {}),
                            ds.test, 64)
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), np.asarray(ds.test["label"])


def test_encoder_columns_match_the_spec(tmp_path: Path) -> None:
    spec = write_serving_data(tmp_path, n_train=200, n_test=40)
    ds = load_dataset(spec)
    enc = FittedEncoders.from_json(ds.meta["encoders"])
    assert enc.columns() == columns_needed(load_spec(spec))
    assert enc.columns() == {"user_id": "str", "age": "float", "price": "float", "genres": "str",
                             "item_id": "str", "hist": "str"}


def test_standalone_encoder_matches_training_encoding(tmp_path: Path) -> None:
    """The numpy-only encoder of exported models gives the arrays training gave the test split,
    and the training encoder gives them for the same raw rows (unseen, missing, too long)."""
    spec = write_serving_data(tmp_path, n_train=300, n_test=80)
    ds = load_dataset(spec)
    raw = read_raw(tmp_path / "test.csv")
    enc = FittedEncoders.from_json(ds.meta["encoders"])
    ours = RawEncoder(ds.meta["encoders"]).encode(raw)
    theirs = enc.transform(raw)
    for key in ("cat", "num", "seq/genres", "seq/hist"):
        np.testing.assert_array_equal(ours[key], ds.test[key], err_msg=key)
        np.testing.assert_array_equal(theirs[key], ds.test[key], err_msg=key)


def test_top_level_api_is_lazy_and_train_is_the_package() -> None:
    import importlib

    import dpn_jax.train.loop  # noqa: F401  (the subpackage keeps working)
    from dpn_jax.runner import run_train

    assert dpn_jax.train_model is run_train
    assert dpn_jax.train is sys.modules["dpn_jax.train"] and not callable(dpn_jax.train)
    assert type(dpn_jax.train) is type(sys) and type(dpn_jax) is type(sys)  # plain modules
    assert dpn_jax.train.loop.fit is importlib.import_module("dpn_jax.train.loop").fit
    from dpn_jax.serving.predictor import load

    assert dpn_jax.load is load
    from dpn_jax.tuning import run_tune

    assert dpn_jax.tune is run_tune
