"""Read the raw columns of one split from csv / parquet / libfm files.

The result is a plain ``dict[column name -> 1-D numpy array]``:

* "str" columns are object arrays of ``str`` (``None`` where missing). Categorical ids are read
  as text on purpose, so "007" stays "007" instead of becoming the integer 7.
* "float" columns are float64 arrays with NaN where the cell is empty/blank.
* the label column is float32 0/1. ``-1`` is read as 0 only where -1/1 labels are the
  convention: libfm files, or a spec with ``label_values: [-1, 1]``; elsewhere it is an error.

Every problem is a one-line :class:`DataError` naming the file, and the column/row where useful.
Row numbers are 1-based DATA rows (the csv header is not counted); a csv error also gives the
file's line number.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dpn_jax.data import transforms
from dpn_jax.errors import DataError

ColumnKind = Literal["str", "float"]
Raw = dict[str, np.ndarray]
_VAL_RE = re.compile(r":\S*")  # the ":val" part of a libfm token


def read_table(
    paths: str | Path | Sequence[str | Path],
    fmt: str,
    columns: Mapping[str, ColumnKind],
    sep: str = ",",
    label: str | None = None,
    label_values: tuple[int, int] = (0, 1),
) -> Raw:
    """Read ``columns`` (name -> "str" | "float") and the ``label`` column from one or more files,
    concatenated in the given order. For libfm, ``columns`` are the field names in position order
    and the label is stored under ``label`` (default "label"). ``label_values``: the csv/parquet
    label column holds 0/1, or -1/1 (read as 0/1); libfm labels may be either."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise DataError("no input files given")
    if fmt == "libfm":
        parts = [read_libfm(f, list(columns), label=label or "label") for f in files]
    elif fmt in ("csv", "parquet"):
        if label is None:
            raise DataError(f"{files[0]}: a {fmt} split needs a label column")
        parts = [_read_arrow(f, fmt, columns, sep, label, tuple(label_values)) for f in files]
    else:
        raise DataError(f"unknown format {fmt!r}; expected csv, parquet or libfm")
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- csv / parquet


def _read_arrow(
    path: Path, fmt: str, columns: Mapping[str, ColumnKind], sep: str, label: str,
    label_values: tuple[int, int] = (0, 1),
) -> Raw:  # fmt: skip
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    wanted = list(dict.fromkeys([*columns, label]))
    try:
        if fmt == "csv":
            table = _read_csv(path, wanted, sep)
        else:
            present = pq.read_schema(path).names
            _check_columns(path, wanted, present)
            table = pq.read_table(path, columns=wanted)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot read as {fmt}: {_first_line(e)}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows (an empty file or split)")
    out: Raw = {}
    for name, kind in columns.items():
        col = table.column(name)
        out[name] = _as_float(col, path, name) if kind == "float" else _as_str(col)
    line_of = (lambda i: csv_line(path, sep, i)) if fmt == "csv" else None
    out[label] = parse_labels(_as_str(table.column(label)), path, label, line_of=line_of,
                              allowed=label_values)  # fmt: skip
    return out


def _csv_records(path: Path, sep: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, cells) of each non-blank record of a csv file, the header included; quoted
    cells may span lines. Only read to locate an error."""
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh, delimiter=sep)
        end = 0
        for cells in reader:
            start, end = end + 1, reader.line_num
            if cells:
                yield start, cells


def csv_line(path: Path, sep: str, row: int) -> int | None:
    """The line of a csv file where 0-based data row ``row`` starts (None if not found)."""
    try:
        for k, (line, _) in enumerate(_csv_records(path, sep)):
            if k == row + 1:  # record 0 is the header
                return line
    except (csv.Error, OSError):
        pass
    return None


def _bad_csv_record(path: Path, sep: str) -> tuple[int, int, int, str] | None:
    """(line, expected columns, found columns, text) of the first record whose column count
    differs from the header's."""
    try:
        records = _csv_records(path, sep)
        _, header = next(records)
        for line, cells in records:
            if len(cells) != len(header):
                return line, len(header), len(cells), sep.join(cells)
    except (csv.Error, OSError, StopIteration):
        pass
    return None


def _read_csv(path: Path, wanted: list[str], sep: str) -> pa.Table:
    parse = pacsv.ParseOptions(delimiter=sep)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; expected a header line with columns {wanted}")
    try:
        with pacsv.open_csv(path, parse_options=parse) as reader:  # reads only the first block
            present = reader.schema.names
        _check_columns(path, wanted, present)
        # Everything as text: ids keep their form, and numbers are parsed below with row-level errors.
        convert = pacsv.ConvertOptions(
            include_columns=wanted,
            column_types={c: pa.string() for c in wanted},
            strings_can_be_null=True,
            null_values=[""],  # only an empty cell is missing ("NA" may be a real category)
        )
        return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        bad = _bad_csv_record(path, sep) if "columns" in str(e) else None
        if bad is None:
            raise
        line, expected, found, text = bad
        shown = text if len(text) <= 120 else text[:117] + "..."
        raise DataError(f"{path}: cannot read as csv: line {line}: expected {expected} columns (as "
                        f"the header), found {found}: {shown!r}") from None  # fmt: skip


def _check_columns(path: Path, wanted: Sequence[str], present: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"{path}: column {missing[0]!r} not found; the file's columns are {list(present)}"
        )


def _as_str(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_boolean(col.type):
        col = pc.cast(col, pa.int8())
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())  # e.g. integer ids in a parquet file
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


def _as_float(col: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    try:
        return transforms.as_float(col)
    except transforms.TransformError as e:
        raise DataError(
            f"{path}: numeric column {name!r} row {e.index + 1}: cannot parse {e.value!r} as a number "
            "(leave the cell empty for a missing value)"
        ) from None


LIBFM_LABELS = (-1, 0, 1)  # libfm files use either 0/1 or -1/1


def parse_labels(
    values: np.ndarray,
    path: Path | str,
    name: str,
    rows: np.ndarray | None = None,
    unit: str = "row",
    *,
    allowed: Sequence[int] = (0, 1),
    line_of: Callable[[int], int | None] | None = None,
) -> np.ndarray:
    """Binary labels 0/1 (float32) from text whose values are ``allowed``: (0, 1), (-1, 1) (a
    spec's ``label_values``, -1 -> 0) or :data:`LIBFM_LABELS`. Anything else names the row and
    the value. ``rows`` maps positions to the row/line numbers to report (default: position + 1);
    ``line_of`` gives a position's line in the file, reported after the row."""
    ok = {float(v) for v in allowed}
    filled = np.where(np.equal(values, None), "", values).astype(str)
    uniq, inverse = np.unique(filled, return_inverse=True)
    lut = np.empty(len(uniq), np.float32)
    for j, u in enumerate(uniq.tolist()):
        try:
            x = float(u)
        except ValueError:
            x = np.nan
        if x not in ok:
            i = int(np.flatnonzero(inverse == j)[0])
            row = int(rows[i]) if rows is not None else i + 1
            line = line_of(i) if line_of is not None else None
            at = f"{unit} {row}" + (f" (line {line})" if line is not None else "")
            expected = "/".join(f"{v:g}" for v in sorted(ok))
            hint = ""
            if x == -1.0:
                hint = ("; -1/1 labels are read from libfm files, or with `label_values: [-1, 1]` "
                        "in the dataset spec")  # fmt: skip
            raise DataError(
                f"{path}: label {name!r} {at}: expected a binary label {expected}, got {u!r}{hint}"
            )
        lut[j] = 1.0 if x == 1.0 else 0.0
    return lut[inverse.reshape(-1)]


# ----------------------------------------------------------------------------- libfm


def read_libfm(path: str | Path, fields: Sequence[str], label: str = "label") -> Raw:
    """A libfm file: ``label idx:val idx:val ...`` with exactly one token per field, by position.
    The categorical value of a field is its ``idx`` string (Frappe's values are all 1)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    n = len(fields)
    text = path.read_text(encoding="utf-8")
    line_nos: list[int] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue  # blank lines (e.g. a trailing newline) are not rows
        if len(parts) != n + 1:
            raise DataError(
                f"{path}: line {line_no}: expected a label and {n} idx:val tokens "
                f"(fields {list(fields)}), found {len(parts) - 1} tokens"
            )
        if line.count(":") != n:
            bad = next(t for t in parts[1:] if t.count(":") != 1)
            raise DataError(f"{path}: line {line_no}: token {bad!r} is not idx:val")
        line_nos.append(line_no)
    if not line_nos:
        raise DataError(f"{path}: no data rows (an empty file or split)")
    # Every line is now known to be well formed: drop the ":val" parts in one pass over the text.
    flat = _VAL_RE.sub("", text).split()
    grid = np.array(flat, dtype=object).reshape(len(line_nos), n + 1)
    out: Raw = {name: grid[:, j + 1].copy() for j, name in enumerate(fields)}
    out[label] = parse_labels(grid[:, 0], path, label, np.array(line_nos), "line",
                              allowed=LIBFM_LABELS)  # fmt: skip
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
