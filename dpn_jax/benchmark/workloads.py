"""Workload shapes for the benchmark: schemas plus random encoded rows of the right distribution.

Throughput does not depend on what the model learns, only on shapes and on how ids repeat (the
sparse optimiser and the gather's cache behaviour do), so rows are random ids drawn per field
from a Zipf law instead of a real dataset:

- ``criteo``: :func:`~dpn_jax.benchmark.schemas.criteo_like_schema` (25,641 ids per field), ids
  Zipf(1.05) within a field;
- ``frappe``: :func:`~dpn_jax.benchmark.schemas.frappe_like_schema` (uniform ids: its fields are
  small);
- ``behaviour``: :func:`~dpn_jax.benchmark.schemas.behaviour_like_schema` for the sequence models.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpn_jax.benchmark.schemas import (
    behaviour_like_schema,
    criteo_like_schema,
    frappe_like_schema,
    random_batch,
)
from dpn_jax.data.schema import FIRST, Schema
from dpn_jax.errors import ConfigError

ZIPF = 1.05


def zipf_ids(rng: np.random.Generator, vocab: int, rows: int, a: float = ZIPF) -> np.ndarray:
    """Ids in [0, vocab) with P(rank k) ~ k^-a, ranks shuffled so hot ids are spread over the
    table (as hashed ids are), drawn by inverting the CDF."""
    cdf = np.cumsum((np.arange(vocab, dtype=np.float64) + 1.0) ** -a)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(rows) * cdf[-1]), vocab - 1)
    return rng.permutation(vocab)[ranks]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    schema: Schema
    zipf: bool

    def rows(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``n`` encoded rows with a random label: the arrays a model's batch holds."""
        rng = np.random.default_rng(seed)
        if self.zipf:
            cols = sorted(self.schema.cat_fields, key=lambda f: f.column)
            cat = np.stack([f.offset + FIRST + zipf_ids(rng, f.vocab_size - FIRST, n) for f in cols], 1)
            out = {"cat": cat.astype(np.int32), "num": np.zeros((n, 0), np.float32)}
        else:
            out = random_batch(self.schema, n, seed)
        out["label"] = rng.integers(0, 2, n).astype(np.float32)
        return out


WORKLOADS = {
    "criteo": lambda: Workload("criteo", criteo_like_schema(), zipf=True),
    "frappe": lambda: Workload("frappe", frappe_like_schema(), zipf=False),
    "behaviour": lambda: Workload("behaviour", behaviour_like_schema(), zipf=False),
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ConfigError(f"--workloads: {name!r} is not known; choose from {sorted(WORKLOADS)}")
    return WORKLOADS[name]()
