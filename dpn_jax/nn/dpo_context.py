"""``FieldContextDPO``: the feature DPO whose field blocks get kernels from the other fields."""

from __future__ import annotations

import flax.linen as nn
import jax

from dpn_jax.dpo.per_field import apply_per_field_context, leave_one_field_out
from dpn_jax.nn.dpo_layers import FeatureDPO, _declare, normalise_context


class FieldContextDPO(FeatureDPO):
    """``e [B,F,d] -> [B,features]``: ``Σ_f W(e_{-f}) e_f + mean_f b(e_{-f})`` (docs/dpo_math.md, §'Feature-based DPO',
    context "other fields"); the generator options are ``FeatureDPO``'s.  With ``context_norm``
    the flattened embedding is normalised once and then each field's block is zeroed."""

    @nn.compact
    def __call__(self, e: jax.Array) -> jax.Array:  # type: ignore[override]
        b, f, d = e.shape
        gen = self._generator(f * d, f * d)
        params = _declare(self, gen.init)
        z = normalise_context(e.reshape(b, f * d), self.context_norm, self.param_dtype)
        z = z.reshape(b, f, d)
        return apply_per_field_context(gen, params, e, leave_one_field_out(z))
