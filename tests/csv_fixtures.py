"""A tiny CSV dataset with its spec, for tests that run the `dpn-jax` command on user data."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np


def write_tiny_csv_spec(d: Path) -> Path:
    """``d/data.csv`` (600 rows: label y, categorical u and v; y depends on u) and ``d/spec.yaml``
    splitting it 60/20/20; returns the spec's path."""
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 8, 600), rng.integers(0, 5, 600)
    y = (rng.random(600) < 1 / (1 + np.exp(-(u % 3 - 1.0)))).astype(int)
    (d / "data.csv").write_text("y,u,v\n" + "".join(f"{a},u{b},v{c}\n" for a, b, c in zip(y, u, v)))
    return write_tiny_spec(d)


def write_tiny_spec(d: Path, numeric: tuple[str, ...] = ()) -> Path:
    """``d/spec.yaml`` for ``d/data.csv`` (label y, categorical u and v, then the ``numeric``
    columns), split 60/20/20; returns its path."""
    extra = "".join(f"  - {{name: {c}, type: numeric}}\n" for c in numeric)
    (d / "spec.yaml").write_text(textwrap.dedent("""\
        name: tiny
        format: csv
        train: data.csv
        split: {valid: 0.2, test: 0.2, seed: 1}
        label: y
        fields:
          - {name: u, type: categorical}
          - {name: v, type: categorical}
        """) + extra)
    return d / "spec.yaml"
