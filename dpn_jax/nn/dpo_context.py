"""``FieldContextDPO``: the feature DPO whose field blocks get kernels from the other fields."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax import dpo
from dpn_jax.dpo.per_field import apply_per_field_context, leave_one_field_out
from dpn_jax.nn.dpo_layers import _declare


class FieldContextDPO(nn.Module):
    """``e [B,F,d] -> [B,features]``: ``Σ_f W(e_{-f}) e_f + mean_f b(e_{-f})`` (NOTES §3,
    context "other fields"); same generator options as ``FeatureDPO``."""

    features: int
    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    hidden_activation: str = "relu"
    use_bias: bool = True
    dynamic_scale: float = dpo.DEFAULT_DYNAMIC_SCALE
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, e: jax.Array) -> jax.Array:
        b, f, d = e.shape
        gen = dpo.make_generator(
            self.generator, f * d, self.features, f * d, rank=self.rank, heads=self.heads,
            num_kernels=self.num_kernels, activation=self.hidden_activation,
            use_bias=self.use_bias, dynamic_scale=self.dynamic_scale, dtype=self.param_dtype)
        params = _declare(self, gen.init)
        return apply_per_field_context(gen, params, e, leave_one_field_out(e))
