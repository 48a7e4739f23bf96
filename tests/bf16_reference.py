"""The reference every bfloat16 product test compares against: round to bfloat16, compute in float64."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def bf16(a) -> np.ndarray:
    """`a` rounded to bfloat16 (as XLA and MKL round their inputs), widened to float64."""
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
