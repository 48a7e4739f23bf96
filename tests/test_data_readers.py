"""Raw readers: csv / parquet / libfm columns, and one-line errors naming file, column and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpn_jax.data.readers import read_libfm, read_table
from dpn_jax.errors import DataError

COLS = {"user": "str", "price": "float"}


def csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def raises(match: str, *args, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        read_table(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    for part in match.split("|"):
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def test_csv_types_and_missing(tmp_path: Path) -> None:
    p = csv(tmp_path, "y,user,price,extra\n1,007,1.5,z\n-1,,  ,z\n1,NA,3,z\n")
    raw = read_table(p, "csv", COLS, label="y", label_values=(-1, 1))  # -1/1 must be declared
    assert set(raw) == {"user", "price", "y"}
    assert raw["user"].tolist() == ["007", None, "NA"]  # ids keep their text; only "" is missing
    np.testing.assert_array_equal(raw["price"], [1.5, np.nan, 3.0])
    np.testing.assert_array_equal(raw["y"], [1, 0, 1])  # -1 -> 0
    assert raw["y"].dtype == np.float32


def test_tab_separated_and_several_files(tmp_path: Path) -> None:
    a = csv(tmp_path, "y\tuser\tprice\n0\ta\t1\n", "a.tsv")
    b = csv(tmp_path, "y\tuser\tprice\n1\tb\t2\n1\tc\t\n", "b.tsv")
    raw = read_table([a, b], "csv", COLS, sep="\t", label="y")
    assert raw["user"].tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(raw["y"], [0, 1, 1])


def test_missing_column(tmp_path: Path) -> None:
    p = csv(tmp_path, "y,user\n1,a\n")
    raises(f"{p}|'price'|not found|['y', 'user']", p, "csv", COLS, label="y")
    raises(f"{p}|'clk'|['y', 'user']", p, "csv", {"user": "str"}, label="clk")


def test_non_binary_label(tmp_path: Path) -> None:
    p = csv(tmp_path, "y,user,price\n1,a,1\n0,b,1\n2,c,1\n")
    raises(f"{p}|label 'y' row 3|'2'", p, "csv", COLS, label="y")
    p = csv(tmp_path, "y,user,price\n1,a,1\n,b,1\n")
    raises("row 2|''", p, "csv", COLS, label="y")


def test_unparsable_numeric(tmp_path: Path) -> None:
    p = csv(tmp_path, "y,user,price\n1,a,1\n0,b,2\n0,c,cheap\n")
    raises(f"{p}|'price'|row 3|'cheap'", p, "csv", COLS, label="y")


def test_empty_files(tmp_path: Path) -> None:
    p = csv(tmp_path, "")
    raises(f"{p}|empty", p, "csv", COLS, label="y")
    p = csv(tmp_path, "y,user,price\n", "header_only.csv")
    raises(f"{p}|no data rows", p, "csv", COLS, label="y")


def test_malformed_csv_row(tmp_path: Path) -> None:
    p = csv(tmp_path, "y,user,price\n1,a,1\n0,b,1,extra\n")
    raises(f"{p}|cannot read as csv", p, "csv", COLS, label="y")


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    table = pa.table(
        {"y": [1, 0, 1], "user": [7, None, 9], "price": [1.0, None, 2.5], "tag": ["x", None, "007"]}
    )
    pq.write_table(table, p)
    raw = read_table(p, "parquet", {"user": "str", "price": "float", "tag": "str"}, label="y")
    assert raw["user"].tolist() == ["7", None, "9"]
    assert raw["tag"].tolist() == ["x", None, "007"]
    np.testing.assert_array_equal(raw["price"], [1.0, np.nan, 2.5])
    np.testing.assert_array_equal(raw["y"], [1, 0, 1])
    raises(f"{p}|'nope'|['y', 'user', 'price', 'tag']", p, "parquet", {"nope": "str"}, label="y")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"y": [1, 3], "user": ["a", "b"]}), bad)
    raises(f"{bad}|row 2|'3'", bad, "parquet", {"user": "str"}, label="y")


def test_libfm(tmp_path: Path) -> None:
    p = tmp_path / "d.libfm"
    p.write_text("1 12:1 007:1 5:0.5\r\n-1 3:1 8:1 5:1\r\n\n0 3:1 9:1 6:1\n")
    raw = read_table(p, "libfm", {"a": "str", "b": "str", "c": "str"})
    assert raw["a"].tolist() == ["12", "3", "3"]
    assert raw["b"].tolist() == ["007", "8", "9"]  # the idx string is the category
    assert raw["c"].tolist() == ["5", "5", "6"]
    np.testing.assert_array_equal(raw["label"], [1, 0, 0])


def test_libfm_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.libfm"
    p.write_text("1 1:1 2:1\n1 1:1 2:1\n0 1:1\n")
    with pytest.raises(
        DataError, match=r"d\.libfm: line 3: expected a label and 2 idx:val tokens.*found 1"
    ):
        read_libfm(p, ["a", "b"])
    p.write_text("1 1:1 2:1\n1 1:1 2\n")
    with pytest.raises(DataError, match=r"line 2: token '2' is not idx:val"):
        read_libfm(p, ["a", "b"])
    p.write_text("1 1:1 2:1\n\n2 1:1 2:1\n")
    with pytest.raises(DataError, match=r"line 3: expected a binary label.*'2'"):
        read_libfm(p, ["a", "b"])
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no data rows"):
        read_libfm(p, ["a", "b"])
    with pytest.raises(DataError, match="not found"):
        read_libfm(tmp_path / "none.libfm", ["a"])
