"""``DPNTower``: the hidden layers of the feature-based DPN (``dpn``, ``dyjoint``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.nn.dpo_context import FieldContextDPO
from dpn_jax.nn.dpo_layers import FeatureDPO
from dpn_jax.nn.embedding import embedded_field_names
from dpn_jax.nn.mlp import MLP


def dpo_layer_indices(spec: str, depth: int) -> frozenset[int]:
    """``"first"`` | ``"second"`` | ``"all"`` | ``"1,3"`` (1-based) -> 0-based layer indices."""
    named = {"first": {0}, "second": {1}, "last": {depth - 1}, "all": set(range(depth))}
    if spec in named:
        out = named[spec]
    else:
        try:
            out = {int(s) - 1 for s in spec.split(",") if s.strip()}
        except ValueError:
            out = None
    if not out or any(not 0 <= i < depth for i in out):
        raise ConfigError(f"dpo_layers={spec!r}: expected first, second, last, all or 1-based "
                          f"layer numbers in 1..{depth} such as '1,2'")
    return frozenset(out)


def context_fields(spec: str, schema: Schema | None) -> list[int] | None:
    """Field indices named by ``context`` (None for "input" / "other_fields")."""
    if spec in ("input", "other_fields"):
        return None
    names = embedded_field_names(schema) if schema is not None else []
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise ConfigError(f"context={spec!r}: unknown field(s) {unknown}; use input, other_fields "
                          f"or comma-separated fields of this dataset: {', '.join(names)}")
    return [names.index(w) for w in wanted]


class DPNTower(MLP):
    """Field slots ``e [B,F,d]`` -> ``[B, hidden[-1]]``: the protocol tower over the flattened
    slots whose layers in ``dpo_layers`` (first | second | last | all | "1,3") are feature DPOs
    ``y = W(z) x + b(z)`` (``dpo_<i>``; the others ``dense_<i>``, BatchNorm ``bn_<i>``).

    ``context``: ``input`` (z = the flattened slots), ``other_fields`` (the first layer's field
    blocks each get their kernel from the other fields) or comma-separated field names of
    ``schema``. The generator options are :class:`~dpn_jax.nn.dpo_layers.FeatureDPO`'s; a DPO
    layer has no bias before BatchNorm, as a Dense layer."""

    schema: Schema | None = None  # the slots' fields, for a ``context`` that names some
    dpo_layers: str = "first"
    context: str = "input"
    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    context_norm: bool = False
    layer_names: bool = True

    def linear(self, i: int, width: int, x: jnp.ndarray, context: Any) -> jnp.ndarray:
        e, z, dpo_at = context
        if i not in dpo_at:
            return super().linear(i, width, x, context)
        dpo = dict(generator=self.generator, rank=self.rank, heads=self.heads,
                   num_kernels=self.num_kernels, use_bias=not self.batch_norm,
                   context_norm=self.context_norm, matmul_dtype=self.matmul_dtype)
        if i == 0 and self.context == "other_fields":
            return FieldContextDPO(width, **dpo, name=f"dpo_{i}")(e)
        return FeatureDPO(width, **dpo, name=f"dpo_{i}")(x, z)

    @nn.compact
    def __call__(self, e: jnp.ndarray, train: bool = False) -> jnp.ndarray:  # type: ignore[override]
        dpo_at = dpo_layer_indices(self.dpo_layers, len(self.hidden))
        ctx_idx = context_fields(self.context, self.schema)
        flat = e.reshape(e.shape[0], -1)
        z = flat if ctx_idx is None else e[:, jnp.asarray(ctx_idx)].reshape(e.shape[0], -1)
        return self.layers(flat, train, (e, z, dpo_at))
