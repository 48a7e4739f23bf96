"""Input mistakes are named where they are: a csv row with the wrong column count (file and
line), a one-class label column (split and file, at load), an empty numeric column (a warning),
and -1 in a 0/1 label column (an error unless -1/1 labels are the file's convention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dpn_jax.data import load_dataset, load_spec
from dpn_jax.data import tabular_builtins as tb
from dpn_jax.data.encode import carve
from dpn_jax.data.readers import read_table
from dpn_jax.errors import DataError

FIELDS = "fields:\n  - {name: user, type: categorical}\n  - {name: price, type: numeric}\n"


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("y,user,price\n" + "\n".join(rows) + "\n")
    return path


def _rows(n: int, label=lambda i: i % 2, price=lambda i: f"{i * 0.5:g}") -> list[str]:
    return [f"{label(i)},u{i % 7},{price(i)}" for i in range(n)]


def _spec(tmp_path: Path, extra: str = "", **files: str) -> Path:
    lines = ["format: csv", "label: y", *(f"{k}: {v}" for k, v in files.items()), extra, FIELDS]
    p = tmp_path / "spec.yaml"
    p.write_text("\n".join(x for x in lines if x))
    return p


def test_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    # a quoted cell spanning two lines: the bad row is on line 6 of the file, data row 4
    p.write_text('y,user,price\n1,a,1\n0,"multi\nline",2\n1,c,3\n0,d,4,extra\n1,e,5\n')
    with pytest.raises(DataError) as err:
        read_table(p, "csv", {"user": "str", "price": "float"}, label="y")
    msg = str(err.value)
    assert msg == f"{p}: cannot read as csv: line 6: expected 3 columns (as the header), found 4: '0,d,4,extra'"
    assert "\n" not in msg


def test_one_class_train_or_valid_split_is_refused_at_load(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows(60, label=lambda i: 0))  # 54 rows after carving test
    _write(tmp_path / "valid.csv", _rows(20))
    spec = _spec(tmp_path, train="train.csv", valid="valid.csv")
    with pytest.raises(DataError) as err:
        load_dataset(str(spec), cache_dir=tmp_path / "c")
    assert str(err.value) == (f"the train split ({tmp_path / 'train.csv'}) has label 'y' = 0 in all "
                              "its 54 rows; no 1s: the train and valid splits need both classes (0 and 1)")
    _write(tmp_path / "train.csv", _rows(60))
    _write(tmp_path / "valid.csv", _rows(20, label=lambda i: 1))
    with pytest.raises(DataError, match=r"the valid split \(.*valid\.csv\) has label 'y' = 1 in all its 20 rows; no 0s"):
        load_dataset(str(spec), cache_dir=tmp_path / "c")
    # a carved valid split names the file it was carved from
    spec = _spec(tmp_path, train="train.csv", extra="split: {valid: 0.3, test: 0.0}")
    valid_rows = set(carve(40, load_spec(spec))["valid"].tolist())
    _write(tmp_path / "train.csv", _rows(40, label=lambda i: 0 if i in valid_rows else i % 2))
    with pytest.raises(DataError, match=rf"^the valid split \(carved from {tmp_path / 'train.csv'}\) has "
                                        r"label 'y' = 0 in all its 12 rows; no 1s"):
        load_dataset(str(spec), cache_dir=tmp_path / "c")


def test_one_class_in_a_streamed_builtin(tmp_path: Path) -> None:
    d = tmp_path / "d" / "Frappe_x1"
    d.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        rows = ["label," + ",".join(tb.FRAPPE_X1)]
        rows += [f"{0 if split == 'valid' else i % 2}," + ",".join(f"{c}{i % 3}" for c in tb.FRAPPE_X1)
                 for i in range(20)]  # fmt: skip
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"the valid split \(built-in frappe_x1 .*valid\.csv.*\) has label "
                                        r"'label' = 0 in all its 20 rows; no 1s"):
        load_dataset("frappe_x1", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", progress=False)


def test_empty_numeric_column_is_warned_about(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", _rows(50, price=lambda i: ""))
    spec = _spec(tmp_path, train="train.csv", extra="split: {valid: 0.2, test: 0.2}")
    with pytest.warns(UserWarning, match=r"numeric column 'price' \(field 'price'\) is empty in every train row"):
        ds = load_dataset(str(spec), cache_dir=tmp_path / "c")
    assert np.all(np.asarray(ds.train["num"]) == 0.0)


def test_minus_one_label_only_where_it_is_the_convention(tmp_path: Path) -> None:
    rows = _rows(40)
    rows[6] = "-1,u1,2"
    _write(tmp_path / "train.csv", rows)
    spec = _spec(tmp_path, train="train.csv")
    with pytest.raises(DataError) as err:
        load_dataset(str(spec), cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'train.csv'}: label 'y' row 7 (line 8): expected a binary label "
                          "0/1, got '-1'")
    assert "label_values: [-1, 1]" in msg
    # a spec that says -1/1: -1 is 0 and 1 is 1 (and a 0 is then the mistake)
    _write(tmp_path / "train.csv", [r.replace("0,", "-1,", 1) if r.startswith("0,") else r for r in rows])
    ds = load_dataset(str(_spec(tmp_path, train="train.csv", extra="label_values: [-1, 1]")),
                      cache_dir=tmp_path / "c")
    y = np.concatenate([np.asarray(s["label"]) for _, s in ds.splits()])
    assert sorted(set(y.tolist())) == [0.0, 1.0] and len(y) == 40
    _write(tmp_path / "train.csv", ["1,u3,1", "-1,u2,1"] * 3 + ["0,u1,2"] + ["-1,u2,1", "1,u3,1"] * 3)
    with pytest.raises(DataError, match=r"row 7 \(line 8\): expected a binary label -1/1, got '0'"):
        load_dataset(str(_spec(tmp_path, train="train.csv", extra="label_values: [-1, 1]")),
                     cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"label_values must be \[0, 1\] or \[-1, 1\], got \[1, 2\]"):
        load_dataset(str(_spec(tmp_path, train="train.csv", extra="label_values: [1, 2]")))


def test_minus_one_in_a_streamed_csv_builtin_is_an_error(tmp_path: Path) -> None:
    d = tmp_path / "d" / "Frappe_x1"
    d.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        rows = ["label," + ",".join(tb.FRAPPE_X1)]
        rows += [f"{(-1 if split == 'test' and i == 4 else i % 2)}," + ",".join(f"{c}{i % 3}" for c in tb.FRAPPE_X1)
                 for i in range(20)]  # fmt: skip
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"test\.csv: line 6: label 'label' is '-1'; expected 0/1$"):
        load_dataset("frappe_x1", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", progress=False)


def test_empty_numeric_column_in_a_stream_is_warned_about(tmp_path: Path) -> None:
    import pyarrow as pa

    from dpn_jax.data.stream import Chunk, StreamField, encode_stream

    def source(bar):
        for role in range(3):
            yield Chunk({"x": pa.array([np.nan] * 4), "c": pa.array(["a", "b", "a", "b"])},
                        np.array([0, 1, 0, 1], np.float32), role)

    fields = [StreamField("x", "num"), StreamField("c", "cat")]
    with pytest.warns(UserWarning, match=r"numeric column 'x' \(field 'x'\) is empty in every train row"):
        encode_stream("toy", fields, source, tmp_path / "s", total_bytes=1, progress=False,
                      meta={"source": "toy source"}, log=lambda m: None)
