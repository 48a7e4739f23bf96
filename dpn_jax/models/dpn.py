"""Dynamic Parameterized Networks (Zhu et al., arXiv 2111.04983): feature- and field-based DPN."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models.registry import register
from dpn_jax.nn.dpo_context import FieldContextDPO
from dpn_jax.nn.dpo_layers import FeatureDPO, FieldDPO
from dpn_jax.nn.dropout import Dropout16, dropout_active
from dpn_jax.nn.embedding import FieldEmbedding, embedded_field_names
from dpn_jax.nn.mlp import MLP, activation
from dpn_jax.nn.precision import dense_dot_general


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


def context_fields(spec: str, schema: Schema) -> list[int] | None:
    """Field indices named by ``context`` (None for "input" / "other_fields")."""
    if spec in ("input", "other_fields"):
        return None
    names = embedded_field_names(schema)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in names]
    if unknown or not wanted:
        raise ConfigError(f"context={spec!r}: unknown field(s) {unknown}; use input, other_fields "
                          f"or comma-separated fields of this dataset: {', '.join(names)}")
    return [names.index(w) for w in wanted]


def dpn_tower(m: nn.Module, e: jnp.ndarray, train: bool, *, generator_heads: int) -> jnp.ndarray:
    """The hidden layers of the feature DPN over field slots ``e [B,F,d]`` -> ``[B, hidden[-1]]``.

    Called inside the compact ``__call__`` of ``m`` (``DPN``, ``DyJoint``), so the layers are
    ``m``'s own submodules named ``dpo_<i>``/``dense_<i>``/``bn_<i>``; ``m`` supplies ``schema``,
    ``hidden``, ``batch_norm``, ``dropout``, ``act``, ``bn_momentum``, ``dpo_layers``, ``context``,
    ``generator``, ``rank``, ``num_kernels``, ``context_norm``."""
    hidden = tuple(m.hidden)
    layers = dpo_layer_indices(m.dpo_layers, len(hidden))
    ctx_idx = context_fields(m.context, m.schema)
    flat = e.reshape(e.shape[0], -1)
    z = flat if ctx_idx is None else e[:, jnp.asarray(ctx_idx)].reshape(e.shape[0], -1)
    matmul_dtype = getattr(m, "matmul_dtype", "float32")
    gen_kw = dict(generator=m.generator, rank=m.rank, heads=generator_heads,
                  num_kernels=m.num_kernels, use_bias=not m.batch_norm,
                  context_norm=m.context_norm, matmul_dtype=matmul_dtype)
    f = activation(m.act)
    h = flat
    for i, width in enumerate(hidden):
        if i in layers and i == 0 and m.context == "other_fields":
            h = FieldContextDPO(width, **gen_kw, name=f"dpo_{i}")(e)
        elif i in layers:
            h = FeatureDPO(width, **gen_kw, name=f"dpo_{i}")(h, z)
        else:
            h = nn.Dense(width, use_bias=not m.batch_norm, dot_general=dense_dot_general(matmul_dtype),
                         kernel_init=nn.initializers.glorot_normal(), name=f"dense_{i}")(h)
        if m.batch_norm:
            h = nn.BatchNorm(use_running_average=not train, momentum=m.bn_momentum,
                             name=f"bn_{i}")(h)
        h = f(h)
        if dropout_active(m.dropout):
            h = Dropout16(m.dropout)(h, deterministic=not train)
    return h


@register("dpn")
class DPN(nn.Module):
    """Feature-based DPN ("DyMLP"): the DNN with DPO layers y = W(z)x + b(z) in place of dense ones.

    Paper §2.2-2.3 and Table 2 (docs/dpo_math.md, §'Feature-based DPO'): the first fully connected layer (``dpo_layers``:
    first | second | all | "1,3") becomes a dynamic parameterized operation whose kernel is
    generated per instance from a context (``context``: ``input`` = the flattened embeddings,
    ``other_fields`` = each field block's kernel from the other fields, or comma-separated field
    names). Generators: lowrank (Eqn. 5, default, rank 4), hyperdense, multihead (``heads``),
    mixture (``num_kernels``), diagonal, rank1. Everything else is the AFN/BARS DNN: embedding
    10, 400-400-400, BatchNorm, ReLU. ``matmul_dtype`` (as ``dnn``'s; single-head lowrank):
    the DPO layer's fused product and the dense layers' products in bfloat16."""

    schema: Schema
    embedding_dim: int = 10
    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9
    dpo_layers: str = "first"
    context: str = "input"
    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    context_norm: bool = False
    matmul_dtype: str = "float32"

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        h = dpn_tower(self, e, train, generator_heads=self.heads)
        return nn.Dense(1, name="out")(h)[:, 0]


class _FieldInteraction(nn.Module):
    """Field DPO over the field embeddings (z = the embeddings themselves), flattened."""

    aggregation: str
    generator: str
    rank: int
    features: int | None
    layers: int
    hidden_activation: str = "relu"
    dynamic_scale: float = 0.25
    context_norm: bool = False

    @nn.compact
    def __call__(self, e: jnp.ndarray) -> jnp.ndarray:
        x = e
        for i in range(self.layers):
            # z = the original embeddings at every layer: each field keeps its own context.
            x = FieldDPO(self.aggregation, self.generator, self.rank, self.features,
                         hidden_activation=self.hidden_activation,
                         dynamic_scale=self.dynamic_scale, context_norm=self.context_norm,
                         name=f"field_dpo_{i}")(x, e)
        return x.reshape(x.shape[0], -1)


@register("dpn_field", legacy={"context_norm": False})  # option added 2026-11-29
class DPNField(nn.Module):
    """Field-based DPN alone: field DPO y_i = f(x_i; g(z)) over field embeddings -> output layer.

    Paper §2.3 (docs/dpo_math.md, §'Field-based DPO'), Table 1's single-module form: ``aggregation`` sum (default:
    y_i = Σ_j g(z_j) x_i) | self (y_i = g(x_i) x_i) | attentive | concat; low-rank generator
    (rank 4) shared by the fields; ``layers`` stacked field DPOs, each with the original
    embeddings as context; a linear term as in FM-style models.

    ``self`` with z = x has NO cross-field term: each y_i is a function of field i alone (at every
    layer, since each layer's context is the field's own embedding), so the model is additive in
    the fields, logistic regression's class (tested).

    Defaults that differ from the feature DPO, chosen by the Table 2 aggregation runs
    (``experiments/table2.py``; docs/results/feature_models.md, §'Measurements behind the DPN
    defaults'): an identity generator hidden layer, embedding init std 0.1, dynamic scale 1.0 and
    the context LayerNorm (``context_norm``), without which the multiplicative path can stay at
    its flat start."""

    schema: Schema
    embedding_dim: int = 10
    aggregation: str = "sum"
    generator: str = "lowrank"
    rank: int = 4
    features: int = 0  # 0: keep the embedding size
    layers: int = 1
    hidden_activation: str = "identity"
    dynamic_scale: float = 1.0
    embedding_init_std: float = 0.1
    context_norm: bool = True

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        from dpn_jax.models.linear import LinearTerm

        e = FieldEmbedding(self.schema, dim=self.embedding_dim, init_std=self.embedding_init_std,
                           name="embedding")(batch)
        y = _FieldInteraction(self.aggregation, self.generator, self.rank, self.features or None,
                              self.layers, self.hidden_activation, self.dynamic_scale,
                              self.context_norm, name="interaction")(e)
        return LinearTerm(self.schema, name="linear")(batch) + nn.Dense(1, name="out")(y)[:, 0]


@register("dpn_field_dnn", legacy={"context_norm": False})  # option added 2026-11-29
class DPNFieldDNN(nn.Module):
    """Field-based DPN with a DNN in parallel: [field DPO output | DNN(embeddings)] -> logit.

    The field DPO as in ``dpn_field`` (sum aggregation, context LayerNorm) but on the DNN's
    embeddings (std 1e-4) with the feature DPO's generator defaults; the DNN is the AFN/BARS
    tower (400-400-400, BatchNorm, ReLU); both outputs are concatenated (DCN-style).  Results per
    aggregation: docs/results/feature_models.md, §'Measurements behind the DPN defaults'."""

    schema: Schema
    embedding_dim: int = 10
    aggregation: str = "sum"
    generator: str = "lowrank"
    rank: int = 4
    features: int = 0
    layers: int = 1
    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    bn_momentum: float = 0.9
    context_norm: bool = True

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        y = _FieldInteraction(self.aggregation, self.generator, self.rank, self.features or None,
                              self.layers, context_norm=self.context_norm,
                              name="interaction")(e)
        h = MLP(tuple(self.hidden), self.batch_norm, self.dropout, "relu", self.bn_momentum,
                name="mlp")(e.reshape(e.shape[0], -1), train)
        return nn.Dense(1, name="out")(jnp.concatenate([y, h], axis=-1))[:, 0]
