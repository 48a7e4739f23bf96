"""On-disk cache of encoded datasets: one ``.npy`` per array, memory-mapped on load.

Layout: ``<cache_dir>/<name>-<key>/{meta.json, train/cat.npy, train/seq/<field>.npy, ...}`` where
``key`` hashes the spec's canonical JSON, the sha256 of every input file's CONTENT,
:data:`CACHE_VERSION` and the encoder's ``ENCODER_VERSION`` -- editing a data file or the spec
(or a new way of fitting encoders) gives a new directory, never a stale hit.
A cache is written into a temporary directory and renamed into place, so an interrupted run
leaves no half-written cache (at worst an orphan ``.tmp-*`` directory, which is ignored).

``meta.json`` records a checksum of every array file (:mod:`dpn_jax.data.integrity`). A load
checks each file's size, header and a sample of its blocks, and every id against the schema;
a cache that fails is re-encoded with a warning naming the file. ``dpn-jax data verify`` checks
every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dpn_jax import faults
from dpn_jax.data import integrity
from dpn_jax.data.encode import ENCODER_VERSION
from dpn_jax.data.schema import Dataset, Schema, Split
from dpn_jax.data.spec import DatasetSpec
from dpn_jax.errors import DataError

CACHE_VERSION = 1  # bump whenever the encoding changes, to invalidate every old cache
SPLITS = ("train", "valid", "test")


def default_cache_dir() -> Path:
    env = os.environ.get("DPN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpn_jax"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(spec: DatasetSpec) -> str:
    h = hashlib.sha256()
    h.update(f"dpn-jax-cache-v{CACHE_VERSION}-encoder-v{ENCODER_VERSION}\n".encode())
    h.update(spec.canonical_json().encode())
    for role, path in spec.files():
        h.update(f"\n{role}:{file_sha256(path)}".encode())
    return h.hexdigest()[:20]


def cache_path(spec: DatasetSpec, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{spec.name}-{cache_key(spec)}"


def save(ds: Dataset, directory: str | Path) -> Path:
    """Write ``ds`` atomically to ``directory`` (which must not exist yet); returns it."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        checksums = {}
        for role, split in ds.splits():
            for key, arr in split.items():
                rel = f"{role}/{key}.npy"  # "seq/<name>" -> a seq/ sub-directory
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                checksums[rel] = integrity.save_npy(tmp / rel, arr)
        meta = {
            "cache_version": CACHE_VERSION,
            "name": ds.name,
            "schema": ds.schema.to_json(),
            "arrays": {role: sorted(split) for role, split in ds.splits()},
            "checksums": checksums,
            "meta": {k: v for k, v in ds.meta.items() if k != "cache"},
        }
        (tmp / "meta.json").write_text(
            json.dumps(meta), encoding="utf-8"
        )  # last: marks completeness
        try:
            faults.point("rename")
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer's finished copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_meta(d: Path) -> dict:
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    if meta.get("cache_version") != CACHE_VERSION:
        raise DataError(f"{d}: cache version {meta.get('cache_version')} != {CACHE_VERSION}")
    return meta


def problems(directory: str | Path, full: bool = False) -> list[str]:
    """Everything wrong with a cache directory, one line each naming the file: each array's
    size, header and checksum (sampled, or of every byte with ``full``), then every id against
    the schema. Empty when the cache is sound."""
    d = Path(directory)
    try:
        meta = _read_meta(d)
    except (OSError, ValueError) as e:
        return [f"{d / 'meta.json'}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    return _check(d, meta, full)[0]


def _check(d: Path, meta: dict, full: bool) -> tuple[list[str], Dataset | None]:
    check = integrity.full_problem if full else integrity.quick_problem
    sums = meta.get("checksums", {})
    found = []
    for role, keys in meta["arrays"].items():
        for key in keys:
            rel = f"{role}/{key}.npy"
            problem = check(d / rel, sums.get(rel))
            if problem is not None:
                found.append(f"{d / rel}: {problem}")
    if found:  # ids are only worth scanning in files that hold what was written
        return found, None
    ds = _open(d, meta)
    for role, split in ds.splits():
        where = {k: str(d / role / f"{k}.npy") for k in split}
        found += integrity.id_problems(ds.schema, split, where)
    return found, ds


def _open(d: Path, meta: dict) -> Dataset:
    splits: dict[str, Split] = {
        role: {key: np.load(d / role / f"{key}.npy", mmap_mode="r") for key in keys}
        for role, keys in meta["arrays"].items()
    }
    return Dataset(
        name=meta["name"],
        schema=Schema.from_json(meta["schema"]),
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        meta=meta["meta"],
    )


def load(directory: str | Path) -> Dataset:
    """Load a cached dataset; arrays are read-only memory maps. The checks of :func:`problems`
    (sampled checksums) run first: a DataError names the first file that fails."""
    d = Path(directory)
    found, ds = _check(d, _read_meta(d), full=False)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise DataError(found[0] + more)
    assert ds is not None
    return ds


def cached_dataset(
    spec: DatasetSpec, build: Callable[[DatasetSpec], Dataset], cache_dir: str | Path | None = None
) -> Dataset:
    """Load ``spec``'s encoded dataset from the cache, or build it and store it.

    ``meta["cache"]`` records the directory and whether it was a hit."""
    directory = cache_path(spec, cache_dir)
    if (directory / "meta.json").is_file():
        try:
            ds = load(directory)
            ds.meta["cache"] = {"dir": str(directory), "hit": True}
            return ds
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"re-encoding the dataset cache {directory}: {e}", stacklevel=2)
            shutil.rmtree(directory, ignore_errors=True)
    ds = build(spec)
    try:
        directory = save(ds, directory)
        ds = load(directory)  # same memory-mapped arrays on a miss and on a hit
    except OSError as e:  # e.g. a read-only home: still usable, just not cached
        warnings.warn(f"could not write dataset cache {directory}: {e}", stacklevel=2)
        ds.meta["cache"] = {"dir": None, "hit": False}
        return ds
    ds.meta["cache"] = {"dir": str(directory), "hit": False}
    return ds
