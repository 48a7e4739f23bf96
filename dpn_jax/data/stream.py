"""Two-pass streaming encoder: raw chunks in, the cached dataset layout of :mod:`cache` out.

The built-in paper datasets (Criteo: 45M rows, Avazu: 40M) do not fit in memory as Python
strings, so they are encoded in bounded memory:

* pass 1 reads every chunk once and counts, on TRAIN rows only, each categorical token
  (``pyarrow.compute.value_counts`` per chunk, merged by a group-by every few chunks) and the
  moments of each dense numeric field; it also counts the rows of each split;
* the vocabulary is fitted exactly as :func:`dpn_jax.data.encode.fit_encoders` does (tokens
  seen ``>= min_count`` times, most frequent first, ties by the token's code points; a missing
  cell is the token ``""``), so a streamed dataset equals the in-memory one bit for bit;
* pass 2 re-reads the chunks and writes ``cat``/``num``/``label`` of each split straight into
  ``.npy`` memory maps (``pyarrow.compute.index_in`` looks tokens up in C++).

Memory: one chunk of raw columns plus the token counts (O(distinct tokens), not O(rows)).
The result is written into a temporary directory and renamed into place, like :func:`cache.save`,
so an interrupted prepare leaves nothing half-written behind; :func:`cache.load` memory-maps it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpn_jax import faults
from dpn_jax.data import cache, integrity
from dpn_jax.data.encode import (
    FieldEncoder,
    FittedEncoders,
    _layout,
    check_classes,
    warn_empty_numeric,
)
from dpn_jax.data.schema import FIRST, OOV, Dataset
from dpn_jax.errors import DataError

ROLES = ("train", "valid", "test")
_LOG_MIN_BYTES = 64 << 20  # without a terminal, log progress lines only for inputs this large
_COMPACT_EVERY = 8  # merge the per-chunk token counts after this many chunks (bounds memory)


@dataclasses.dataclass(frozen=True)
class StreamField:
    """One encoded field: ``cat`` (text tokens, vocabulary fitted on train) or ``num`` (dense
    float, standardised with the train mean/std; missing -> 0, the mean)."""

    name: str
    kind: Literal["cat", "num"]
    min_count: int = 1
    column: str | None = None  # the raw column serving reads (default: name)
    transform: str | None = None  # dpn_jax.data.transforms name the chunks already applied


class Chunk(NamedTuple):
    """A block of rows after the dataset's own preprocessing.

    ``columns``: field name -> pyarrow string array (cat; null = missing) or float64 array (num).
    ``label``: float32 0/1. ``role``: one split for the whole chunk (0 train, 1 valid, 2 test) or
    a uint8 array with one per row."""

    columns: dict[str, pa.Array]
    label: np.ndarray
    role: int | np.ndarray


ChunkSource = Callable[["Progress"], Iterable[Chunk]]  # called once per pass


class Progress:
    """Bytes read of the source files, shown as a rich bar on a terminal and as a log line every
    ~10% elsewhere (``log``)."""

    def __init__(self, total_bytes: int, enabled: bool | None, log: Callable[[str], None]):
        self.total = max(int(total_bytes), 1)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.log = log
        self._bar = None
        self._task = None
        self._done = 0
        self._rows = 0
        self._t0 = time.perf_counter()
        self._next_log = 0.1
        self._desc = ""
        self._total_rows: int | None = None

    def start(self, desc: str, total_rows: int | None = None) -> None:
        """A new pass. With ``total_rows`` (known in pass 2) the fraction done counts rows;
        otherwise bytes read, which run ahead of the rows processed by pyarrow's read-ahead."""
        self._desc, self._done, self._rows, self._next_log = desc, 0, 0, 0.1
        self._total_rows = total_rows
        self._t0 = time.perf_counter()
        if self.enabled and self._bar is None:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,  # fmt: skip
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TextColumn("{task.fields[rate]} rows/s"), TimeRemainingColumn(), transient=True)  # fmt: skip
            self._bar.start()
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(desc, total=self.total, rate="-")

    def advance(self, nbytes: int, rows: int = 0) -> None:
        self._done += nbytes
        self._rows += rows
        rate = f"{self._rows / max(time.perf_counter() - self._t0, 1e-9):,.0f}"
        frac = (self._rows / max(self._total_rows, 1) if self._total_rows is not None
                else self._done / self.total)  # fmt: skip
        frac = min(frac, 1.0)
        if self._bar is not None:
            self._bar.update(self._task, completed=frac * self.total, rate=rate)
        elif rows and self.total >= _LOG_MIN_BYTES and frac >= self._next_log:
            self.log(f"{self._desc}: {frac:.0%} ({self._rows:,} rows, {rate} rows/s)")
            while self._next_log <= frac:
                self._next_log += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# ----------------------------------------------------------------------------- pass 1: statistics


class _Stats:
    def __init__(self, fields: Sequence[StreamField]):
        self.fields = fields
        self.rows = [0, 0, 0]
        self.positives = [0, 0, 0]
        self.parts: dict[str, list[pa.Table]] = {f.name: [] for f in fields if f.kind == "cat"}
        self.moments = {f.name: np.zeros(3) for f in fields if f.kind == "num"}  # n, mean, M2

    def add(self, chunk: Chunk) -> None:
        n = len(chunk.label)
        roles = _roles(chunk.role, n)
        for r in range(3):
            self.rows[r] += int(np.count_nonzero(roles == r))
            self.positives[r] += int(np.count_nonzero((roles == r) & (chunk.label > 0)))
        train = roles == 0
        if not train.any():
            return
        mask = pa.array(train)
        for f in self.fields:
            col = chunk.columns[f.name].filter(mask)
            if f.kind == "cat":
                vc = pc.value_counts(col.fill_null(""))
                part = pa.table({"v": vc.field("values"), "c": vc.field("counts")})
                self.parts[f.name].append(part)
                if len(self.parts[f.name]) >= _COMPACT_EVERY:
                    self.parts[f.name] = [_merge(self.parts[f.name])]
            else:
                x = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
                x = x[np.isfinite(x)]
                if x.size:  # Chan et al.'s pairwise update of (n, mean, M2): no cancellation
                    n0, m0, q0 = self.moments[f.name]
                    n1, m1 = x.size, float(x.mean())
                    q1 = float(np.square(x - m1).sum())
                    d, tot = m1 - m0, n0 + n1
                    self.moments[f.name] = np.array(
                        [tot, m0 + d * n1 / tot, q0 + q1 + d * d * n0 * n1 / tot])

    def check(self, source: str) -> None:
        """Both classes in train and valid; a warning for a numeric field without any value."""
        for r, role in enumerate(ROLES):
            check_classes(self.rows[r], self.positives[r], role, source)
        for f, (n, _, _) in self.moments.items():
            if n == 0:
                warn_empty_numeric(f, f, source)

    def encoders(self, label: str) -> FittedEncoders:
        encs: dict[str, FieldEncoder] = {}
        for f in self.fields:
            if f.kind == "cat":
                counts = _merge(self.parts[f.name]) if self.parts[f.name] else None
                vocab: list[str] = []
                if counts is not None and counts.num_rows:
                    kept = counts.filter(pc.greater_equal(counts["c"], f.min_count))
                    # Same order as encode._fit_vocab: count desc, then the token (UTF-8 byte
                    # order == code point order == Python's str order).
                    order = pc.sort_indices(kept, sort_keys=[("c", "descending"), ("v", "ascending")])
                    vocab = kept["v"].take(order).to_pylist()
                encs[f.name] = FieldEncoder(f.name, "cat", f.column or f.name, vocab=vocab,
                                            transform=f.transform)  # fmt: skip
            else:
                n, mean, m2 = self.moments[f.name]
                std = float(np.sqrt(m2 / n)) if n else 0.0
                std = std if std > 0 and np.isfinite(std) else 1.0
                encs[f.name] = FieldEncoder(f.name, "num", f.column or f.name, mean=float(mean), std=std)
        schema = _layout(tuple(self.fields), encs)  # the in-memory encoder's table layout
        return FittedEncoders(schema, label, tuple(encs[fi.name] for fi in schema.fields))


def _merge(parts: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return t.group_by("v").aggregate([("c", "sum")]).rename_columns(["v", "c"])


def _roles(role: int | np.ndarray, n: int) -> np.ndarray:
    if isinstance(role, (int, np.integer)):
        return np.full(n, int(role), np.uint8)
    role = np.asarray(role)
    if role.shape != (n,):
        raise ValueError(f"chunk role has shape {role.shape}, expected ({n},)")
    return role


# ----------------------------------------------------------------------------- pass 2: encode


class _NpyAppender:
    """A ``.npy`` file of known shape written front to back: plain appends instead of a memory
    map, so the pages written do not count against the process (and need no random access)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape, self.written = path, np.dtype(dtype), shape, 0
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.out = integrity.HashingWriter(self.fh)  # the checksum is computed while writing
        self.out.write(integrity.header_bytes(self.dtype, shape))

    def append(self, rows: np.ndarray) -> None:
        self.out.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.written += rows.shape[0]

    def close(self) -> dict:
        """Close the file; returns its checksum record (:mod:`dpn_jax.data.integrity`)."""
        self.fh.close()
        if self.written != self.shape[0]:
            raise AssertionError(f"{self.fh.name}: wrote {self.written} rows of {self.shape[0]}")
        return integrity.make_record(self.path, self.dtype, self.shape, self.out)


def encode_stream(
    name: str,
    fields: Sequence[StreamField],
    source: ChunkSource,
    directory: str | Path,
    *,
    total_bytes: int,
    meta: dict | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Encode ``source`` (read twice) into ``directory`` (created atomically) and load it."""
    final = Path(directory)
    if (final / "meta.json").is_file():
        try:
            ds = cache.load(final)
            ds.meta["cache"] = {"dir": str(final), "hit": True}
            return ds
        except (DataError, OSError, ValueError, KeyError) as e:  # damaged: encode again
            warnings.warn(f"re-encoding the dataset cache {final}: {e}", stacklevel=2)
            shutil.rmtree(final, ignore_errors=True)
    bar = Progress(total_bytes, progress, log)
    try:
        stats = _Stats(fields)
        bar.start(f"{name}: counting")
        for chunk in source(bar):
            stats.add(chunk)
            bar.advance(0, len(chunk.label))
        for role, n in zip(("valid", "test"), stats.rows[1:], strict=True):
            if n == 0:
                raise DataError(f"{name}: the {role} split is empty after reading the source files")
        if stats.rows[0] == 0:
            raise DataError(f"{name}: no training rows after reading the source files")
        stats.check((meta or {}).get("source", name))
        enc = stats.encoders(label="label")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            oov, checksums = _write(enc, stats.rows, source, tmp, bar, name)
            full_meta = {
                **(meta or {}),
                "oov_counts": oov,
                "numeric_stats": {e.name: {"mean": e.mean, "std": e.std}
                                  for e in enc.fields if e.kind == "num"},
                "encoders": enc.to_json(),
            }  # fmt: skip
            (tmp / "meta.json").write_text(json.dumps({
                "cache_version": cache.CACHE_VERSION, "name": name, "schema": enc.schema.to_json(),
                "arrays": {r: ["cat", "label", "num"] for r in ROLES}, "checksums": checksums,
                "meta": full_meta,
            }), encoding="utf-8")  # fmt: skip
            try:
                faults.point("rename")
                os.rename(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        bar.close()
    ds = cache.load(final)
    ds.meta["cache"] = {"dir": str(final), "hit": False}
    return ds


def _write(enc: FittedEncoders, rows: list[int], source: ChunkSource, tmp: Path, bar: Progress,
           name: str) -> tuple[dict[str, dict[str, int]], dict[str, dict]]:  # fmt: skip
    """Pass 2: the arrays of every split; returns the OOV counts and each file's checksum."""
    schema = enc.schema
    n_cat, n_num = len(schema.cat_fields), len(schema.numeric_fields)
    out = {}
    for r, role in enumerate(ROLES):
        (tmp / role).mkdir()
        out[role] = {
            "cat": _NpyAppender(tmp / role / "cat.npy", np.int32, (rows[r], n_cat)),
            "num": _NpyAppender(tmp / role / "num.npy", np.float32, (rows[r], n_num)),
            "label": _NpyAppender(tmp / role / "label.npy", np.float32, (rows[r],)),
        }  # fmt: skip
    vocab = {e.name: pa.array(e.vocab or [], pa.string()) for e in enc.fields if e.kind == "cat"}
    cursor = [0, 0, 0]
    oov = {role: {f.name: 0 for f in schema.cat_fields} for role in ROLES}
    bar.start(f"{name}: encoding", total_rows=sum(rows))
    for chunk in source(bar):
        n = len(chunk.label)
        bar.advance(0, n)
        roles = _roles(chunk.role, n)
        cat = np.empty((n, n_cat), np.int32)
        num = np.empty((n, n_num), np.float32)
        for info in schema.fields:
            col = chunk.columns[info.name]
            if info.kind == "cat":
                idx = pc.index_in(col.fill_null(""), value_set=vocab[info.name])
                local = np.asarray(idx.fill_null(OOV - FIRST).to_numpy(zero_copy_only=False)) + FIRST
                cat[:, info.column] = info.offset + local
                is_oov = local == OOV
                for r, role in enumerate(ROLES):
                    oov[role][info.name] += int(np.count_nonzero(is_oov & (roles == r)))
            else:
                e = enc.field(info.name)
                x = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
                z = (x - e.mean) / e.std
                num[:, info.column] = np.where(np.isfinite(z), z, 0.0)
        for r, role in enumerate(ROLES):
            sel = roles == r
            k = int(np.count_nonzero(sel))
            if not k:
                continue
            hi = cursor[r] + k
            if hi > rows[r]:
                raise DataError(f"{name}: the source changed between the two passes (more "
                                f"{role} rows the second time); prepare again")  # fmt: skip
            dst = out[role]
            dst["cat"].append(cat[sel])
            dst["num"].append(num[sel])
            dst["label"].append(chunk.label[sel])
            cursor[r] = hi
        faults.point("chunk")
    if cursor != rows:
        raise DataError(f"{name}: the source changed between the two passes ({cursor} rows "
                        f"the second time, {rows} the first); prepare again")  # fmt: skip
    checksums = {f"{role}/{key}.npy": a.close() for role, arrays in out.items()
                 for key, a in arrays.items()}  # fmt: skip
    return oov, checksums
