"""Data layer: load an encoded :class:`Dataset` and iterate over it in batches.

Usage::

    ds = load_dataset("frappe")                # built-in (libfm files in the data dir)
    ds = load_dataset("path/to/spec.yaml")     # any csv / parquet / libfm data, see spec.py
    ds = load_dataset("synthetic", n=10_000)   # generated (dpn_jax.data.synthetic)
    ds = load_dataset("amazon_grocery", max_len=50)  # behaviour logs -> DIN rows (behaviour.py)
    ds = load_dataset("criteo_x1")             # the paper's datasets, streamed (tabular_builtins.py)
    for batch in batches(ds.train, 1024, shuffle=True, seed=0, epoch=e): ...
    for batch in padded_batches(ds.test, 4096): ...   # every row once, batch["mask"] marks real rows
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.data import cache, encode
from dpn_jax.data.encode import FittedEncoders, build_dataset, fit_encoders
from dpn_jax.data.frappe import find_data_dir, load_frappe
from dpn_jax.data.schema import Dataset, FieldInfo, Schema, Split, split_len
from dpn_jax.data.spec import DEFAULT_SEED, DatasetSpec, FieldSpec, load_spec, parse_spec
from dpn_jax.errors import DataError

# Behaviour datasets (dpn_jax.data.behaviour): DIN-style rows built from real logs / fixtures.
BEHAVIOUR_BUILTIN = (
    "amazon_videogames", "amazon_grocery", "amazon_instruments", "amazon_electronics",
    "amazon_books", "amazon_electronics_din", "fuxictr_tiny_seq",
)  # fmt: skip
BEHAVIOUR_OPTIONS = ("max_len", "max_users", "out_dir")
# The paper's tabular datasets (dpn_jax.data.tabular_builtins): raw or BARS files, streamed.
TABULAR_BUILTIN = (
    "criteo", "criteo_x1", "avazu", "avazu_x1", "movielens_tag", "movielens_latest_x1", "frappe_x1",
)  # fmt: skip
TABULAR_OPTIONS = ("min_count", "skip_malformed", "progress")
BUILTIN = ("frappe", "synthetic", *TABULAR_BUILTIN, *BEHAVIOUR_BUILTIN)

__all__ = [
    "BUILTIN", "Dataset", "DatasetSpec", "FieldInfo", "FieldSpec", "FittedEncoders", "Schema", "Split",
    "batch_order", "batches", "build_dataset", "find_data_dir", "fit_encoders", "load_dataset", "load_frappe",
    "load_spec", "load_spec_dataset", "padded_batches", "parse_spec", "split_len",
]  # fmt: skip


def load_dataset(
    name_or_spec: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    **synthetic_kwargs: Any,
) -> Dataset:
    """Load a built-in dataset (:data:`BUILTIN`) or a ``.yaml``/``.yml`` spec's dataset.

    ``seed`` seeds the carved splits (a spec's own ``split.seed`` wins), the synthetic generator
    and the behaviour builders' negative sampling. Keyword options go to the synthetic generator,
    or (``max_len``, ``max_users``, ``out_dir``) to :func:`dpn_jax.data.behaviour.load_behaviour`."""
    name = str(name_or_spec)
    if name in TABULAR_BUILTIN:
        from dpn_jax.data.tabular_builtins import load_tabular

        _check_options(name, synthetic_kwargs, TABULAR_OPTIONS)
        return load_tabular(
            name, data_dir=data_dir, cache_dir=cache_dir, seed=seed, **synthetic_kwargs
        )
    if name in BEHAVIOUR_BUILTIN:
        from dpn_jax.data.behaviour import load_behaviour

        _check_options(name, synthetic_kwargs, BEHAVIOUR_OPTIONS)
        return load_behaviour(
            name, data_dir=data_dir, cache_dir=cache_dir, seed=seed, **synthetic_kwargs
        )
    if synthetic_kwargs and name != "synthetic":
        raise DataError(
            f"options {sorted(synthetic_kwargs)} apply only to the synthetic dataset, not {name!r}"
        )
    if name == "synthetic":
        # Lazy: written separately, and importing it is not needed for real data.
        from dpn_jax.data.synthetic import make_synthetic

        return make_synthetic(seed=seed, **synthetic_kwargs)
    if name == "frappe":
        return load_frappe(data_dir=data_dir, cache_dir=cache_dir, seed=seed)
    if name.lower().endswith((".yaml", ".yml")):
        return load_spec_dataset(name, cache_dir=cache_dir, seed=seed)
    raise DataError(
        f"unknown dataset {name!r}; built-in datasets are {list(BUILTIN)}, "
        "and a dataset spec must be a path ending in .yaml (or .yml)"
    )


def _check_options(name: str, given: dict, allowed: tuple[str, ...]) -> None:
    bad = sorted(set(given) - set(allowed))
    if bad:
        raise DataError(f"options {bad} do not apply to {name!r}; it takes {list(allowed)}")


def load_spec_dataset(
    spec: str | Path | DatasetSpec, cache_dir: str | Path | None = None, seed: int = DEFAULT_SEED
) -> Dataset:
    """Encode (or load from the cache) the dataset described by a spec file or object."""
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec, default_seed=seed)
    return cache.cached_dataset(spec, encode.build_dataset, cache_dir)


def batch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The row order of an epoch of :func:`batches`: a permutation from ``default_rng((seed,
    epoch))`` (reproducible per epoch), or ``0..n-1`` without ``shuffle``."""
    return np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)


def batches(
    split: Split, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool = False,
    start_batch: int = 0, order: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Mini-batches (numpy dicts with the split's keys) covering every row once per epoch, in
    the order of :func:`batch_order` (``order``: that order, when the caller drew it already).
    ``start_batch`` skips that many batches of the epoch (resuming mid-epoch) without reading them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = split_len(split)
    if order is None:
        order = batch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    stop = n - n % batch_size if drop_last else n
    for start in range(start_batch * batch_size, stop, batch_size):
        idx = order[start : start + batch_size]
        # One fancy-index per array; np.asarray turns a memmap result into a plain array.
        yield {k: np.asarray(v[idx]) for k, v in split.items()}


def padded_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches of exactly ``batch_size`` rows, in order: every row once; the last batch
    is padded by repeating its last row, and float32 ``"mask"`` is 1 for real rows, 0 for padding
    (so a jitted eval step sees one shape)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = split_len(split)
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        idx = np.arange(start, start + batch_size)
        idx[real:] = start + real - 1
        out = {k: np.asarray(v[idx]) for k, v in split.items()}
        out["mask"] = (np.arange(batch_size) < real).astype(np.float32)
        yield out
