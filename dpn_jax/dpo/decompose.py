"""Decomposition of the low-rank feature DPO (paper §2.2 after Eqn. 5; docs/dpo_math.md, §'Decomposition').

``y = W(z) x + b(z)`` with ``vec(W) = Ẇ h(z) + ḃ`` splits into

* ``static = reshape(ḃ) x`` -- a fixed linear layer: the low-order, DNN-like term;
* ``multiplicative = reshape(Ẇ h(z)) x`` -- second order in ``(x, z)``: the explicit interactions;
* ``bias = b(z) = W̃ h(z) + b̃`` -- the conditional bias, implicit in ``z``.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from dpn_jax.dpo.generate import Activation, LowRankParams, hidden, resolve_activation

Array = jax.Array


class Decomposition(NamedTuple):
    static: Array  # [B, n]
    multiplicative: Array  # [B, n]
    bias: Array  # [B, n]


def decompose(params: LowRankParams, x: Array, z: Array, *,
              activation: str | Activation = "relu") -> Decomposition:
    """Splits the low-rank feature DPO's output: ``static + multiplicative + bias == y``.

    ``x [B,m], z [B,c]``; ``activation`` must be the generator's hidden activation.
    """
    chex.assert_rank([x, z], 2)
    chex.assert_equal_shape_prefix([x, z], 1)
    m, _, n = params.kernel.shape
    chex.assert_axis_dimension(x, 1, m)
    h = hidden(params.hidden, z, resolve_activation(activation))  # [B, l]
    static = x @ params.kernel[:, 0, :]
    multiplicative = jnp.einsum("bm,mkn,bk->bn", x, params.kernel[:, 1:, :], h)
    if params.bias is None:
        bias = jnp.zeros((x.shape[0], n), static.dtype)
    else:
        bias = params.bias[0] + h @ params.bias[1:]
    return Decomposition(static, multiplicative, bias)
