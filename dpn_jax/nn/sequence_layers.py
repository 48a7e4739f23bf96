"""Flax Linen layers of behaviour (sequence) modelling: DIN attention and the sequence DPO
(Dice and PReLU: :mod:`dpn_jax.nn.activations`) (paper §2.4; docs/dpo_math.md, §'Sequence-based DPO').

Every layer takes a validity ``mask [B,L]`` (True = a real step) and is padding invariant: values
at padded steps, or extra padded steps, never change an output (padded outputs are zero).  The
formulas of the DPO layers live in :mod:`dpn_jax.dpo.sequence`; these modules own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax import dpo
from dpn_jax.dpo import sequence as seq_dpo
from dpn_jax.errors import ConfigError
from dpn_jax.nn.activations import Activation
from dpn_jax.nn.dpo_layers import _declare, normalise_context

Array = jax.Array

DIN_WEIGHT_NORMS = ("none", "softmax", "sigmoid")
DPO_INPUTS = ("features", "behaviour")


class QueryBehaviourDPO(nn.Module):
    """Heterogeneous query-behaviour DPO (docs/dpo_math.md, §'Heterogeneous query-behaviour DPO'): ``y_i = m_i (W(q) x_i + b(q))``.

    ``x [B,L,m], q [B,c], mask [B,L] -> [B,L,features]``; one kernel per instance, generated from
    the query by a :mod:`dpn_jax.dpo.generate` family (``"lowrank"``, Eqn. 5, by default) and
    applied to every behaviour.  A fresh layer behaves like ``nn.Dense(features)`` on each step
    (static part LeCun, dynamic part ``dynamic_scale`` of it).

    ``context_norm`` (default True): the query passes a LayerNorm (learned scale and shift) before
    the generator.  The generators' initialisation assumes a unit-scale context, while a query
    made of fresh CTR embeddings (std 1e-4) leaves the generated part ~1e-5 of the static one
    (docs/results/behaviour_models.md, §'Why the query is normalised before the generator').
    """

    features: int
    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    hidden_activation: str = "relu"
    use_bias: bool = True
    dynamic_scale: float = dpo.DEFAULT_DYNAMIC_SCALE
    context_norm: bool = True
    din_features: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, q: Array, mask: Array | None = None) -> Array:
        """``din_features=True``: ``x`` are the behaviours ``k_i [B,L,d]`` and the layer applies
        to DIN's ``[q, k_i, q−k_i, q⊙k_i]`` (``m = 4d``) without building them
        (:func:`dpn_jax.dpo.sequence.query_behaviour_din_apply`)."""
        if x.ndim != 3 or q.ndim != 2 or x.shape[0] != q.shape[0]:
            raise ValueError(f"QueryBehaviourDPO expects x [B,L,m] and q [B,c], got {x.shape}, "
                             f"{q.shape}")
        z = normalise_context(q, self.context_norm, self.param_dtype)
        in_features = 4 * x.shape[-1] if self.din_features else x.shape[-1]
        gen = dpo.make_generator(
            self.generator, in_features, self.features, z.shape[-1], rank=self.rank,
            heads=self.heads, num_kernels=self.num_kernels, activation=self.hidden_activation,
            use_bias=self.use_bias, dynamic_scale=self.dynamic_scale, dtype=self.param_dtype)
        params = _declare(self, gen.init)
        if self.din_features:
            return seq_dpo.query_behaviour_din_apply(gen, params, z, q, x, mask)
        return seq_dpo.query_behaviour_apply(gen, params, x, z, mask)


class DINFeaturesDense(nn.Module):
    """``nn.Dense(features)`` on DIN's ``[q, k_i, q−k_i, q⊙k_i]`` computed as ``c(q) + k_i M(q)``
    (:func:`dpn_jax.dpo.sequence.din_features_dense`: a ``2d×n`` product per step instead of
    ``4d×n``).  Parameters ``kernel [4d,n]`` and ``bias [n]`` with ``nn.Dense``'s names and
    initialisers, so it is a drop-in for the Dense layer it replaces (same init, same checkpoints)."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: Array, keys: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (4 * keys.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        return seq_dpo.din_features_dense(q, keys, kernel, bias)


class DynamicConv(nn.Module):
    """Homogeneous behaviour-behaviour DPO, a dynamic depthwise convolution (docs/dpo_math.md, §'Homogeneous behaviour-behaviour DPO'; formulas in
    :mod:`dpn_jax.dpo.sequence`): ``x [B,L,d], mask [B,L] -> [B,L,d]``.

    ``kernel_size`` odd (centred window, default 3); ``heads`` kernels per step (0 = one per
    channel, the depthwise ``c = 1`` form of the paper); ``combine`` add | mul of the local and
    global views; ``normalize``: softmax over the valid window slots.
    Params: ``local_kernel [k,d]``, ``local_proj``/``global_proj [d,H·k]``, ``bias [H·k]``.
    """

    kernel_size: int = 3
    heads: int = 0
    combine: str = "add"
    normalize: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        if x.ndim != 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"DynamicConv expects x [B,L,d] and mask [B,L], got {x.shape}, "
                             f"{mask.shape}")
        d = x.shape[-1]
        params = _declare(self, lambda key: seq_dpo.init_dynamic_conv(
            key, d, self.kernel_size, self.heads, self.param_dtype))
        return seq_dpo.dynamic_conv(params, x, mask, combine=self.combine,
                                    normalize=self.normalize)


class DINAttention(nn.Module):
    """DIN's local activation unit (Zhou et al. 2018, §4.3, Fig. 2): attention pooling of the
    behaviours by the query,  ``v = Σ_i m_i a(q, k_i) k_i``,  ``a = MLP([q, k_i, q−k_i, q⊙k_i])``.

    ``q [B,d], keys [B,L,d], mask [B,L] -> [B,d]``.  ``weight_norm``: ``"none"`` (default, the
    paper: "normalization with softmax ... is abandoned" to keep the intensity of interests) or
    ``"softmax"`` over the valid steps (DIN's public code, which also scales by ``1/√d``;
    ``scale=False`` drops that, as DIEN's public ``din_fcn_attention`` does), or ``"sigmoid"``:
    each step's weight ``σ(s_i)`` in (0, 1) on its own (not a distribution over the steps: no
    zero-sum of the score gradients within a row; a research option for DIEN's gates).
    ``hidden`` (80, 40) with ``act`` sigmoid: DIN's public code; ``"dice"`` uses statistics
    over the valid steps only.  The output unit is linear.  An empty history pools to zeros.

    ``dpo=True`` is the DPO-armed unit of the paper (§3.2, Table 5; docs/dpo_math.md, §'Heterogeneous query-behaviour DPO'): the FIRST layer of
    the attention MLP becomes the heterogeneous query-behaviour DPO ``W(q) x_i + b(q)``, with
    ``x_i`` the DIN features (``dpo_input="features"``, default: its static kernel is exactly
    DIN's first Dense layer, so at init the unit is DIN's plus a small query-generated part) or
    the behaviour alone (``"behaviour"``: the query enters only through the generated weights).
    """

    hidden: Sequence[int] = (80, 40)
    act: str = "sigmoid"
    weight_norm: str = "none"
    momentum: float = 0.9
    dpo: bool = False
    dpo_input: str = "features"
    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    scale: bool = True

    @nn.compact
    def __call__(self, q: Array, keys: Array, mask: Array, train: bool = False,
                 return_weights: bool = False) -> Array | tuple[Array, Array]:
        """Pooled ``[B,d]`` (and the masked weights ``[B,L]``, zero on padded steps, when
        ``return_weights``)."""
        if keys.ndim != 3 or q.shape != (keys.shape[0], keys.shape[2]) or mask.shape != keys.shape[:2]:
            raise ValueError(f"DINAttention expects q [B,d], keys [B,L,d], mask [B,L]; got "
                             f"{q.shape}, {keys.shape}, {mask.shape}")
        if self.weight_norm not in DIN_WEIGHT_NORMS:
            raise ConfigError(f"DIN attention: weight_norm={self.weight_norm!r}; expected one of "
                              f"{list(DIN_WEIGHT_NORMS)}")
        if self.dpo_input not in DPO_INPUTS:
            raise ConfigError(f"DIN attention: dpo_input={self.dpo_input!r}; expected one of "
                              f"{list(DPO_INPUTS)}")
        if self.dpo and not self.hidden:
            raise ConfigError("DIN attention with dpo=True needs at least one hidden layer "
                              "(the DPO replaces the first one)")
        keys = jnp.where(mask[..., None], keys, 0)  # padded values never reach a parameter
        # The first layer never builds [q, k_i, q−k_i, q⊙k_i]: it is c(q) + k_i M(q)
        # (dpo.sequence.din_features_dense), 2x (static) to 4x (DPO) fewer FLOPs per step.
        h = None if self.hidden else seq_dpo.din_features(q, keys)
        for i, width in enumerate(self.hidden):
            if i == 0 and self.dpo:
                h = QueryBehaviourDPO(width, self.generator, self.rank, self.heads,
                                      self.num_kernels, din_features=self.dpo_input == "features",
                                      name="dpo_0")(keys, q, mask)
            elif i == 0:
                h = DINFeaturesDense(width, name="dense_0")(q, keys)
            else:
                h = nn.Dense(width, name=f"dense_{i}")(h)
            h = Activation(self.act, self.momentum, name=f"act_{i}")(h, train, mask)
        s = nn.Dense(1, name="score")(h)[..., 0]
        if self.weight_norm == "softmax":
            s = jnp.where(mask, s / math.sqrt(keys.shape[-1]) if self.scale else s, -1e9)
            s = jax.nn.softmax(s, axis=-1)
        elif self.weight_norm == "sigmoid":
            s = jax.nn.sigmoid(s)
        a = jnp.where(mask, s, 0)
        pooled = jnp.einsum("bl,bld->bd", a, keys)
        return (pooled, a) if return_weights else pooled
