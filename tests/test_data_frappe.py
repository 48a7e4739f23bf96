"""The built-in frappe dataset, data-dir resolution, and specs over the real sample files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from dpn_jax.data import frappe, load_dataset, padded_batches
from dpn_jax.data.frappe import FRAPPE_FIELDS, find_data_dir
from dpn_jax.data.schema import split_len
from dpn_jax.errors import DataError


def real_data_dir() -> Path:
    try:
        d = find_data_dir()
    except DataError:
        d = None
    if d is None or not (d / "frappe" / "frappe.validation.libfm").is_file():
        pytest.skip("../shared/data/frappe not found: set DPN_DATA_DIR")
    return d


# ----------------------------------------------------------------------------- find_data_dir


def test_explicit_and_env_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPN_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    assert find_data_dir(other) == other.resolve()  # the explicit option wins over the env
    with pytest.raises(DataError, match=r"nope \(given explicitly\) does not exist"):
        find_data_dir(tmp_path / "nope")
    monkeypatch.setenv("DPN_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone \(from \$DPN_DATA_DIR\) does not exist"):
        find_data_dir()


def test_no_data_dir_lists_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPN_DATA_DIR", raising=False)
    monkeypatch.setattr(frappe, "repo_root", lambda: tmp_path / "repo")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(DataError) as e:
        find_data_dir()
    msg = str(e.value)
    assert "$DPN_DATA_DIR (unset)" in msg and str(tmp_path / "shared" / "data") in msg
    assert "set DPN_DATA_DIR" in msg and "\n" not in msg


def test_frappe_files_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"frappe\.validation\.libfm not found.*DPN_DATA_DIR"):
        load_dataset("frappe", data_dir=tmp_path, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- real frappe


@pytest.mark.realdata
def test_frappe(tmp_path: Path) -> None:
    d = real_data_dir()
    ds = load_dataset("frappe", data_dir=d, cache_dir=tmp_path)
    s = ds.schema
    assert s.field_names == FRAPPE_FIELDS and s.num_fields == 10
    assert len(s.cat_fields) == 10 and not s.numeric_fields and not s.seq_fields
    n_train, n_valid, n_test = (split_len(x) for _, x in ds.splits())
    assert n_train + n_valid == 57_722 and n_test == 28_860
    assert n_valid == round(0.1 * 57_722)
    for _, split in ds.splits():
        assert split["cat"].shape[1] == 10 and split["num"].shape[1] == 0
        assert 0.31 < float(split["label"].mean()) < 0.35
    # blocks tile the table; every id falls in its field's block
    assert s.table_size == sum(f.vocab_size for f in s.fields)
    assert [f.offset for f in s.fields] == list(
        np.cumsum([0] + [f.vocab_size for f in s.fields[:-1]])
    )
    assert s.table_size <= 5382 + 2 * 10  # at most the 5,382 libfm features plus pad/oov per field
    for f in s.fields:
        for _, split in ds.splits():
            ids = np.asarray(split["cat"][:, f.column])
            assert ids.min() >= f.oov_id and ids.max() < f.offset + f.vocab_size
    # unseen users/cities at test time are OOV and counted; items all occur in train
    assert ds.meta["oov_counts"]["test"]["user"] > 0
    assert ds.meta["oov_counts"]["train"] == dict.fromkeys(FRAPPE_FIELDS, 0)
    # a second load is a cache hit with the same split (seeded)
    again = load_dataset("frappe", data_dir=d, cache_dir=tmp_path)
    assert again.meta["cache"]["hit"] and np.array_equal(again.valid["cat"], ds.valid["cat"])
    other = load_dataset("frappe", data_dir=d, cache_dir=tmp_path, seed=1)
    assert not other.meta["cache"]["hit"] and not np.array_equal(
        other.valid["cat"], ds.valid["cat"]
    )
    rows = sum(int(b["mask"].sum()) for b in padded_batches(ds.test, 4096))
    assert rows == n_test


# ----------------------------------------------------------------------------- real sample specs


def sample(rel: str) -> Path:
    d = real_data_dir()
    if not (d / rel).is_file():
        pytest.skip(f"{rel} not found in {d}: set DPN_DATA_DIR")
    return d / rel


@pytest.mark.realdata
def test_fuxictr_tiny_spec_with_shared_sequence(tmp_path: Path) -> None:
    train = sample("fuxictr_tiny/tiny_csv/train_sample.csv")
    spec = tmp_path / "fuxi.yaml"
    spec.write_text(
        textwrap.dedent(f"""
        name: fuxi_tiny
        format: csv
        train: {train}
        valid: {train.parent / "valid_sample.csv"}
        test: {train.parent / "test_sample.csv"}
        label: clk
        fields:
          - {{name: userid, type: categorical}}
          - {{name: adgroup_id, type: categorical}}
          - {{name: pid, type: categorical}}
          - {{name: price, type: numeric, buckets: 5}}
          - {{name: price_dense, column: price, type: numeric}}
          - {{name: pvalue_level, type: categorical}}
          - {{name: click_sequence, type: sequence, sep: "^", max_len: 5, share_vocab: adgroup_id}}
        """)
    )
    ds = load_dataset(str(spec), cache_dir=tmp_path / "cache")
    assert (split_len(ds.train), split_len(ds.valid), split_len(ds.test)) == (100, 100, 100)
    s = ds.schema
    seq, ad = s.field("click_sequence"), s.field("adgroup_id")
    assert (seq.offset, seq.vocab_size) == (ad.offset, ad.vocab_size)
    hist = np.asarray(ds.train["seq/click_sequence"])
    assert (
        hist.shape == (100, 5) and ((hist >= ad.offset) & (hist < ad.offset + ad.vocab_size)).all()
    )
    assert (hist[:, 0] == seq.pad_id).mean() > 0.5  # most rows have no clicks
    assert len(ds.meta["bucket_edges"]["price"]) >= 2
    assert float(ds.train["label"].sum()) == 4


@pytest.mark.realdata
def test_criteo_sample_spec_with_missing_values(tmp_path: Path) -> None:
    path = sample("deepctr_samples/criteo_sample.txt")
    spec = tmp_path / "criteo.yaml"
    spec.write_text(
        f"name: criteo\nformat: csv\ntrain: {path}\nlabel: label\nsplit: {{valid: 0.2, test: 0.2}}\n"
        "fields:\n"
        + "".join(f"  - {{name: I{i}, type: numeric}}\n" for i in range(1, 14))
        + "".join(f"  - {{name: C{i}, type: categorical, min_count: 2}}\n" for i in range(1, 27))
    )
    ds = load_dataset(str(spec), cache_dir=tmp_path / "cache")
    assert (split_len(ds.train), split_len(ds.valid), split_len(ds.test)) == (120, 40, 40)
    assert ds.train["num"].shape == (120, 13) and np.isfinite(ds.train["num"]).all()
    assert ds.train["cat"].shape == (120, 26)
    assert sum(ds.meta["oov_counts"]["test"].values()) > 0


def test_frappe_full_nfm_split_when_the_train_file_exists(tmp_path: Path) -> None:
    """With frappe.train.libfm (a full download), train/valid/test are the three NFM files."""
    try:
        d = find_data_dir()
    except DataError:
        pytest.skip("no data dir (../shared/data or $DPN_DATA_DIR): the frappe files are needed")
    if not (d / "frappe" / "frappe.validation.libfm").is_file():
        pytest.skip("../shared/data/frappe not found: set DPN_DATA_DIR")
    full = tmp_path / "data" / "frappe"
    full.mkdir(parents=True)
    lines = (d / "frappe" / "frappe.validation.libfm").read_text().splitlines()
    (full / "frappe.train.libfm").write_text("\n".join(lines[:3000]) + "\n")  # generated from real rows
    (full / "frappe.validation.libfm").write_text("\n".join(lines[3000:3500]) + "\n")
    (full / "frappe.test.libfm").write_text("\n".join(lines[3500:3700]) + "\n")
    ds = load_dataset("frappe", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert [s["label"].shape[0] for _, s in ds.splits()] == [3000, 500, 200]
    assert ds.test["label"][0] == (1.0 if lines[3500].split()[0] == "1" else 0.0)
