"""Interaction layers of the factorization-machine family and the product-based networks.

Every function takes the field embeddings ``e: [B, F, d]`` of ``FieldEmbedding`` (one-hot inputs,
so the ``x_i`` of the papers are already folded into ``e_i``; a dense numeric field arrives as
``x_i * v_i``). Pairs ``(i, j)`` with ``i < j`` are always enumerated in row-major order
(``pair_indices``), so ``P = F (F - 1) / 2`` pair outputs line up across layers.

* ``pairwise_products``  AFM's pair-wise interaction layer, Xiao et al. (IJCAI 2017) Eqn. 1:
  ``{e_i ⊙ e_j}_{i<j}``                                                    -> [B, P, d]
* ``AttentionalPooling`` AFM's attention-based pooling, Eqns. 3-4:
  ``a'_ij = h^T ReLU(W (e_i ⊙ e_j) + b)``, ``a = softmax_ij(a')``, ``Σ_ij a_ij (e_i ⊙ e_j)`` -> [B, d]
* ``bi_interaction``     NFM's Bi-Interaction pooling, He & Chua (SIGIR 2017) Eqns. 3-4:
  ``Σ_{i<j} e_i ⊙ e_j = 1/2 ((Σ_i e_i)^2 - Σ_i e_i^2)`` in O(F d)             -> [B, d]
* ``inner_products``     IPNN's product layer, Qu et al. (ICDM 2016) Sec. III-B:
  ``{<e_i, e_j>}_{i<j}``                                                   -> [B, P]
* ``outer_product_sum_pooling``  OPNN's product layer with the paper's superposition trick
  (Sec. III-C): ``p = Σ_i Σ_j e_i e_j^T = f_Σ f_Σ^T`` with ``f_Σ = Σ_i e_i``, flattened -> [B, d*d]
* ``KernelProduct``      the kernel ("mat") outer product of the PNN authors' released code and
  of the journal version (Qu et al., TOIS 2018, KPNN): ``{e_i^T K_ij e_j}_{i<j}`` -> [B, P]
* ``anova_kernel``       the ANOVA kernel of Higher-Order FMs, Blondel et al. (NeurIPS 2016):
  ``A^m = Σ_{j_1 < ... < j_m} e_{j_1} ⊙ ... ⊙ e_{j_m}`` per dimension, evaluated with the
  paper's dynamic programme (its linear-time Algorithm 1)
  ``a_{t,j} = a_{t,j-1} + e_j ⊙ a_{t-1,j-1}``, ``a_{0,j} = 1``, ``a_{t,0} = 0`` -> [B, d]
  in O(F m d) instead of O(F^m d).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dpn_jax.nn.dropout import Dropout16


@functools.cache
def pair_indices(num_fields: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-major ``(i, j)`` with ``i < j``: (0,1), (0,2), ..., (1,2), ... as two index arrays."""
    i, j = np.triu_indices(num_fields, k=1)
    return i.astype(np.int32), j.astype(np.int32)


def num_pairs(num_fields: int) -> int:
    return num_fields * (num_fields - 1) // 2


def pairwise_products(e: jnp.ndarray) -> jnp.ndarray:
    """``e_i ⊙ e_j`` for every field pair ``i < j``: ``[B, F, d] -> [B, P, d]`` (AFM Eqn. 1)."""
    i, j = pair_indices(e.shape[1])
    return e[:, i] * e[:, j]


def bi_interaction(e: jnp.ndarray) -> jnp.ndarray:
    """NFM Bi-Interaction pooling (Eqn. 4): ``1/2 ((Σ_i e_i)^2 - Σ_i e_i^2)``, ``[B, F, d] -> [B, d]``,
    equal to ``Σ_{i<j} e_i ⊙ e_j`` (Eqn. 3). Summed over ``d`` it is the FM interaction."""
    s = jnp.sum(e, axis=1)
    return 0.5 * (s * s - jnp.sum(e * e, axis=1))


def inner_products(e: jnp.ndarray) -> jnp.ndarray:
    """IPNN product layer: ``<e_i, e_j>`` for every pair ``i < j``, ``[B, F, d] -> [B, P]``."""
    return jnp.sum(pairwise_products(e), axis=-1)


def outer_product_sum_pooling(e: jnp.ndarray) -> jnp.ndarray:
    """OPNN product layer, superposition form: ``f_Σ f_Σ^T`` with ``f_Σ = Σ_i e_i``, flattened
    row-major to ``[B, d*d]``. It equals ``Σ_i Σ_j e_i e_j^T`` over ALL ordered pairs, self-pairs
    included (Qu et al. 2016, Sec. III-C: the sum that reduces OPNN's cost to O(d (d + F)))."""
    f = jnp.sum(e, axis=1)
    return (f[:, :, None] * f[:, None, :]).reshape(e.shape[0], -1)


def anova_kernels(e: jnp.ndarray, order: int) -> jnp.ndarray:
    """All ANOVA kernels up to ``order``: ``[order + 1, B, d]`` where row ``t`` is
    ``A^t = Σ_{j_1<...<j_t} Π_k e_{j_k}`` per dimension (row 0 is ones).

    The dynamic programme of Blondel et al. (2016): scanning the fields ``j = 1..F``,
    ``a_t <- a_t + e_j ⊙ a_{t-1}`` for every ``t >= 1`` at once (right-hand sides use the values
    before field ``j``), so ``a_t`` after field ``j`` is the order-``t`` kernel over fields ``1..j``.
    """
    if order < 0:
        raise ValueError(f"ANOVA order must be >= 0, got {order}")
    b, _, d = e.shape
    init = jnp.zeros((order + 1, b, d), e.dtype).at[0].set(1.0)

    def step(a, e_j):
        return a.at[1:].add(e_j[None] * a[:-1]), None

    out, _ = lax.scan(step, init, jnp.moveaxis(e, 1, 0))
    return out


def anova_kernel(e: jnp.ndarray, order: int) -> jnp.ndarray:
    """``A^order`` per embedding dimension, ``[B, F, d] -> [B, d]`` (see ``anova_kernels``).
    ``anova_kernel(e, 2)`` is NFM's ``bi_interaction``; summed over ``d`` it is HOFM's order-``m``
    term ``Σ_s A^m(p_s, x)``."""
    return anova_kernels(e, order)[order]


class AttentionalPooling(nn.Module):
    """AFM attention-based pooling (Xiao et al. 2017, Eqns. 3-4) of pair vectors ``[B, P, d]``.

    ``a'_p = h^T ReLU(W v_p + b)`` (the attention network, ``W: d x t``, ``t = attention_dim``),
    ``a = softmax over the P pairs``; returns ``(Σ_p a_p v_p  [B, d], a  [B, P])``.
    ``attention_dropout`` drops attention weights while training (FuxiCTR's
    ``attention_dropout[0]``); the survivors are rescaled, so the weights stay unbiased.
    """

    attention_dim: int = 10
    attention_dropout: float = 0.0

    @nn.compact
    def __call__(self, pairs: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        glorot = nn.initializers.glorot_normal()
        hidden = nn.relu(nn.Dense(self.attention_dim, kernel_init=glorot, name="W")(pairs))
        scores = nn.Dense(1, use_bias=False, kernel_init=glorot, name="h")(hidden)[..., 0]
        weights = jax.nn.softmax(scores, axis=-1)
        weights = Dropout16(self.attention_dropout)(weights, deterministic=not train)
        return jnp.einsum("bp,bpd->bd", weights, pairs), weights


class KernelProduct(nn.Module):
    """Kernel outer product ``e_i^T K_ij e_j`` for every pair ``i < j`` -> ``[B, P]``; one ``d x d``
    kernel per pair (param ``kernel [P, d, d]``, Glorot-normal). This is the OPNN of the PNN
    authors' released code (``kernel_type='mat'``) and the KPNN of Qu et al. (TOIS 2018)."""

    @nn.compact
    def __call__(self, e: jnp.ndarray) -> jnp.ndarray:
        f, d = e.shape[1], e.shape[2]
        kernel = self.param("kernel", nn.initializers.glorot_normal(in_axis=-2, out_axis=-1, batch_axis=0),
                            (num_pairs(f), d, d), e.dtype)
        i, j = pair_indices(f)
        return jnp.einsum("bpk,pkl,bpl->bp", e[:, i], kernel, e[:, j])
