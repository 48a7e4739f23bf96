"""Checksums of the ``.npy`` files dpn-jax writes, and the checks made when they are read back.

Every array file is hashed (blake2b) as it is written. Its record (kept in the cache's
``meta.json`` or a shard directory's ``index.json``) holds the file size, the dtype and shape its
header must declare, the hash of the whole file and the hash of a fixed sample of blocks.

* :func:`quick_problem` (on every load): size, header and the sampled hash. It reads at most
  ``blocks x BLOCK`` bytes however large the file, so memory-mapped multi-GB arrays stay cheap
  to open; a file no larger than the sample is hashed whole.
* :func:`full_problem` (``dpn-jax data verify``): the hash of every byte.

:func:`id_problems` checks what a checksum cannot vouch for when the writer itself was wrong:
every categorical and sequence id inside its field's block of the embedding table, labels 0/1,
numeric values finite.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.data.schema import Schema, Split

BLOCK = 64 << 10  # bytes per sampled block
SAMPLE_BLOCKS = 64  # blocks hashed on load: 4 MiB per file at most
_ROWS = 1 << 18  # rows per chunk when scanning ids


def _hasher() -> Any:
    return hashlib.blake2b(digest_size=20)


class HashingWriter:
    """A write-only file object that hashes what passes through it (``np.lib.format`` writes
    a non-OS file object in chunks through ``write``)."""

    def __init__(self, fh: Any):
        self.fh, self.hash, self.bytes = fh, _hasher(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.bytes += len(data)
        return self.fh.write(data)


def header_bytes(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header (magic included) that :func:`save_npy` writes for this array."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})  # fmt: skip
    return buf.getvalue()


def save_npy(path: str | Path, arr: np.ndarray, blocks: int = SAMPLE_BLOCKS) -> dict[str, Any]:
    """Write ``arr`` as a ``.npy`` file, hashing it on the way; returns its record."""
    arr = np.ascontiguousarray(arr)
    with open(path, "wb") as fh:
        w = HashingWriter(fh)
        w.write(header_bytes(arr.dtype, arr.shape))
        if arr.size:
            step = max(1, (16 << 20) // max(arr.itemsize * int(np.prod(arr.shape[1:])), 1))
            for start in range(0, arr.shape[0], step):  # row chunks: no full-size bytes copy
                w.write(arr[start:start + step].tobytes())
    return make_record(path, arr.dtype, arr.shape, w, blocks)


def make_record(path: str | Path, dtype: Any, shape: tuple[int, ...], written: HashingWriter,
                blocks: int = SAMPLE_BLOCKS) -> dict[str, Any]:
    """The record of a file just written through ``written``; the sampled hash reads the few
    blocks back (they are still in the page cache)."""
    return {
        "bytes": written.bytes,
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "shape": [int(s) for s in shape],
        "blake2b": written.hash.hexdigest(),
        "sample": {"blocks": blocks, "block": BLOCK,
                   "blake2b": sampled_hash(path, written.bytes, blocks, BLOCK)},
    }  # fmt: skip


def sampled_hash(path: str | Path, size: int, blocks: int, block: int) -> str:
    """blake2b of ``blocks`` blocks spread evenly over the file (the first and last included);
    of the whole file when it is no larger than the sample."""
    h = _hasher()
    with open(path, "rb") as fh:
        if size <= blocks * block:
            h.update(fh.read())
        else:
            for off in np.linspace(0, size - block, blocks).astype(np.int64).tolist():
                fh.seek(off)
                h.update(fh.read(block))
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    h = _hasher()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _header(path: Path) -> tuple[str, list[int], bool]:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
    return np.lib.format.dtype_to_descr(dtype), [int(s) for s in shape], bool(fortran)


def _describe(descr: Any, shape: list[int]) -> str:
    return f"{np.dtype(descr).name} {tuple(shape)}"


def quick_problem(path: str | Path, record: Mapping[str, Any] | None) -> str | None:
    """What is wrong with ``path`` (size, header, sampled hash), or None."""
    path = Path(path)
    if record is None:
        return "no checksum was recorded for it (written by an older dpn-jax)"
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"is {size:,} bytes, {record['bytes']:,} when written (truncated or replaced)"
    try:
        descr, shape, fortran = _header(path)
    except (ValueError, OSError) as e:
        return f"has no readable .npy header ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if descr != record["descr"] or shape != record["shape"] or fortran:
        return (f"header declares {_describe(descr, shape)}, but {_describe(record['descr'], record['shape'])} "
                "was written")  # fmt: skip
    s = record["sample"]
    if sampled_hash(path, size, s["blocks"], s["block"]) != s["blake2b"]:
        return "content differs from what was written (sampled checksum mismatch)"
    return None


def full_problem(path: str | Path, record: Mapping[str, Any] | None) -> str | None:
    """:func:`quick_problem`, then the checksum of every byte."""
    problem = quick_problem(path, record)
    if problem is None and file_hash(path) != record["blake2b"]:  # type: ignore[index]
        problem = "content differs from what was written (checksum mismatch)"
    return problem


# ----------------------------------------------------------------------------- ids vs schema


def _column_bounds(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min and max of a 2-D array, read in row chunks (memory maps stay bounded)."""
    lo = np.full(arr.shape[1], np.iinfo(np.int64).max)
    hi = np.full(arr.shape[1], np.iinfo(np.int64).min)
    for start in range(0, arr.shape[0], _ROWS):
        chunk = np.asarray(arr[start:start + _ROWS])
        lo = np.minimum(lo, chunk.min(axis=0))
        hi = np.maximum(hi, chunk.max(axis=0))
    return lo, hi


def _first_row(arr: np.ndarray, bad) -> int:
    for start in range(0, arr.shape[0], _ROWS):
        hit = np.flatnonzero(bad(np.asarray(arr[start:start + _ROWS])))
        if hit.size:
            return start + int(hit[0])
    return -1


def id_problems(schema: Schema, split: Split, where: Mapping[str, str]) -> list[str]:
    """Every id of a split inside its field's block ``[offset, offset + vocab_size)``, labels
    0/1 and numeric values finite. ``where[key]`` names the file of array ``key``."""
    out: list[str] = []
    n = int(split["label"].shape[0])
    if n == 0:
        return out
    checks: list[tuple[str, np.ndarray, list]] = []  # key, 2-D ids, [(field, column)]
    cat = split.get("cat")
    if cat is not None and cat.ndim == 2 and cat.shape[1]:
        checks.append(("cat", cat, [(f, f.column) for f in schema.cat_fields]))
    for f in schema.seq_fields:
        arr = split.get(f"seq/{f.name}")
        if arr is not None and arr.ndim == 2 and arr.shape[1]:
            checks.append((f"seq/{f.name}", arr, [(f, None)]))
    for key, arr, fields in checks:
        lo, hi = _column_bounds(arr)
        for f, col in fields:
            cols = slice(None) if col is None else slice(col, col + 1)
            first, last = f.offset, f.offset + f.vocab_size - 1
            if lo[cols].min() < first or hi[cols].max() > last:
                row = _first_row(arr, lambda c, cols=cols, a=first, b=last:
                                 ((c[:, cols] < a) | (c[:, cols] > b)).any(axis=1))  # fmt: skip
                value = np.asarray(arr[row, cols]).reshape(-1)
                value = int(value[(value < first) | (value > last)][0])
                out.append(f"{where[key]}: field {f.name!r} holds id {value} at row {row + 1}; its "
                           f"ids are {first}..{last} (its block of {f.vocab_size} rows)")  # fmt: skip
    label = split["label"]
    bad = _first_row(label.reshape(-1, 1), lambda c: ~((c == 0) | (c == 1)).any(axis=1))
    if bad >= 0:
        out.append(f"{where['label']}: label {float(label[bad])!r} at row {bad + 1}; labels are 0 or 1")
    num = split.get("num")
    if num is not None and num.ndim == 2 and num.shape[1]:
        bad = _first_row(num, lambda c: ~np.isfinite(c).all(axis=1))
        if bad >= 0:
            out.append(f"{where['num']}: a non-finite value at row {bad + 1}; encoded numeric "
                       "values are finite")  # fmt: skip
    return out
