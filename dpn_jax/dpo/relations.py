"""Classic interaction layers written as DPOs (paper §2.3 "Relation to FM / Cross Network"; docs/dpo_math.md, §'FM and the cross layer').

Both are built from the generic machinery (``generate.diagonal`` + ``aggregate``) with fixed
parameters, so they double as executable documentation of the two relations:

* FM without its linear term: ``Σ_{i<j} <x_i, x_j> = ½ Σ_{i,k} [Σ_{j≠i} diag(x_j) x_i]_k``, i.e. the
  self-excluded summation field DPO with ``g(z) = diag(z)``, ``z = x``, summed over fields and
  dimensions, times the constant **½** (each unordered pair is counted twice).
* DCN CrossLayer ``x_{l+1} = x_0 (x_lᵀ w) + b + x_l``: the scalar generator ``g(z) = (zᵀw) I`` applied
  to ``x = x_0`` with context ``z = x_l``, plus the bias ``b`` and the residual ``x_l``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dpn_jax.dpo.aggregate import field_sum
from dpn_jax.dpo.generate import DiagonalParams, HiddenParams, diagonal

Array = jax.Array

FM_CONSTANT = 0.5


def diag_generator_params(d: int, dtype=jnp.float32) -> DiagonalParams:
    """Parameters making ``diagonal(d, d, d, rank=d, activation="identity")`` exactly
    ``g(z) = diag(z)``: no static kernel, ``Ŵ = D = I``, no bias."""
    eye = jnp.eye(d, dtype=dtype)
    return DiagonalParams(HiddenParams(eye, jnp.zeros((d,), dtype)),
                          jnp.zeros((d, d), dtype), eye, None)


def fm_interaction(x: Array) -> Array:
    """FM second-order term ``Σ_{i<j} <x_i, x_j>`` as a DPO: ``x [B,F,d] -> [B]``."""
    chex.assert_rank(x, 3)
    d = x.shape[2]
    gen = diagonal(d, d, d, rank=d, activation="identity", use_bias=False)
    y = field_sum(gen, diag_generator_params(d, x.dtype), x, x, exclude_self=True)
    return FM_CONSTANT * jnp.sum(y, axis=(1, 2))


def cross_layer(x0: Array, xl: Array, w: Array, b: Array) -> Array:
    """DCN CrossLayer ``x0 (xlᵀ w) + b + xl`` as a DPO: ``x0, xl [B,d], w, b [d] -> [B,d]``."""
    chex.assert_rank([x0, xl, w, b], [2, 2, 1, 1])
    chex.assert_equal_shape([x0, xl])
    d = x0.shape[1]
    gen = diagonal(d, d, d, rank=1, activation="identity", use_bias=True)
    bias = jnp.zeros((2, d), x0.dtype).at[0].set(b)  # static bias b̃ = b, no dynamic bias
    params = DiagonalParams(HiddenParams(w[:, None], jnp.zeros((1,), x0.dtype)),
                            jnp.zeros((d, d), x0.dtype), jnp.ones((1, d), x0.dtype), bias)
    return gen.apply(params, x0, xl) + xl
