"""Dynamic Parameterized Networks (Zhu et al., arXiv 2111.04983): feature- and field-based DPN."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.models.bases import FeatureDPNModel
from dpn_jax.models.registry import register
from dpn_jax.nn.dpo_layers import FieldDPO
from dpn_jax.nn.embedding import FieldEmbedding
from dpn_jax.nn.mlp import MLP


@register("dpn")
class DPN(FeatureDPNModel):
    """Feature-based DPN ("DyMLP"): the DNN with DPO layers y = W(z)x + b(z) in place of dense ones.

    Paper §2.2-2.3 and Table 2 (docs/dpo_math.md, §'Feature-based DPO'): the first fully connected layer (``dpo_layers``:
    first | second | all | "1,3") becomes a dynamic parameterized operation whose kernel is
    generated per instance from a context (``context``: ``input`` = the flattened embeddings,
    ``other_fields`` = each field block's kernel from the other fields, or comma-separated field
    names). Generators: lowrank (Eqn. 5, default, rank 4), hyperdense, multihead (``heads``),
    mixture (``num_kernels``), diagonal, rank1. Everything else is the AFN/BARS DNN: embedding
    10, 400-400-400, BatchNorm, ReLU. ``matmul_dtype`` (as ``dnn``'s; single-head lowrank):
    the DPO layer's fused product and the dense layers' products in bfloat16."""

    heads: int = 1
    num_kernels: int = 4
    context_norm: bool = False
    matmul_dtype: str = "float32"

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        h = self.dpn_tower(heads=self.heads, num_kernels=self.num_kernels,
                           context_norm=self.context_norm, matmul_dtype=self.matmul_dtype)(e, train)
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
