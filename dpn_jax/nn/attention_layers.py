"""Attention, gating and instance-conditioned layers of the deep baselines.

* ``multi_head_self_attention`` / ``InteractingLayer`` -- AutoInt's interacting layer
  (Song et al., CIKM 2019, Eqns. 5-8);
* ``FeatureGate`` / ``BilinearFusion`` -- FinalMLP's stream-specific feature selection and
  multi-head bilinear fusion (Mao et al., AAAI 2023, Eqns. 1-5);
* ``apg_dense`` / ``APGDense`` -- APG's generated layer ``W(z) = U S(z) V`` with low-rank
  parameterisation, shared ``U, V`` and over-parameterisation (Yan et al., NeurIPS 2022, Sec. 3).

Pure functions hold the formulas (tested against numpy loops); the modules only own parameters.
Shapes: ``B`` batch, ``F`` fields, ``d`` embedding size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError
from dpn_jax.nn.mlp import MLP

Array = jax.Array

_glorot = nn.initializers.glorot_normal


# ---------------------------------------------------------------------------------------------
# AutoInt (Song et al., CIKM 2019)
# ---------------------------------------------------------------------------------------------


def multi_head_self_attention(e: Array, w_query: Array, w_key: Array, w_value: Array,
                              w_res: Array | None, num_heads: int, use_scale: bool = False) -> Array:
    """One AutoInt interacting layer, ``e [B, F, d_in] -> [B, F, A]`` with ``A = H * d'``.

    For each head ``h`` (``W^(h)`` is the ``h``-th block of ``d'`` columns of ``w_*``):

    * Eqn. 5: ``psi^(h)(e_m, e_k) = <W_Q^(h) e_m, W_K^(h) e_k>`` (divided by ``sqrt(d')`` only when
      ``use_scale``; the paper uses the plain inner product) and
      ``alpha^(h)_mk = softmax_k psi^(h)(e_m, e_k)``;
    * Eqn. 6: ``e~^(h)_m = sum_k alpha^(h)_mk W_V^(h) e_k``;
    * Eqn. 7: ``e~_m = e~^(1)_m (+) ... (+) e~^(H)_m`` (concatenation);
    * Eqn. 8: ``e^Res_m = ReLU(e~_m + W_Res e_m)`` (without ``w_res``: ``ReLU(e~_m)``).
    """
    b, f, _ = e.shape
    a = w_query.shape[1]
    dh = a // num_heads
    q = (e @ w_query).reshape(b, f, num_heads, dh)
    k = (e @ w_key).reshape(b, f, num_heads, dh)
    v = (e @ w_value).reshape(b, f, num_heads, dh)
    scores = jnp.einsum("bmhc,bkhc->bhmk", q, k)
    if use_scale:
        scores = scores / math.sqrt(dh)
    alpha = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhmk,bkhc->bmhc", alpha, v).reshape(b, f, a)
    if w_res is not None:
        out = out + e @ w_res
    return jax.nn.relu(out)


class InteractingLayer(nn.Module):
    """AutoInt's interacting layer (multi-head self-attention over fields + residual + ReLU).

    ``attention_dim`` is the layer's output size ``A = H * d'`` (FuxiCTR's convention, so BARS
    configs transfer); every head has ``d' = attention_dim / num_heads`` dimensions. The residual
    projection ``W_Res`` of Eqn. 8 is always learned, also when ``d_in == A``. Projections have
    no bias (Eqns. 5-8) and Glorot-normal kernels (FuxiCTR's init).
    """

    attention_dim: int = 64
    num_heads: int = 2
    use_residual: bool = True
    use_scale: bool = False

    @nn.compact
    def __call__(self, e: Array) -> Array:
        if self.attention_dim % self.num_heads:
            raise ConfigError(f"attention_dim={self.attention_dim} is not divisible by "
                              f"num_heads={self.num_heads}")
        shape = (e.shape[-1], self.attention_dim)
        w_q = self.param("query", _glorot(), shape)
        w_k = self.param("key", _glorot(), shape)
        w_v = self.param("value", _glorot(), shape)
        w_res = self.param("residual", _glorot(), shape) if self.use_residual else None
        return multi_head_self_attention(e, w_q, w_k, w_v, w_res, self.num_heads, self.use_scale)


# ---------------------------------------------------------------------------------------------
# FinalMLP (Mao et al., AAAI 2023)
# ---------------------------------------------------------------------------------------------


class FeatureGate(nn.Module):
    """FinalMLP's stream-specific feature gate (Eqns. 1-2): ``g = 2 * sigmoid(MLP(x_ctx))``.

    ``x_ctx [B, c] -> [B, features]``; the gate multiplies the flattened embeddings,
    ``h = g (.) e``. The MLP has ReLU hidden layers without BatchNorm and a linear output (its
    logits), as in FuxiCTR's ``FeatureSelection``; ``2 * sigmoid`` keeps a gate of 1 (identity)
    reachable at zero logits and lets it amplify as well as suppress.
    """

    features: int
    hidden: Sequence[int] = (400,)

    @nn.compact
    def __call__(self, ctx: Array) -> Array:
        h = ctx
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, kernel_init=_glorot(), name=f"hidden_{i}")(h))
        logits = nn.Dense(self.features, kernel_init=_glorot(), name="logits")(h)
        return 2.0 * jax.nn.sigmoid(logits)


def bilinear_fusion(o1: Array, o2: Array, w1: Array, w2: Array, w12: Array, bias: Array) -> Array:
    """Multi-head bilinear fusion (Eqns. 3-5): ``o1 [B, m], o2 [B, n] -> [B]``.

    Both outputs are split into ``k`` heads (``w12: [k, m/k, n/k]``) and
    ``y = sum_j BF(o1_j, o2_j)`` with ``BF(a, c) = b_j + w1_j^T a + w2_j^T c + a^T W3_j c``;
    the per-head biases and linear terms sum to one bias ``bias`` and ``w1^T o1 + w2^T o2``.
    """
    k, hm, hn = w12.shape
    a = o1.reshape(o1.shape[0], k, hm)
    c = o2.reshape(o2.shape[0], k, hn)
    bil = jnp.einsum("bhi,hij,bhj->b", a, w12, c)
    return bias + o1 @ w1 + o2 @ w2 + bil


class BilinearFusion(nn.Module):
    """Parameters of ``bilinear_fusion``; ``num_heads`` must divide both stream widths.

    ``W3`` is initialised like FuxiCTR's ``w_xy`` (Xavier-normal of the ``[k m' n', 1]`` matrix:
    std ``sqrt(2 / (k m' n' + 1))``), the linear terms Glorot-normal, the bias zero.
    """

    num_heads: int = 1

    @nn.compact
    def __call__(self, o1: Array, o2: Array) -> Array:
        m, n, k = o1.shape[-1], o2.shape[-1], self.num_heads
        if m % k or n % k:
            raise ConfigError(f"num_heads={k} must divide both stream widths ({m} and {n})")
        w1 = self.param("w1", _glorot(), (m, 1))[:, 0]
        w2 = self.param("w2", _glorot(), (n, 1))[:, 0]
        std = math.sqrt(2.0 / (m * n // k + 1))
        w12 = self.param("w12", nn.initializers.normal(std), (k, m // k, n // k))
        bias = self.param("bias", nn.initializers.zeros, ())
        return bilinear_fusion(o1, o2, w1, w2, w12, bias)


# ---------------------------------------------------------------------------------------------
# APG (Yan et al., NeurIPS 2022)
# ---------------------------------------------------------------------------------------------


def apg_dense(x: Array, u: Array, s: Array, v: Array, bias: Array | None = None) -> Array:
    """APG's generated layer with decomposed feed-forwarding: ``x [B, N] -> [B, M]``.

    ``y_i = x_i W_i + b_i`` with ``W_i = U S_i V`` (``U [N, K]``, ``S_i [K, K]`` generated from the
    condition ``z_i``, ``V [K, M]`` shared by all instances), computed right-to-left as
    ``((x_i U) S_i) V`` so no ``N x M`` matrix is ever formed per instance. ``s: [B, K, K]``;
    ``bias``: ``[M]`` (static), ``[B, M]`` (generated) or None.
    """
    h = x @ u
    h = jnp.einsum("bk,bkl->bl", h, s)
    out = h @ v
    return out if bias is None else out + bias


class APGDense(nn.Module):
    """One APG layer, ``(x [B, N], z [B, C]) -> [B, features]`` (paper Sec. 3).

    * low-rank parameterisation + parameter sharing: ``W(z) = U S(z) V`` with only the ``K x K``
      core ``S`` generated per instance by the hyper-network ``G`` (an MLP with ReLU hidden
      layers ``hypernet_hidden`` and a linear output);
    * over-parameterisation (``overparam = P > 0``): ``U = U_l U_r`` (``[N, P] [P, K]``) and
      ``V = V_l V_r`` (``[K, P] [P, M]``), trained factorised, equal to a plain ``U, V`` at
      inference; ``overparam = 0`` stores ``U, V`` directly;
    * ``generate_bias``: ``G`` also emits a per-instance bias ``b(z)`` (FuxiCTR's default);
      otherwise a static bias.

    The rank is ``K = min(rank, N, features)`` (a rank above either side adds nothing).
    """

    features: int
    rank: int = 8
    overparam: int = 64
    hypernet_hidden: Sequence[int] = (512, 256)
    generate_bias: bool = True
    use_bias: bool = True

    def effective_rank(self, n_in: int) -> int:
        return max(1, min(self.rank, n_in, self.features))

    @nn.compact
    def __call__(self, x: Array, z: Array) -> Array:
        n, m = x.shape[-1], self.features
        k = self.effective_rank(n)
        if self.overparam > 0:
            p = max(self.overparam, k)
            u = self.param("u_left", _glorot(), (n, p)) @ self.param("u_right", _glorot(), (p, k))
            v = self.param("v_left", _glorot(), (k, p)) @ self.param("v_right", _glorot(), (p, m))
        else:
            u = self.param("u", _glorot(), (n, k))
            v = self.param("v", _glorot(), (k, m))
        gen_bias = self.generate_bias and self.use_bias
        h = z
        for i, width in enumerate(self.hypernet_hidden):
            h = nn.relu(nn.Dense(width, kernel_init=_glorot(), name=f"hypernet_{i}")(h))
        g = nn.Dense(k * k + (m if gen_bias else 0), kernel_init=_glorot(), name="hypernet_out")(h)
        s = g[:, : k * k].reshape(-1, k, k)
        if gen_bias:
            bias = g[:, k * k:]
        elif self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (m,))
        else:
            bias = None
        return apg_dense(x, u, s, v, bias)


class APGTower(MLP):
    """APG's hidden layers, ``(x [B, N], z [B, C] or None) -> [B, hidden[-1]]``: the protocol
    tower with an :class:`APGDense` (``apg_<i>``) in place of each Dense layer, conditioned on
    ``z`` (None: each layer on its own input, APG's self-wise condition)."""

    rank: int = 8
    overparam: int = 64
    hypernet_hidden: Sequence[int] = (512, 256)
    generate_bias: bool = True
    layer_names: bool = True

    def linear(self, i: int, width: int, x: Array, z: Array | None) -> Array:
        return APGDense(width, self.rank, self.overparam, tuple(self.hypernet_hidden),
                        self.generate_bias, name=f"apg_{i}")(x, x if z is None else z)

    @nn.compact
    def __call__(self, x: Array, z: Array | None, train: bool = False) -> Array:  # type: ignore[override]
        return self.layers(x, train, z)
