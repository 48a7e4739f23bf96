"""Fit encoders on the TRAIN split and turn raw columns into the arrays of :mod:`schema`.

Rules (all statistics come from train only, so valid/test never leak into the encoding):

* categorical: vocabulary ordered by frequency (desc), ties by token string; tokens seen fewer
  than ``min_count`` times map to OOV. A missing cell is the token ``""`` -- an ordinary category,
  so "missing" can carry signal (and is OOV at test time if train never had it).
* numeric with ``buckets``: edges fitted on train by :func:`dpn_jax.buckets.fit_bucket_edges`
  (quantiles; a value holding more than 1/buckets of the rows gets a bucket of its own); a value
  becomes local id ``FIRST + k`` of its bucket; missing/non-finite -> OOV. ``meta["bucket_stats"]``
  records each such field's bucket count and the largest id's share of train rows;
  :func:`bucket_notes` turns them into the log lines the runners print.
* numeric (dense): ``(x - mean) / std`` with train statistics (std 0 -> 1); missing -> 0 (the mean).
* sequence: cell split by ``sep`` (empty tokens dropped), the MOST RECENT ``max_len`` tokens kept
  (the last ones), right-padded with the pad id. Own vocabulary from all train tokens, or the
  ``share_vocab`` target's block (unknown tokens -> the target's OOV).

``oov_counts`` = how many values (sequence: tokens) were mapped to OOV per field; on valid/test
these are values unseen (or too rare) at train time, which the CLI logs.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Mapping
from itertools import repeat
from typing import Any, Literal

import numpy as np

from dpn_jax.buckets import bucketize, fit_bucket_edges, n_buckets
from dpn_jax.data import readers, transforms
from dpn_jax.data.schema import FIRST, OOV, Dataset, FieldInfo, Schema, Split
from dpn_jax.data.spec import DatasetSpec, FieldSpec
from dpn_jax.errors import DataError

ENCODER_FORMAT = 1  # bump when the JSON layout of FittedEncoders changes
# Bump when fitting gives other encoders for the same data (folded into the dataset cache key).
# 2: numeric buckets give mass points their own bucket (dpn_jax.buckets).
ENCODER_VERSION = 2
NEAR_CONSTANT_SHARE = 0.99  # a bucketised field whose one id holds this much of train is flagged


@dataclasses.dataclass
class FieldEncoder:
    """The fitted state of one field (JSON-serialisable; lookup dicts are rebuilt lazily)."""

    name: str
    kind: Literal["cat", "num", "seq"]
    column: str
    vocab: list[str] | None = None  # categorical / own-vocab sequence: local FIRST + i
    edges: list[float] | None = None  # bucketised numeric
    mean: float = 0.0  # dense numeric
    std: float = 1.0
    sep: str = ""  # sequence
    max_len: int = 0
    share_vocab: str | None = None
    transform: str | None = None  # a dpn_jax.data.transforms name applied to the raw column first
    _index: dict[str, int] | None = dataclasses.field(default=None, repr=False, compare=False)

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {tok: FIRST + i for i, tok in enumerate(self.vocab or [])}
        return self._index

    @property
    def n_buckets(self) -> int:
        return n_buckets(self.edges or [])

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("_index")
        return d


@dataclasses.dataclass
class FittedEncoders:
    """Everything needed to encode raw rows exactly like the training data (e.g. for serving)."""

    schema: Schema
    label: str  # the label column (optional in transform's input)
    fields: tuple[FieldEncoder, ...]  # in schema order

    def field(self, name: str) -> FieldEncoder:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def transform(self, raw: Mapping[str, Any]) -> Split:
        """Encode raw columns (column name -> sequence of values) into a split."""
        return self.transform_with_counts(raw)[0]

    def transform_with_counts(self, raw: Mapping[str, Any]) -> tuple[Split, dict[str, int]]:
        n = _num_rows(raw, [f.column for f in self.fields] + [self.label])
        out = _empty(self.schema, n)
        counts: dict[str, int] = {}
        for enc in self.fields:
            info = self.schema.field(enc.name)
            if enc.column not in raw:
                raise DataError(
                    f"column {enc.column!r} needed by field {enc.name!r} is missing; got columns {sorted(raw)}"
                )
            col = raw[enc.column]
            if enc.kind == "num":
                out["num"][:, info.column] = _standardise(
                    _to_float(col, enc.column), enc.mean, enc.std
                )
            elif enc.kind == "cat":
                if enc.edges is not None:
                    local = bucketize(_to_float(col, enc.column), enc.edges, first=FIRST, missing=OOV)
                elif enc.transform is not None:
                    local = _lookup(transforms.apply(enc.transform, col, enc.column), enc.index())
                else:
                    local = _lookup(_to_str(col), enc.index())
                counts[enc.name] = int(np.count_nonzero(local == OOV))
                out["cat"][:, info.column] = info.offset + local
            else:
                vocab_enc = self.field(enc.share_vocab) if enc.share_vocab else enc
                out[f"seq/{enc.name}"], counts[enc.name] = _encode_seq(
                    col, enc.sep, enc.max_len, vocab_enc.index(), info.offset
                )
        if self.label in raw:
            out["label"] = np.asarray(raw[self.label], dtype=np.float32).reshape(n)
        return out, counts

    def columns(self) -> dict[str, readers.ColumnKind]:
        """Raw input columns and how to read them (as :func:`columns_needed` does for a spec):
        numeric fields (dense or bucketised) as floats, everything else as text."""
        cols: dict[str, readers.ColumnKind] = {}
        for f in self.fields:
            kind: readers.ColumnKind = "float" if f.kind == "num" or f.edges is not None else "str"
            cols[f.column] = kind if cols.get(f.column, kind) == kind else "str"
        return cols

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ENCODER_FORMAT,
            "label": self.label,
            "schema": self.schema.to_json(),
            "fields": [f.to_json() for f in self.fields],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FittedEncoders:
        if d.get("format") != ENCODER_FORMAT:
            raise DataError(
                f"encoder state has format {d.get('format')!r}; this dpn-jax reads {ENCODER_FORMAT}"
            )
        return cls(
            schema=Schema.from_json(d["schema"]),
            label=d["label"],
            fields=tuple(FieldEncoder(**f) for f in d["fields"]),
        )


# ----------------------------------------------------------------------------- fitting


def columns_needed(spec: DatasetSpec) -> dict[str, readers.ColumnKind]:
    """Source columns to read and how: numeric fields as floats, everything else as text."""
    cols: dict[str, readers.ColumnKind] = {}
    for f in spec.fields:
        kind: readers.ColumnKind = "float" if f.type == "numeric" else "str"
        # A column used both as text and as a number is read as text and parsed by the encoder.
        cols[f.column] = kind if cols.get(f.column, kind) == kind else "str"
    return cols


def fit_encoders(spec: DatasetSpec, train: Mapping[str, Any]) -> FittedEncoders:
    """Fit every field on the train split and lay out the embedding table (schema)."""
    encs: dict[str, FieldEncoder] = {}
    for f in spec.fields:
        col = train[f.column]
        if f.type == "categorical":
            encs[f.name] = FieldEncoder(
                f.name, "cat", f.column, vocab=_fit_vocab(_to_str(col), f.min_count)
            )
        elif f.type == "numeric":
            x = _to_float(col, f.column)
            if len(x) and not np.isfinite(x).any():
                warn_empty_numeric(f.column, f.name, spec.source)
            if f.buckets > 0:
                encs[f.name] = FieldEncoder(f.name, "cat", f.column, edges=fit_bucket_edges(x, f.buckets))
            else:
                mean, std = _fit_moments(x)
                encs[f.name] = FieldEncoder(f.name, "num", f.column, mean=mean, std=std)
        else:
            vocab = None
            if f.share_vocab is None:
                vocab = _fit_vocab(_tokens(col, f.sep, None)[0], f.min_count)
            encs[f.name] = FieldEncoder(
                f.name,
                "seq",
                f.column,
                vocab=vocab,
                sep=f.sep,
                max_len=f.max_len,
                share_vocab=f.share_vocab,
            )
    schema = _layout(spec.fields, encs)
    ordered = tuple(encs[fi.name] for fi in schema.fields)
    return FittedEncoders(schema=schema, label=spec.label, fields=ordered)


def _layout(fields: tuple[FieldSpec, ...], encs: Mapping[str, FieldEncoder]) -> Schema:
    """Schema order: cat (incl. bucketised), num, seq. Offsets: cat blocks, then own seq blocks."""
    by_kind = {k: [f for f in fields if f.kind == k] for k in ("cat", "num", "seq")}
    infos: dict[str, FieldInfo] = {}
    offset = 0
    for col, f in enumerate(by_kind["cat"]):
        e = encs[f.name]
        size = FIRST + (e.n_buckets if e.edges is not None else len(e.vocab or []))
        infos[f.name] = FieldInfo(f.name, "cat", column=col, offset=offset, vocab_size=size)
        offset += size
    for col, f in enumerate(by_kind["num"]):
        infos[f.name] = FieldInfo(f.name, "num", column=col)
    for f in by_kind["seq"]:
        if f.share_vocab is not None:
            t = infos[f.share_vocab]
            infos[f.name] = FieldInfo(
                f.name,
                "seq",
                offset=t.offset,
                vocab_size=t.vocab_size,
                max_len=f.max_len,
                share_vocab=t.name,
            )
        else:
            size = FIRST + len(encs[f.name].vocab or [])
            infos[f.name] = FieldInfo(
                f.name, "seq", offset=offset, vocab_size=size, max_len=f.max_len
            )
            offset += size
    ordered = [infos[f.name] for k in ("cat", "num", "seq") for f in by_kind[k]]
    return Schema(fields=tuple(ordered), table_size=offset)


def warn_empty_numeric(column: str, field: str, source: str) -> None:
    """A numeric column with no value in any train row carries no information: say so."""
    warnings.warn(f"{source}: numeric column {column!r} (field {field!r}) is empty in every train "
                  "row; it is encoded as a constant (remove the field, or fill the column)",
                  stacklevel=3)  # fmt: skip


def _fit_vocab(tokens: list[str], min_count: int) -> list[str]:
    counts = Counter(tokens)
    kept = [t for t, c in counts.items() if c >= min_count]
    kept.sort(key=lambda t: (-counts[t], t))  # most frequent first, ties by token string
    return kept


def _fit_moments(x: np.ndarray) -> tuple[float, float]:
    ok = x[np.isfinite(x)]
    if ok.size == 0:
        return 0.0, 1.0
    mean, std = float(ok.mean()), float(ok.std())
    return mean, (std if std > 0 and np.isfinite(std) else 1.0)


# ----------------------------------------------------------------------------- transforming


def _to_str(col: Any) -> list[str]:
    """Text tokens with missing (None) as "" -- an ordinary category."""
    values = col.tolist() if isinstance(col, np.ndarray) else list(col)
    return ["" if v is None else v if type(v) is str else str(v) for v in values]


def _to_float(col: Any, name: str) -> np.ndarray:
    arr = np.asarray(col)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64).reshape(-1)
    out = np.full(arr.size, np.nan)
    for i, v in enumerate(arr.reshape(-1).tolist()):
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise DataError(
                f"numeric column {name!r} row {i + 1}: cannot parse {v!r} as a number"
            ) from None
    return out


def _lookup(tokens: list[str], index: Mapping[str, int]) -> np.ndarray:
    """Local ids; unknown -> OOV (a C-level dict lookup per token)."""
    return np.fromiter(map(index.get, tokens, repeat(OOV)), np.int64, len(tokens))


def _standardise(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    z = (x - mean) / std
    return np.where(np.isfinite(z), z, 0.0).astype(np.float32)


def _tokens(col: Any, sep: str, max_len: int | None) -> tuple[list[str], np.ndarray]:
    """Flattened tokens of every cell (the last max_len of each) and the per-row lengths."""
    flat: list[str] = []
    lengths = np.zeros(len(col), np.int64)
    for i, cell in enumerate(col):
        if cell is None:
            continue
        parts = cell if isinstance(cell, (list, tuple, np.ndarray)) else str(cell).split(sep)
        toks = [t for t in (str(p).strip() for p in parts) if t]
        if max_len is not None:
            toks = toks[-max_len:]  # left-truncate: the most recent behaviours are the last ones
        flat.extend(toks)
        lengths[i] = len(toks)
    return flat, lengths


def _encode_seq(
    col: Any, sep: str, max_len: int, index: Mapping[str, int], offset: int
) -> tuple[np.ndarray, int]:
    n = len(col)
    flat, lengths = _tokens(col, sep, max_len)
    local = _lookup(flat, index)
    out = np.full((n, max_len), offset, np.int32)  # offset + PAD
    rows = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, pos] = offset + local
    return out, int(np.count_nonzero(local == OOV))


def _empty(schema: Schema, n: int) -> Split:
    return {
        "cat": np.zeros((n, len(schema.cat_fields)), np.int32),
        "num": np.zeros((n, len(schema.numeric_fields)), np.float32),
        **{f"seq/{f.name}": np.full((n, f.max_len), f.pad_id, np.int32) for f in schema.seq_fields},
        "label": np.zeros((n,), np.float32),
    }


def _num_rows(raw: Mapping[str, Any], columns: list[str]) -> int:
    lens = {c: len(raw[c]) for c in columns if c in raw}
    if len(set(lens.values())) > 1:
        raise DataError(f"columns have different lengths: {lens}")
    return next(iter(lens.values()), 0)


# ----------------------------------------------------------------------------- whole dataset


def carve(n: int, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Row indices of train/valid/test carved from the train file(s): a seeded permutation,
    each part kept in file order (sequence data stays chronological)."""
    perm = np.random.default_rng(spec.split.seed).permutation(n)
    n_test = int(round(n * spec.split.test))
    n_valid = int(round(n * spec.split.valid))
    parts = {
        "test": perm[:n_test],
        "valid": perm[n_test : n_test + n_valid],
        "train": perm[n_test + n_valid :],
    }
    if parts["train"].size == 0:
        raise DataError(f"{spec.source}: the split leaves no training rows out of {n}")
    for role in ("valid", "test"):
        frac = getattr(spec.split, role)
        if (
            frac > 0 and parts[role].size == 0
        ):  # an empty eval split would only surface as NaN metrics
            raise DataError(
                f"{spec.source}: split.{role} = {frac:g} of {n} training rows is 0 rows; "
                f"raise the fraction or give a {role} file"
            )
    return {k: np.sort(v) for k, v in parts.items()}


def _split_files(spec: DatasetSpec, role: str) -> str:
    files = getattr(spec, role)
    if files:
        return ", ".join(str(p) for p in files)
    return "carved from " + ", ".join(str(p) for p in spec.train)


def check_classes(n: int, pos: int, role: str, where: str, label: str = "label") -> None:
    """``n`` rows of which ``pos`` positive: the train and valid splits need both classes (no
    loss signal or AUC otherwise), a DataError naming the split and its files; a one-class test
    split is only warned about."""
    if n == 0 or 0 < pos < n:
        return
    only = "1" if pos else "0"
    msg = (f"the {role} split ({where}) has label {label!r} = {only} in all its {n:,} rows; "
           f"no {'0' if pos else '1'}s")
    if role == "test":
        warnings.warn(f"{msg}: its AUC is undefined", stacklevel=3)
        return
    raise DataError(f"{msg}: the train and valid splits need both classes (0 and 1)")


def build_dataset(spec: DatasetSpec) -> Dataset:
    """Read, split, fit on train, encode every split. (Caching lives in :mod:`cache`.)"""
    cols = columns_needed(spec)

    def read(paths: tuple) -> dict[str, np.ndarray]:
        # Looked up through the module so tests can monkeypatch readers.read_table.
        return readers.read_table(list(paths), spec.format, cols, sep=spec.sep, label=spec.label,
                                  label_values=spec.label_values)  # fmt: skip

    source = read(spec.train)
    idx = carve(len(source[spec.label]), spec)
    raw = {k: {c: a[idx[k]] for c, a in source.items()} for k in ("train", "valid", "test")}
    for role in ("valid", "test"):
        if getattr(spec, role):
            raw[role] = read(getattr(spec, role))

    for role in ("train", "valid", "test"):
        y = raw[role][spec.label]
        check_classes(len(y), int(np.count_nonzero(y > 0)), role, _split_files(spec, role), spec.label)
    enc = fit_encoders(spec, raw["train"])
    splits: dict[str, Split] = {}
    oov: dict[str, dict[str, int]] = {}
    for role in ("train", "valid", "test"):
        splits[role], oov[role] = enc.transform_with_counts(raw[role])
    meta = {
        "source": spec.source,
        "spec": json.loads(spec.canonical_json()),
        "oov_counts": oov,
        "bucket_edges": {e.name: e.edges for e in enc.fields if e.edges is not None},
        "bucket_stats": bucket_stats(enc, splits["train"]),
        "numeric_stats": {
            e.name: {"mean": e.mean, "std": e.std} for e in enc.fields if e.kind == "num"
        },
        "encoders": enc.to_json(),  # FittedEncoders.from_json(ds.meta["encoders"]) re-encodes raw rows
    }
    return Dataset(spec.name, enc.schema, splits["train"], splits["valid"], splits["test"], meta)


def bucket_stats(enc: FittedEncoders, train: Split) -> dict[str, dict[str, Any]]:
    """Per bucketised numeric field: the buckets fitted and the shares of the encoded train rows
    in its largest bucket and in OOV (missing values)."""
    out: dict[str, dict[str, Any]] = {}
    n = max(len(train["label"]), 1)
    for e in enc.fields:
        if e.edges is None:
            continue
        info = enc.schema.field(e.name)
        local = np.asarray(train["cat"][:, info.column], np.int64) - info.offset
        counts = np.bincount(local, minlength=info.vocab_size)
        out[e.name] = {
            "buckets": e.n_buckets,
            "largest_share": float(counts[FIRST:].max(initial=0) / n),
            "missing_share": float(counts[OOV] / n),
        }
    return out


def bucket_notes(meta: Mapping[str, Any]) -> list[str]:
    """Log lines for ``meta["bucket_stats"]``: one per bucketised numeric field, plus a warning
    for a field that one id (a bucket, or OOV) holds :data:`NEAR_CONSTANT_SHARE` of train rows
    of -- it is (nearly) constant after encoding and carries (almost) no information."""
    lines = []
    for name, s in (meta.get("bucket_stats") or {}).items():
        missing = f", missing (OOV) {s['missing_share']:.1%}" if s["missing_share"] else ""
        lines.append(f"data  bucketised {name}: {s['buckets']} buckets, largest holds "
                     f"{s['largest_share']:.1%} of train rows{missing}")
        top = max(s["largest_share"], s["missing_share"])
        if top >= NEAR_CONSTANT_SHARE:
            lines.append(f"warn  bucketised {name} is nearly constant: one id holds {top:.1%} of "
                         "train rows, so the field carries almost no information")
    return lines
