"""Explicit bounded-degree interaction layers: DCN's cross layer, DCN-V2's cross layer (full
rank or a mixture of low-rank experts) and xDeepFM's Compressed Interaction Network.

Shapes: ``x0``, ``xl`` are ``[B, D]`` (the flattened field embeddings, ``D = F * d``) for the
cross layers; the CIN takes the field embeddings ``[B, m, d]`` (``m`` fields) and works
embedding-major (``[B, d, m]``) inside, so each layer is one 2-D matmul without transposes.

Initialisation follows FuxiCTR/BARS (``BaseModel.init_weights``): Glorot-normal weights, zero
biases, so a model here starts from the same distribution as its BARS baseline.

* DCN (Wang et al., ADKDD 2017), Eqn. 3::

      x_{l+1} = x0 (x_l^T w_l) + b_l + x_l                       w_l, b_l in R^D

* DCN-V2 (Wang et al., WWW 2021), Eqn. 1::

      x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l                       W_l in R^{D x D}

  and its cost-effective mixture of low-rank experts (Eqns. 3-4)::

      x_{l+1} = Σ_i G_i(x_l) E_i(x_l) + x_l
      E_i(x_l) = x0 ⊙ (U_l^i g(C_l^i g(V_l^i^T x_l)) + b_l)      U, V in R^{D x r}, C in R^{r x r}

  with ``g = tanh`` and ``G = softmax(x_l^T [g_1 .. g_K])`` (the choices of DeepCTR/FuxiCTR's
  ``CrossNetMix``; here each layer has its own gate, FuxiCTR shares one across layers).

* CIN (Lian et al., KDD 2018), Eqns. 6-7::

      X^k_{h,*} = Σ_{i=1}^{H_{k-1}} Σ_{j=1}^{m} W^{k,h}_{ij} (X^{k-1}_{i,*} ⊙ X^0_{j,*})   (6)
      p^k_h = Σ_{e=1}^{d} X^k_{h,e},     p+ = [p^1, ..., p^T]                             (7)

  plus a per-feature-map bias (FuxiCTR's 1x1 ``Conv1d``) and no activation (Eqn. 6 has
  none). Every layer's maps go both to the output and to the
  next layer (the paper's formulation; the reference code's ``split_half`` is not implemented).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError
from dpn_jax.nn.precision import dense_dot_general

glorot_normal = nn.initializers.glorot_normal
zeros = nn.initializers.zeros


def _check_nonneg(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")


class CrossLayer(nn.Module):
    """One DCN cross layer (Eqn. 3): ``x0 * (xl @ w) + b + xl`` with ``w, b in R^D``."""

    @nn.compact
    def __call__(self, x0: jnp.ndarray, xl: jnp.ndarray) -> jnp.ndarray:
        dim = x0.shape[-1]
        w = self.param("kernel", glorot_normal(), (dim, 1), x0.dtype)
        b = self.param("bias", zeros, (dim,), x0.dtype)
        return x0 * (xl @ w) + b + xl


class CrossLayerV2(nn.Module):
    """One full-rank DCN-V2 cross layer (Eqn. 1): ``x0 ⊙ (W xl + b) + xl``; ``matmul_dtype``
    as :class:`dpn_jax.nn.mlp.MLP`'s (nn/precision.py)."""

    matmul_dtype: str = "float32"

    @nn.compact
    def __call__(self, x0: jnp.ndarray, xl: jnp.ndarray) -> jnp.ndarray:
        lin = nn.Dense(x0.shape[-1], kernel_init=glorot_normal(),
                       dot_general=dense_dot_general(self.matmul_dtype), name="dense")(xl)
        return x0 * lin + xl


class CrossLayerV2Mix(nn.Module):
    """One DCN-V2 mixture-of-low-rank-experts cross layer (Eqns. 3-4), ``g = tanh``.

    Parameters: ``U, V: [K, D, r]``, ``C: [K, r, r]`` (Glorot per expert), a bias ``b: [D]``
    shared by the experts, and a gate kernel ``[D, K]`` (no bias) whose softmax weighs them."""

    low_rank: int = 32
    num_experts: int = 4

    @nn.compact
    def __call__(self, x0: jnp.ndarray, xl: jnp.ndarray) -> jnp.ndarray:
        _check_nonneg("low_rank", self.low_rank, 1)
        _check_nonneg("num_experts", self.num_experts, 1)
        dim, k, r = x0.shape[-1], self.num_experts, self.low_rank
        per_expert = glorot_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        u = self.param("U", per_expert, (k, dim, r), x0.dtype)
        v = self.param("V", per_expert, (k, dim, r), x0.dtype)
        c = self.param("C", per_expert, (k, r, r), x0.dtype)
        b = self.param("bias", zeros, (dim,), x0.dtype)
        gate = self.param("gate", glorot_normal(), (dim, k), x0.dtype)
        z = jnp.tanh(jnp.einsum("bd,kdr->bkr", xl, v))       # g(V^T x_l)
        z = jnp.tanh(jnp.einsum("kst,bkt->bks", c, z))       # g(C z)
        experts = x0[:, None, :] * (jnp.einsum("kdr,bkr->bkd", u, z) + b)  # E_i(x_l): [B, K, D]
        g = jax.nn.softmax(xl @ gate, axis=-1)               # G_i(x_l): [B, K]
        return jnp.einsum("bk,bkd->bd", g, experts) + xl


class CrossNet(nn.Module):
    """``num_layers`` DCN cross layers: ``[B, D] -> [B, D]`` (0 layers = identity)."""

    num_layers: int = 3

    @nn.compact
    def __call__(self, x0: jnp.ndarray) -> jnp.ndarray:
        _check_nonneg("num_layers", self.num_layers)
        x = x0
        for i in range(self.num_layers):
            x = CrossLayer(name=f"layer_{i}")(x0, x)
        return x


class CrossNetV2(nn.Module):
    """``num_layers`` DCN-V2 cross layers; ``low_rank > 0`` switches every layer to the mixture
    of ``num_experts`` rank-``low_rank`` experts (``CrossLayerV2Mix``, always float32 products;
    ``matmul_dtype`` applies to the full-rank layers)."""

    num_layers: int = 3
    low_rank: int = 0
    num_experts: int = 4
    matmul_dtype: str = "float32"

    @nn.compact
    def __call__(self, x0: jnp.ndarray) -> jnp.ndarray:
        _check_nonneg("num_layers", self.num_layers)
        _check_nonneg("low_rank", self.low_rank)
        x = x0
        for i in range(self.num_layers):
            if self.low_rank > 0:
                x = CrossLayerV2Mix(self.low_rank, self.num_experts, name=f"layer_{i}")(x0, x)
            else:
                x = CrossLayerV2(self.matmul_dtype, name=f"layer_{i}")(x0, x)
        return x


class CINLayer(nn.Module):
    """One CIN layer (Eqn. 6) in the embedding-major layout the CIN works in:
    ``(x0 [B, d, m], xk [B, d, H]) -> [B, d, features]`` (``X^k_{h,*}`` is ``out[:, :, h]``).

    ``kernel[i, j, h]`` is ``W^{k,h}_{ij}`` (Glorot with fan-in ``H * m``, like FuxiCTR's 1x1
    ``Conv1d``); ``bias[h]`` is added to every dimension of feature map ``h``. With ``d``
    leading, the outer product flattens straight into the rows of one 2-D matmul (no transposes,
    which cost more than the matmul itself here)."""

    features: int

    @nn.compact
    def __call__(self, x0: jnp.ndarray, xk: jnp.ndarray) -> jnp.ndarray:
        batch, d, m = x0.shape
        h_prev = xk.shape[-1]
        kernel = self.param("kernel", glorot_normal(in_axis=(0, 1), out_axis=2),
                            (h_prev, m, self.features), x0.dtype)
        bias = self.param("bias", zeros, (self.features,), x0.dtype)
        z = xk[..., :, None] * x0[..., None, :]              # [B, d, H_{k-1}, m]: X^{k-1}_i ⊙ X^0_j
        z = z.reshape(batch * d, h_prev * m)
        out = z @ kernel.reshape(h_prev * m, self.features)  # Σ_i Σ_j W^{k,h}_{ij} (...)
        return out.reshape(batch, d, self.features) + bias


class CIN(nn.Module):
    """Compressed Interaction Network: field embeddings ``[B, m, d]`` -> ``p+ [B, Σ_k H_k]``
    (Eqns. 6-7: each layer's feature maps sum-pooled over the embedding dimension)."""

    layer_sizes: Sequence[int] = (200, 200, 200)

    @nn.compact
    def __call__(self, e: jnp.ndarray) -> jnp.ndarray:
        if not self.layer_sizes:
            raise ConfigError("cin_layer_sizes is empty: the CIN needs at least one layer, e.g. 200,200,200")
        x0 = jnp.swapaxes(e, 1, 2)                           # [B, d, m]
        pooled, x = [], x0
        for k, size in enumerate(self.layer_sizes):
            _check_nonneg("cin_layer_sizes entry", size, 1)
            x = CINLayer(size, name=f"layer_{k}")(x0, x)
            pooled.append(jnp.sum(x, axis=1))                 # p^k: [B, H_k]
        return jnp.concatenate(pooled, axis=-1)
