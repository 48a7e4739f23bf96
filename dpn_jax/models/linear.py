"""Shallow baselines: logistic regression and the factorization machine."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.models.registry import register
from dpn_jax.nn.embedding import FieldEmbedding


class LinearTerm(nn.Module):
    """``w0 + Σ_f w[x_f]``: a one-dimensional embedding per feature, summed over fields."""

    schema: Schema

    @nn.compact
    def __call__(self, batch) -> jnp.ndarray:
        w = FieldEmbedding(self.schema, dim=1, init_std=0.0, name="weights")(batch)
        return jnp.sum(w, axis=(1, 2)) + self.param("bias", nn.initializers.zeros, ())


def fm_interaction(e: jnp.ndarray) -> jnp.ndarray:
    """``Σ_{i<j} <e_i, e_j>`` for ``e: [B, F, d]`` in O(F d) (Rendle 2010, Eqn. 5):
    ``1/2 Σ_d ((Σ_i e_id)^2 - Σ_i e_id^2)``."""
    s = jnp.sum(e, axis=1)
    return 0.5 * jnp.sum(s * s - jnp.sum(e * e, axis=1), axis=-1)


@register("lr")
class LR(nn.Module):
    """Logistic regression on one-hot features (the Table 1 LR baseline)."""

    schema: Schema

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        return LinearTerm(self.schema, name="linear")(batch)


@register("fm")
class FM(nn.Module):
    """Factorization machine (Rendle, ICDM 2010): linear term + Σ_{i<j} <v_i, v_j>.

    Defaults: embedding 10 (the AFN/BARS protocol)."""

    schema: Schema
    embedding_dim: int = 10

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        return LinearTerm(self.schema, name="linear")(batch) + fm_interaction(e)
