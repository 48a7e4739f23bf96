"""The paper's tabular built-ins (criteo, avazu, movielens, frappe_x1): preprocessing against direct
formulas, the streaming encoder against the in-memory one, malformed lines, the CLI."""

from __future__ import annotations

import csv
import datetime
import math
from pathlib import Path

import numpy as np
import pytest

from dpn_jax.cli import main
from dpn_jax.data import load_dataset, load_spec_dataset, parse_spec, transforms
from dpn_jax.data import stream as stream_mod
from dpn_jax.data import tabular_builtins as tb
from dpn_jax.data.encode import FittedEncoders
from dpn_jax.data.frappe import find_data_dir
from dpn_jax.data.schema import OOV
from dpn_jax.errors import DataError


def _sample(name: str) -> Path:
    try:
        p = find_data_dir() / "deepctr_samples" / name
    except DataError:
        p = None
    if p is None or not p.is_file():
        pytest.skip(f"../shared/data/deepctr_samples/{name} not found: set DPN_DATA_DIR")
    return p


def _criteo_rows() -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(_sample("criteo_sample.txt").open()))
    return rows[0], rows[1:]


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))


def _decode(ds, field: str, split: str) -> list[str | None]:
    """Encoded ids of a field back to tokens (None = OOV), with the dataset's own vocabulary."""
    info = ds.schema.field(field)
    vocab = next(f for f in ds.meta["encoders"]["fields"] if f["name"] == field)["vocab"]
    local = np.asarray(getattr(ds, split)["cat"][:, info.column]) - info.offset
    return [None if v == OOV else vocab[v - 2] for v in local.tolist()]


def test_criteo_int_category_formula() -> None:
    x = np.array([np.nan, -2, 0, 1, 2, 2.0, 3, 10, 1000, 65535])
    expected = ["0", "-2", "0", "1", "2", "2"] + [str(math.floor(math.log(v) ** 2)) for v in (3, 10, 1000, 65535)]
    assert transforms.criteo_int(x).to_pylist() == expected
    assert transforms.criteo_int(["", "-2", "0", "1", "2", "2.0", "3", "10", "1000", "65535"]).to_pylist() == expected


def test_random_roles_are_chunk_independent_and_proportional() -> None:
    whole = tb.random_roles(0, 100_000, 7, (0.2, 0.1))
    parts = np.concatenate([tb.random_roles(s, 12_345, 7, (0.2, 0.1)) for s in range(0, 100_000, 12_345)])
    np.testing.assert_array_equal(whole, parts[:100_000])
    frac = np.bincount(whole, minlength=3) / whole.size
    np.testing.assert_allclose(frac, [0.7, 0.2, 0.1], atol=0.01)
    assert not np.array_equal(whole, tb.random_roles(0, 100_000, 8, (0.2, 0.1)))


def test_criteo_raw_matches_direct_preprocessing(tmp_path: Path, monkeypatch) -> None:
    """Every encoded cell decodes to the token computed directly from the raw line (or OOV when
    the token is rarer than min_count in TRAIN); the split follows random_roles."""
    hdr, rows = _criteo_rows()
    _write_tsv(tmp_path / "d" / "criteo" / "train.txt", rows)
    monkeypatch.setattr(tb, "BLOCK_BYTES", 4096)  # many chunks: merging and cursors are exercised
    monkeypatch.setattr(stream_mod, "_COMPACT_EVERY", 2)
    ds = load_dataset("criteo", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", min_count=2)
    roles = tb.random_roles(0, len(rows), 2021, (0.2, 0.1))
    assert [ds.train["label"].shape[0], ds.valid["label"].shape[0], ds.test["label"].shape[0]] == \
        np.bincount(roles, minlength=3).tolist()

    def token(col: str, v: str) -> str:
        if col.startswith("I"):
            x = float(v) if v else 0.0
            return str(math.floor(math.log(x) ** 2)) if x > 2 else str(int(x))
        return v

    for j, col in enumerate(hdr[1:], start=1):
        expected = {r: [token(col, row[j]) for row, rr in zip(rows, roles, strict=True) if rr == r]
                    for r in range(3)}  # fmt: skip
        counts: dict[str, int] = {}
        for t in expected[0]:
            counts[t] = counts.get(t, 0) + 1
        for r, split in enumerate(("train", "valid", "test")):
            want = [t if counts.get(t, 0) >= 2 else None for t in expected[r]]
            assert _decode(ds, col, split) == want, (col, split)
    labels = np.array([float(r[0]) for r in rows], np.float32)
    np.testing.assert_array_equal(ds.test["label"], labels[roles == 2])


def test_streamed_equals_in_memory_encoder(tmp_path: Path, monkeypatch) -> None:
    """criteo_x1 (dense I-fields, categorical C-fields) equals the same files through a YAML-spec
    dataset (the in-memory encoder), array for array."""
    hdr, rows = _criteo_rows()
    folder = tmp_path / "d" / "Criteo_x1"
    folder.mkdir(parents=True)
    for name, part in (("train", rows[:140]), ("valid", rows[140:170]), ("test", rows[170:])):
        with open(folder / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(hdr)
            w.writerows(part)
    monkeypatch.setattr(tb, "BLOCK_BYTES", 8192)
    monkeypatch.setattr(stream_mod, "_COMPACT_EVERY", 2)
    ds = load_dataset("criteo_x1", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", min_count=2)
    spec = parse_spec({
        "name": "ref", "format": "csv", "train": "train.csv", "valid": "valid.csv", "test": "test.csv",
        "label": "label",
        "fields": [{"name": c, "type": "categorical", "min_count": 2} for c in tb.CRITEO_CAT]
        + [{"name": c, "type": "numeric"} for c in tb.CRITEO_INT],
    }, base_dir=folder, source="test")  # fmt: skip
    ref = load_spec_dataset(spec, cache_dir=tmp_path / "c2")
    assert ds.schema == ref.schema
    for split in ("train", "valid", "test"):
        a, b = getattr(ds, split), getattr(ref, split)
        np.testing.assert_array_equal(a["cat"], b["cat"])
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_allclose(a["num"], b["num"], rtol=1e-5, atol=1e-6)
    assert ds.meta["oov_counts"] == ref.meta["oov_counts"]


def test_avazu_raw_on_real_sample(tmp_path: Path) -> None:
    src = _sample("avazu_sample.txt")
    (tmp_path / "d" / "avazu").mkdir(parents=True)
    (tmp_path / "d" / "avazu" / "train.csv").symlink_to(src)
    ds = load_dataset("avazu", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", min_count=1)
    names = ds.schema.field_names
    assert "id" not in names and "click" not in names and len(names) == 23
    rows = list(csv.DictReader(src.open()))
    roles = tb.random_roles(0, len(rows), 2021, (0.1, 0.2))
    train = [r for r, rr in zip(rows, roles, strict=True) if rr == 0]
    wd = [str(datetime.date(2000 + int(r["hour"][:2]), int(r["hour"][2:4]), int(r["hour"][4:6])).weekday())
          for r in train]  # fmt: skip
    assert _decode(ds, "hour", "train") == [r["hour"][6:8] for r in train]
    assert _decode(ds, "weekday", "train") == wd
    assert _decode(ds, "site_id", "train") == [r["site_id"] for r in train]
    np.testing.assert_array_equal(ds.train["label"], [float(r["click"]) for r in train])


def test_libfm_and_x1_csv_builtins(tmp_path: Path) -> None:
    d = tmp_path / "d"
    rng = np.random.default_rng(0)
    (d / "movielens_tag").mkdir(parents=True)
    for split, n in (("train", 60), ("validation", 20), ("test", 20)):
        lines = [f"{rng.choice(['-1', '1'])} {rng.integers(0, 5)}:1 {5 + rng.integers(0, 7)}:1 {12 + rng.integers(0, 3)}:1"
                 for _ in range(n)]  # fmt: skip
        (d / "movielens_tag" / f"ml-tag.{split}.libfm").write_text("\n".join(lines) + "\n")
    ml = load_dataset("movielens_tag", data_dir=d, cache_dir=tmp_path / "c")
    first = (d / "movielens_tag" / "ml-tag.test.libfm").read_text().split("\n")[0].split()
    assert _decode(ml, "tag", "test")[0] in (first[3].split(":")[0], None)
    assert ml.test["label"][0] == (1.0 if first[0] == "1" else 0.0)
    # BARS archives may unpack into a sub-folder: it is found there.
    sub = d / "Frappe_x1" / "Frappe_x1"
    sub.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        lines = ["label," + ",".join(tb.FRAPPE_X1)]
        lines += [f"{i % 2}," + ",".join(f"{c}{(i * 7 + k) % 5}" for k, c in enumerate(tb.FRAPPE_X1))
                  for i in range(30)]  # fmt: skip
        (sub / f"{split}.csv").write_text("\n".join(lines) + "\n")
    fx = load_dataset("frappe_x1", data_dir=d, cache_dir=tmp_path / "c")
    assert fx.schema.field_names == tb.FRAPPE_X1
    assert _decode(fx, "city", "valid")[:3] == ["city4", "city1", "city3"]


def _criteo_dir(tmp_path: Path, lines: list[str]) -> Path:
    d = tmp_path / "bad"
    (d / "criteo").mkdir(parents=True, exist_ok=True)
    (d / "criteo" / "train.txt").write_text("\n".join(lines) + "\n")
    return d


def test_malformed_lines_are_named_or_skipped(tmp_path: Path) -> None:
    _, rows = _criteo_rows()
    good = ["\t".join(r) for r in rows[:20]]
    short = "\t".join(rows[20][:-1])  # 39 columns
    d = _criteo_dir(tmp_path, [*good[:5], short, *good[5:]])
    with pytest.raises(DataError, match=r"train.txt: line 6: expected 40 tab-separated columns .* found 39"):
        load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c")
    ds = load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c", skip_malformed=True, min_count=1)
    n = sum(s["label"].shape[0] for _, s in ds.splits())
    assert n == 20 and ds.meta["skipped_lines"] == 1

    bad_num = rows[3][:]
    bad_num[3] = "12x"
    d = _criteo_dir(tmp_path / "n", [*good[:2], "", *good[2:4], "\t".join(bad_num)])  # blank line 3
    with pytest.raises(DataError, match=r"line 6: column 'I3' is '12x'; expected a number"):
        load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c")
    bad_label = rows[3][:]
    bad_label[0] = "2"
    d = _criteo_dir(tmp_path / "l", [*good[:3], "\t".join(bad_label)])
    with pytest.raises(DataError, match=r"line 4: label 'label' is '2'; expected 0/1"):
        load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c")


def test_avazu_bad_hour_and_missing_column(tmp_path: Path) -> None:
    lines = _sample("avazu_sample.txt").read_text().splitlines()
    cells = lines[4].split(",")
    cells[2] = "14133100"  # month 13
    d = tmp_path / "d"
    (d / "avazu").mkdir(parents=True)
    (d / "avazu" / "train.csv").write_text("\n".join([*lines[:4], ",".join(cells), *lines[5:]]) + "\n")
    with pytest.raises(DataError, match=r"train.csv: line 5: column 'hour' is '14133100'; expected YYMMDDHH"):
        load_dataset("avazu", data_dir=d, cache_dir=tmp_path / "c")
    (d / "avazu" / "train.csv").write_text("\n".join(x.replace("banner_pos", "pos") for x in lines) + "\n")
    with pytest.raises(DataError, match=r"column 'banner_pos' not found"):
        load_dataset("avazu", data_dir=d, cache_dir=tmp_path / "c")


def test_missing_files_and_options(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"Criteo_x1: expected train.csv, valid.csv, test.csv there .*dpn-jax data download"):
        load_dataset("criteo_x1", data_dir=tmp_path / "empty", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"options \['max_len'\] do not apply to 'criteo'"):
        load_dataset("criteo", data_dir=tmp_path / "empty", max_len=3)


def test_cache_hit_and_invalidation(tmp_path: Path) -> None:
    _, rows = _criteo_rows()
    d = _criteo_dir(tmp_path, ["\t".join(r) for r in rows[:60]])
    a = load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c", min_count=1)
    b = load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c", min_count=1)
    assert not a.meta["cache"]["hit"] and b.meta["cache"]["hit"]
    assert a.meta["cache"]["dir"] == b.meta["cache"]["dir"]
    _criteo_dir(tmp_path, ["\t".join(r) for r in rows[:61]])
    c = load_dataset("criteo", data_dir=d, cache_dir=tmp_path / "c", min_count=1)
    assert not c.meta["cache"]["hit"] and c.meta["cache"]["dir"] != a.meta["cache"]["dir"]


def test_cli_data_list_prepare_and_train(tmp_path: Path, capsys) -> None:
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "| criteo_x1 | Criteo_x1/ |" in out and "Kaggle" in out
    assert main(["data", "download", "avazu", "--to", str(tmp_path)]) == 2
    assert "kaggle competitions download -c avazu-ctr-prediction" in capsys.readouterr().err
    _, rows = _criteo_rows()
    d = _criteo_dir(tmp_path, ["\t".join(r) for r in rows])
    args = ["--data-dir", str(d), "--cache-dir", str(tmp_path / "c")]
    assert main(["data", "prepare", "criteo", "--min-count", "2", "--no-progress", *args]) == 0
    out = capsys.readouterr().out
    assert "criteo: 39 fields" in out and "prepared in" in out
    code = main(["train", "--model", "dnn", "--data", "criteo", *args, "--set", "max_epochs=1",
                 "--set", "batch_size=64", "--set", "hidden=16", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "test" in capsys.readouterr().out.lower()


def test_chunk_role_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="role has shape"):
        stream_mod._roles(np.zeros(3, np.uint8), 4)


def test_serving_encoders_apply_the_same_transforms(tmp_path: Path) -> None:
    """A bundle's encoders turn RAW rows into exactly the training arrays: the criteo integer
    transform and avazu's hour split are part of the encoder, not only of the prepare step."""
    hdr, rows = _criteo_rows()
    _write_tsv(tmp_path / "d" / "criteo" / "train.txt", rows)
    ds = load_dataset("criteo", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", min_count=2)
    enc = FittedEncoders.from_json(ds.meta["encoders"])
    roles = tb.random_roles(0, len(rows), 2021, (0.2, 0.1))
    test_rows = [r for r, rr in zip(rows, roles, strict=True) if rr == 2]
    raw = {c: [r[j] for r in test_rows] for j, c in enumerate(hdr)}
    np.testing.assert_array_equal(enc.transform(raw)["cat"], ds.test["cat"])

    src = _sample("avazu_sample.txt")
    (tmp_path / "d" / "avazu").mkdir(parents=True)
    (tmp_path / "d" / "avazu" / "train.csv").symlink_to(src)
    av = load_dataset("avazu", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", min_count=1)
    enc = FittedEncoders.from_json(av.meta["encoders"])
    recs = list(csv.DictReader(src.open()))
    roles = tb.random_roles(0, len(recs), 2021, (0.1, 0.2))
    train = [r for r, rr in zip(recs, roles, strict=True) if rr == 0]
    raw = {c: [r[c] for r in train] for c in recs[0]}
    raw["hour"] = [int(h) for h in raw["hour"]]  # e.g. pandas reads it as an integer column
    np.testing.assert_array_equal(enc.transform(raw)["cat"], av.train["cat"])
    raw["hour"][3] = 14102199
    with pytest.raises(DataError, match=r"column 'hour' row 4: '14102199' is not YYMMDDHH"):
        enc.transform(raw)
