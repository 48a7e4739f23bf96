"""The accuracy peer: FuxiCTR's DNN on our encoded arrays (dpn_jax.benchmark.peer_accuracy)."""

from __future__ import annotations

import numpy as np
import pytest

from dpn_jax.benchmark import peer_accuracy, peer_fuxictr
from dpn_jax.data.schema import Dataset, FieldInfo, Schema
from dpn_jax.data.synthetic import make_synthetic
from dpn_jax.errors import ConfigError


def _seq_schema() -> Schema:
    return Schema(fields=(
        FieldInfo("user", "cat", column=0, offset=0, vocab_size=5),
        FieldInfo("item", "cat", column=1, offset=5, vocab_size=7),
        FieldInfo("price", "num", column=0),
        FieldInfo("hist", "seq", offset=5, vocab_size=7, max_len=3, share_vocab="item"),
    ), table_size=12)


def test_feature_specs_follow_the_schema_blocks():
    specs = peer_accuracy.feature_specs(_seq_schema())
    assert list(specs) == ["user", "item", "price", "hist"]
    assert specs["user"] == {"type": "categorical", "vocab_size": 5, "padding_idx": 0, "source": ""}
    assert specs["item"]["vocab_size"] == 7 and specs["price"]["type"] == "numeric"
    assert specs["hist"]["share_embedding"] == "item" and specs["hist"]["max_len"] == 3
    assert specs["hist"]["feature_encoder"] == "layers.MaskedAveragePooling()"


def test_local_columns_subtract_each_fields_offset():
    schema = _seq_schema()
    split = {"cat": np.array([[1, 5], [4, 11]], np.int32), "num": np.array([[0.5], [-1.0]], np.float32),
             "seq/hist": np.array([[7, 8, 5], [5, 5, 5]], np.int32), "label": np.array([1, 0], np.float32)}
    cols = peer_accuracy.local_columns(split, schema)
    np.testing.assert_array_equal(cols["user"], [1, 4])
    np.testing.assert_array_equal(cols["item"], [0, 6])
    np.testing.assert_array_equal(cols["hist"], [[2, 3, 0], [0, 0, 0]])  # local 0 = padding
    np.testing.assert_array_equal(cols["price"], [0.5, -1.0])
    np.testing.assert_array_equal(cols["label"], [1, 0])
    peer_accuracy.check_ids(split, schema, "train")
    split["cat"][1, 1] = 12  # one past item's block
    with pytest.raises(ConfigError, match="train split, field 'item'"):
        peer_accuracy.check_ids(split, schema, "train")


@pytest.mark.slow
def test_fuxictr_dnn_learns_a_planted_dataset_and_cuts_the_lr_on_plateaus():
    if peer_fuxictr.available():
        pytest.skip(f"the optional peer is not installed ({peer_fuxictr.available()})")
    data = make_synthetic(seed=3, rows=6000, fields=4, vocab=6, additive=3.0, pairwise=0.0,
                          contextual=0.0)
    data = Dataset(data.name, data.schema, data.train, data.valid, data.test)
    r = peer_accuracy.train_fuxictr_dnn(data, 2021, threads=1, batch_size=256, max_epochs=4, lr=1e-2,
                                        hidden=(32, 32), patience=4)
    assert r["test_auc"] > 0.65, r
    hist = r["history"]
    assert [h["epoch"] for h in hist] == list(range(1, len(hist) + 1))
    for prev, h in zip(hist, hist[1:]):  # FuxiCTR cuts the lr x0.1 after each non-improving epoch
        expected = prev["lr"] if h["improved"] else max(prev["lr"] * 0.1, 1e-6)
        assert h["lr"] == pytest.approx(expected)
    assert r["best_epoch"] == max(h["epoch"] for h in hist if h["improved"])


def test_accuracy_table_pairs_the_seeds():
    from dpn_jax.benchmark.accuracy import format_accuracy, peer_options

    assert peer_options(["patience=3", "hidden=32,16", "lr=0.01"]) == {
        "patience": 3, "hidden": (32, 16), "lr": 0.01}
    with pytest.raises(ConfigError, match="--peer-set 'dropout_rate=0.1'"):
        peer_options(["dropout_rate=0.1"])
    rows = [{"seed": s, "dpn_jax": o, "fuxictr": p, "diff": o - p, "dpn_jax_best_epoch": 3,
             "fuxictr_best_epoch": 4, "dpn_jax_logloss": 0.3, "fuxictr_logloss": 0.31}
            for s, o, p in ((1, 0.90, 0.89), (2, 0.88, 0.89), (3, 0.91, 0.90))]
    text = format_accuracy({"data": "d", "sets": [], "peer_sets": [], "peer": "fuxictr x", "rows": rows}, "cmd")
    assert "| 2 | 0.8800 | 0.8900 | -0.0100 | 3 / 4 |" in text
    assert "| mean ± std | 0.8967 ± 0.0153 | 0.8933 ± 0.0058 | +0.0033" not in text  # sign shown once
    assert "0.0033 ± 0.0115" in text and "dpn-jax ahead on 2 of 3 seeds" in text


@pytest.mark.slow
def test_bench_accuracy_cli_trains_both_on_one_spec(tmp_path, capsys):
    if peer_fuxictr.available():
        pytest.skip(f"the optional peer is not installed ({peer_fuxictr.available()})")
    from test_cli import run_cli, write_user_csv

    spec = write_user_csv(tmp_path, rows=1500)
    out = tmp_path / "parity"
    code, text, err = run_cli(
        ["bench", "--peer", "fuxictr", "--accuracy", "--data", str(spec), "--seeds", "2021-2022",
         "--set", "max_epochs=2", "--set", "hidden=16", "--set", "batch_size=256",
         "--peer-set", "max_epochs=2", "--peer-set", "hidden=16", "--peer-set", "batch_size=256",
         "--out", str(out)], capsys)
    assert code == 0, err
    record = __import__("json").loads(out.with_suffix(".json").read_text())
    assert [r["seed"] for r in record["rows"]] == [2021, 2022]
    for r in record["rows"]:
        assert 0.5 < r["dpn_jax"] <= 1 and 0.5 < r["fuxictr"] <= 1
        assert r["diff"] == pytest.approx(r["dpn_jax"] - r["fuxictr"])
        assert r["fuxictr_best_epoch"] <= 2 and r["dpn_jax_best_epoch"] <= 2
    assert record["peer_options"]["hidden"] == [16] and "FuxiCTR test AUC" in text
