"""``dpn-jax predict``: score a csv / parquet file of any size in bounded memory.

The input is read in record batches (pyarrow's streaming csv reader, or parquet row groups via
``ParquetFile.iter_batches``), re-cut into chunks of ``batch_size`` rows, scored, and written
incrementally (``CSVWriter`` / ``ParquetWriter``) into a temporary file that replaces the output
only once complete, so memory holds a few chunks, never the file. Row order is kept. csv cells are read as text, exactly as training read them ("007" stays "007";
an empty cell is missing).

A csv without a header line (Criteo's ``train.txt`` / ``test.txt``) gets its column names from
``columns``, where ``...`` stands for the bundle's raw feature columns in the bundle's order:
``label,...`` for a file with the label first, ``...`` for features only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dpn_jax import faults
from dpn_jax.atomic import atomic_path
from dpn_jax.errors import DataError
from dpn_jax.serving.predictor import Predictor

SCORE_COLUMN = "probability"
CSV_IN = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".csv.bz2")  # pyarrow decompresses by extension
CSV_OUT = (".csv", ".tsv")
PARQUET_EXT = (".parquet", ".pq")


def file_kind(path: Path, role: str) -> str:
    name = path.name.lower()
    csv_ext = CSV_IN if role == "input" else CSV_OUT
    if name.endswith(csv_ext):
        return "csv"
    if name.endswith(PARQUET_EXT):
        return "parquet"
    raise DataError(f"{path}: cannot tell the {role} format from the extension; use one of "
                    f"{list(csv_ext + PARQUET_EXT)}")


def _check_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    for c in wanted:
        if c not in present:
            raise DataError(f"{path}: column {c!r} not found; the file's columns are {present}")


def header_names(spec: str, features: list[str]) -> list[str]:
    """``--columns`` (comma separated, ``...`` = the bundle's raw feature columns) -> names."""
    names = [n.strip() for n in spec.split(",")]
    if "" in names or names.count("...") > 1:
        raise DataError(f"--columns {spec!r}: expected comma-separated names, '...' at most once "
                        f"for the model's columns (e.g. label,...)")
    out = [c for n in names for c in (features if n == "..." else [n])]
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise DataError(f"--columns {spec!r}: names {dup} given twice (the model's columns are "
                        f"{features})")
    return out


def read_batches(path: Path, columns: list[str], sep: str, block_rows: int,
                 names: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (csv: all as text), in file order; ``names``: the csv has no
    header line and these are its columns."""
    if not path.is_file():
        raise DataError(f"input file not found: {path}")
    try:
        if file_kind(path, "input") == "parquet":
            if names is not None:
                raise DataError(f"{path}: --columns names the columns of a csv without a header; "
                                f"a parquet file has its own names")
            pf = pq.ParquetFile(path)
            _check_columns(path, columns, pf.schema_arrow.names)
            yield from pf.iter_batches(batch_size=block_rows, columns=columns)
            return
        parse = pacsv.ParseOptions(delimiter="\t" if ".tsv" in path.name.lower() else sep)
        read = pacsv.ReadOptions(column_names=names)
        with pacsv.open_csv(path, parse_options=parse, read_options=read) as probe:
            _check_columns(path, columns, probe.schema.names)
        convert = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=True,
                                       column_types={c: pa.string() for c in columns}, null_values=[""])
        with pacsv.open_csv(path, parse_options=parse, read_options=read,
                            convert_options=convert) as reader:
            yield from reader
    except pa.ArrowInvalid as e:
        first = (str(e).strip().splitlines() or ["ArrowInvalid"])[0]
        hint = f" (--columns gave {len(names)} names)" if names is not None else ""
        raise DataError(f"{path}: cannot read: {first}{hint}") from None


def rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last may be shorter), in order."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        while b.num_rows:
            take = min(rows - have, b.num_rows)
            pending.append(b.slice(0, take))
            have += take
            b = b.slice(take)
            if have == rows:
                yield pa.Table.from_batches(pending)
                pending, have = [], 0
    if have:
        yield pa.Table.from_batches(pending)


class _Writer:
    def __init__(self, path: Path, kind: str) -> None:
        self.path, self.kind, self.writer = path, kind, None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            tsv = pacsv.WriteOptions(delimiter="\t" if self.path.name.lower().endswith(".tsv") else ",")
            self.writer = (pq.ParquetWriter(self.path, table.schema) if self.kind == "parquet"
                           else pacsv.CSVWriter(self.path, table.schema, write_options=tsv))
        self.writer.write_table(table)

    def close(self, schema: pa.Schema | None = None) -> None:
        if self.writer is None and schema is not None:  # an input without rows still gets a header
            self.write(schema.empty_table())
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def predict_file(predictor: Predictor, input: str | Path, output: str | Path, *,
                 id_column: str | None = None, batch_size: int = 4096,
                 sep: str | None = None, columns: str | None = None) -> dict[str, Any]:
    """Score every row of ``input`` into ``output`` (csv or parquet by extension); ``columns``:
    the names of a csv without a header (module docstring).

    The output is written to a temporary file beside ``output`` and renamed onto it at the end:
    on any error an existing ``output`` is left as it was. An unparsable cell is reported with
    the input file and its data row (1-based, the header line not counted), like training's."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    src, dst = Path(input), Path(output)
    out_kind = file_kind(dst, "output")
    if dst.resolve() == src.resolve():
        raise DataError(f"{dst}: the output would overwrite the input; choose another --output")
    names = header_names(columns, list(predictor.raw_columns)) if columns is not None else None
    columns = list(dict.fromkeys([*predictor.raw_columns, *([id_column] if id_column else [])]))
    sep = sep or predictor.bundle.dataset.get("sep") or ","  # libfm bundles: "," (one column per field)
    t0 = time.perf_counter()
    n = 0
    out_schema = pa.schema(([pa.field(id_column, pa.string())] if id_column else [])
                           + [pa.field(SCORE_COLUMN, pa.float32())])
    with atomic_path(dst) as tmp:
        writer = _Writer(tmp, out_kind)
        try:
            for table in rechunk(read_batches(src, columns, sep, batch_size, names), batch_size):
                probs = predictor.predict(table, batch_size=batch_size, source=src, first_row=n + 1)
                cols = {SCORE_COLUMN: pa.array(probs, pa.float32())}
                if id_column:
                    cols = {id_column: table.column(id_column), **cols}
                out = pa.table(cols)
                out_schema = out.schema
                writer.write(out)
                n += table.num_rows
                faults.point("chunk")
            writer.close(out_schema)
        finally:
            writer.close()
    seconds = time.perf_counter() - t0
    return {"rows": n, "input": str(src), "output": str(dst), "seconds": round(seconds, 3),
            "rows_per_s": round(n / seconds, 1) if seconds > 0 else None}
