"""Run an exported model: ``load_exported(dir).predict(rows)``. Needs jax and numpy only.

This module imports neither the model code (Flax, the registry) nor the data layer (pyarrow,
YAML): a serving process loads the StableHLO program written by ``dpn-jax export`` and the
encoding tables beside it, and nothing else. The raw-row encoding below re-implements
:meth:`dpn_jax.data.encode.FittedEncoders.transform` in plain numpy (numeric buckets share
:func:`dpn_jax.buckets.bucketize` with it); tests check that both give the same arrays and the
same scores.

Directory layout (written by :mod:`dpn_jax.serving.export`)::

    export.json      format version, model, input names/dtypes/widths, platforms, versions
    model.jaxexport  ``jax.export.Exported.serialize()`` of ``(*inputs) -> probabilities [b]``
    encoding.json    the fitted encoders (vocabularies, bucket edges, mean/std, sequence settings)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpn_jax.buckets import bucketize
from dpn_jax.errors import DataError, DpnError

EXPORT_FORMAT = "dpn-jax-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_JSON, EXPORT_PROGRAM, EXPORT_ENCODING = "export.json", "model.jaxexport", "encoding.json"
PAD, OOV, FIRST = 0, 1, 2  # local ids inside a field's block (as in dpn_jax.data.schema)
MAX_BUCKET = 4096


class ExportError(DpnError):
    """An exported-model directory is missing, incomplete or from another format version."""


def bucket_size(n: int, batch_size: int) -> int:
    """Rows a chunk of ``n`` is padded to: the next power of two, at most ``batch_size``, so a
    jitted function compiles O(log batch_size) shapes however ragged the requests are."""
    return max(1, min(batch_size, 1 << max(0, n - 1).bit_length()))


def pad_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pad every array to ``rows`` by repeating its last row (models score rows independently)."""
    n = len(next(iter(arrays.values())))
    if n == rows:
        return dict(arrays)
    idx = np.minimum(np.arange(rows), n - 1)
    return {k: v[idx] for k, v in arrays.items()}


def column_lists(rows: Any, names: list[str]) -> dict[str, Any]:
    """Columns ``names`` of a dict of columns, a pandas DataFrame or a pyarrow Table/RecordBatch
    (duck-typed: neither library is imported), as lists or numpy arrays."""
    if hasattr(rows, "column_names") and hasattr(rows, "column"):  # pyarrow Table / RecordBatch
        present = list(rows.column_names)
        get = lambda c: rows.column(c).to_pylist()  # noqa: E731
    elif hasattr(rows, "columns") and hasattr(rows, "iloc"):  # pandas DataFrame
        present = [str(c) for c in rows.columns]
        get = lambda c: rows[c].to_numpy()  # noqa: E731
    elif isinstance(rows, Mapping):
        present = list(rows)
        get = lambda c: rows[c]  # noqa: E731
    else:
        raise DataError(
            f"rows must be a dict of columns, a pandas DataFrame or a pyarrow Table, got {type(rows).__name__}"
        )
    for c in names:
        if c not in present:
            raise DataError(f"input column {c!r} is missing; got columns {present}")
    return {c: get(c) for c in names}


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None or NaN (pandas' missing)


# ----------------------------------------------------------------------------- raw encoding


class RawEncoder:
    """Raw columns -> the model's input arrays, from ``encoding.json`` (numpy only)."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state
        self.fields = list(state["fields"])
        self.infos = {f["name"]: f for f in state["schema"]["fields"]}
        self.by_name = {f["name"]: f for f in self.fields}
        self._index: dict[str, dict[str, int]] = {}
        self.n_cat = sum(1 for f in self.infos.values() if f["kind"] == "cat")
        self.n_num = sum(1 for f in self.infos.values() if f["kind"] == "num")

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(f["column"] for f in self.fields))

    def _vocab_index(self, name: str) -> dict[str, int]:
        if name not in self._index:
            vocab = self.by_name[name]["vocab"] or []
            self._index[name] = {tok: FIRST + i for i, tok in enumerate(vocab)}
        return self._index[name]

    def encode(self, rows: Any) -> dict[str, np.ndarray]:
        cols = column_lists(rows, self.columns)
        n = len(next(iter(cols.values()))) if cols else 0
        out = {"cat": np.zeros((n, self.n_cat), np.int32), "num": np.zeros((n, self.n_num), np.float32)}
        for f in self.fields:
            info, col = self.infos[f["name"]], cols[f["column"]]
            if len(col) != n:
                raise DataError(f"input columns have different lengths ({len(col)} vs {n} rows)")
            if f["kind"] == "num":
                z = (_floats(col, f["column"]) - f["mean"]) / f["std"]
                out["num"][:, info["column"]] = np.where(np.isfinite(z), z, 0.0)
            elif f["kind"] == "cat":
                if f["edges"] is not None:
                    local = bucketize(_floats(col, f["column"]), f["edges"], first=FIRST, missing=OOV)
                else:
                    index = self._vocab_index(f["name"])
                    local = np.array([index.get(_text(v), OOV) for v in _iter(col)], np.int64)
                out["cat"][:, info["column"]] = info["offset"] + local
            else:
                index = self._vocab_index(f["share_vocab"] or f["name"])
                seq = np.full((n, f["max_len"]), info["offset"] + PAD, np.int32)
                for i, cell in enumerate(_iter(col)):
                    toks = _seq_tokens(cell, f["sep"])[-f["max_len"]:]
                    seq[i, : len(toks)] = [info["offset"] + index.get(t, OOV) for t in toks]
                out[f"seq/{f['name']}"] = seq
        return out


def _iter(col: Any) -> list:
    if hasattr(col, "to_pylist"):  # a pyarrow Array / ChunkedArray
        return col.to_pylist()
    return col.tolist() if isinstance(col, np.ndarray) else list(col)


def _text(v: Any) -> str:
    return "" if is_missing(v) else v if type(v) is str else str(v)


def _seq_tokens(cell: Any, sep: str) -> list[str]:
    if is_missing(cell):
        return []
    parts = cell if isinstance(cell, (list, tuple, np.ndarray)) else str(cell).split(sep)
    return [t for t in (str(p).strip() for p in parts) if t]


def _floats(col: Any, name: str) -> np.ndarray:
    arr = col if isinstance(col, np.ndarray) else np.asarray(_iter(col), dtype=object)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64).reshape(-1)
    out = np.full(arr.size, np.nan)
    for i, v in enumerate(arr.reshape(-1).tolist()):
        if is_missing(v) or (isinstance(v, str) and not v.strip()):
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise DataError(f"numeric column {name!r} row {i + 1}: cannot parse {v!r} as a number") from None
    return out


# ----------------------------------------------------------------------------- the program


class ExportedModel:
    """A deserialized ``jax.export.Exported`` scoring function plus its input layout."""

    def __init__(self, exported: Any, inputs: list[dict], encoder: RawEncoder | None = None,
                 info: Mapping[str, Any] | None = None) -> None:
        self.exported = exported
        self.inputs = inputs  # [{"name": "cat", "dtype": "int32", "width": 7}, ...]
        self.encoder = encoder
        self.info = dict(info or {})
        self._call = jax.jit(exported.call)

    @property
    def input_names(self) -> list[str]:
        return [x["name"] for x in self.inputs]

    def predict(self, rows: Any, batch_size: int = 1024) -> np.ndarray:
        """Probabilities (float32, input order) for raw rows in the spec's format; a dict holding
        exactly the encoded arrays (``cat``, ``num``, ``seq/<name>``) is scored as is."""
        if isinstance(rows, Mapping) and set(self.input_names) <= set(rows) and not (
            self.encoder and set(self.encoder.columns) <= set(rows)
        ):
            return self.predict_encoded(rows, batch_size)
        if self.encoder is None:
            raise ExportError(f"this export has no {EXPORT_ENCODING}: pass the encoded arrays {self.input_names}")
        return self.predict_encoded(self.encoder.encode(rows), batch_size)

    def predict_encoded(self, arrays: Mapping[str, Any], batch_size: int = 1024) -> np.ndarray:
        batch = {}
        for x in self.inputs:
            if x["name"] not in arrays:
                raise DataError(f"encoded input {x['name']!r} is missing; expected {self.input_names}")
            a = np.asarray(arrays[x["name"]], dtype=x["dtype"])
            if a.ndim != 2 or a.shape[1] != x["width"]:
                raise DataError(f"encoded input {x['name']!r} has shape {a.shape}; expected [rows, {x['width']}]")
            batch[x["name"]] = a
        n = len(next(iter(batch.values())))
        out = []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in batch.items()}
            rows = len(chunk[self.inputs[0]["name"]])
            padded = pad_rows(chunk, bucket_size(rows, batch_size))
            out.append(np.asarray(self._call(*(padded[k] for k in self.input_names)))[:rows])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def load_exported(directory: str | Path) -> ExportedModel:
    """Load what ``dpn-jax export`` wrote; raises :class:`ExportError` naming the file at fault."""
    from jax import export

    d = Path(directory)
    meta_path = d / EXPORT_JSON
    if not meta_path.is_file():
        raise ExportError(f"{meta_path} not found: not an exported model; write one with "
                          "`dpn-jax export --model BUNDLE --out DIR`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{meta_path}: not valid JSON ({e.msg} at line {e.lineno}); re-export the bundle") from None
    if meta.get("format") != EXPORT_FORMAT or meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{meta_path}: export format {meta.get('format')!r} version {meta.get('format_version')!r} is not "
            f"readable by this dpn-jax (reads {EXPORT_FORMAT!r} version {EXPORT_FORMAT_VERSION}); "
            "re-export the bundle with this version"
        )
    for name in (EXPORT_PROGRAM, EXPORT_ENCODING):
        if not (d / name).is_file():
            raise ExportError(f"{d / name} is missing: the export is incomplete; re-run `dpn-jax export`")
    try:
        exported = export.deserialize(bytearray((d / EXPORT_PROGRAM).read_bytes()))
    except Exception as e:  # noqa: BLE001  (flatbuffers/version errors: one actionable line)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{d / EXPORT_PROGRAM}: cannot deserialize ({first}); re-export with jax "
                          f"{jax.__version__}") from None
    encoding = json.loads((d / EXPORT_ENCODING).read_text(encoding="utf-8"))
    return ExportedModel(exported, meta["inputs"], RawEncoder(encoding), meta)
