"""Cross-network baselines: CrossNet, DCN, DCN-V2, CIN and xDeepFM.

The interaction layers live in ``dpn_jax.nn.cross_layers`` (equations documented there); this
module only assembles them with the shared embedding, linear term and DNN tower. A model whose
``hidden`` is empty drops its DNN branch (``dcn`` -> CrossNet, ``xdeepfm`` -> CIN).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models.bases import ProtocolTower
from dpn_jax.models.linear import LinearTerm
from dpn_jax.models.registry import register
from dpn_jax.nn.cross_layers import CIN, CrossNet, CrossNetV2
from dpn_jax.nn.embedding import FieldEmbedding
from dpn_jax.nn.mlp import MLP

STRUCTURES = ("parallel", "stacked")


def _flat(e: jnp.ndarray) -> jnp.ndarray:
    return e.reshape(e.shape[0], -1)


@register("crossnet")
class CrossNetModel(nn.Module):
    """DCN's cross network alone: x_{l+1} = x0 (x_l^T w_l) + b_l + x_l, then a logit.

    Wang et al., "Deep & Cross Network for Ad Click Predictions", ADKDD 2017, Eqn. 3 on the
    flattened field embeddings, output ``Dense(1)(x_L)``. Defaults: embedding 10 (AFN/BARS
    protocol); ``num_layers=3`` cross layers (FuxiCTR's DCN default and BARS DCN_frappe_x1;
    BARS's tuned CrossNet_frappe_x1 uses 6, ``--set num_layers=6``)."""

    schema: Schema
    embedding_dim: int = 10
    num_layers: int = 3

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        x = CrossNet(self.num_layers, name="cross")(_flat(e))
        return nn.Dense(1, name="out")(x)[:, 0]


@register("dcn")
class DCN(ProtocolTower, CrossNetModel):
    """Deep & Cross Network: CrossNet and a DNN in parallel, concatenated into one logit.

    Wang et al., ADKDD 2017 (Eqn. 3 cross layers; its combination layer
    ``Dense(1)([x_L, h_L])``). Defaults: embedding 10, ``num_layers=3`` cross layers and a DNN
    of 400-400-400 with BatchNorm and ReLU (BARS DCN_frappe_x1, the AFN/BARS protocol); dropout
    off like the ``dnn`` baseline (BARS's tuned run used 0.2: ``--set dropout=0.2``)."""

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        x0 = _flat(e)
        parts = [CrossNet(self.num_layers, name="cross")(x0)]
        if self.hidden:
            parts.append(self.tower(name="mlp")(x0, train))
        return nn.Dense(1, name="out")(jnp.concatenate(parts, axis=-1))[:, 0]


@register("dcnv2")
class DCNv2(nn.Module):
    """DCN-V2: full-matrix cross layers x0 ⊙ (W x_l + b) + x_l with a DNN, parallel or stacked.

    Wang et al., "DCN V2: Improved Deep & Cross Network ...", WWW 2021: Eqn. 1 cross layer,
    ``low_rank > 0`` switches to the mixture of ``num_experts`` low-rank experts with tanh in
    the projected space (Eqns. 3-4, "DCN-Mix"). ``structure="parallel"`` concatenates the cross
    output and ``DNN(x0)`` into the logit; ``"stacked"`` feeds the cross output through the DNN
    (the paper's Fig. 2; which one is better is data-dependent). Defaults:
    ``structure="parallel"`` and ``low_rank=0`` (full rank) as in FuxiCTR's DCNv2 config and
    BARS DCNv2_frappe_x1; ``num_layers=3`` (FuxiCTR default; BARS's frappe run tuned 4);
    ``low_rank=32, num_experts=4`` when the mixture is on (FuxiCTR); embedding 10 and DNN
    400-400-400 with BatchNorm (AFN/BARS protocol, BARS DCNv2_frappe_x1); dropout off.
    ``matmul_dtype``: the DNN's and the full-rank cross layers' products (as ``dnn``'s)."""

    schema: Schema
    embedding_dim: int = 10
    num_layers: int = 3
    structure: str = "parallel"
    low_rank: int = 0
    num_experts: int = 4
    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9
    matmul_dtype: str = "float32"

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        if self.structure not in STRUCTURES:
            raise ConfigError(f"dcnv2: structure={self.structure!r} is not known; choose one of {list(STRUCTURES)}")
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        x0 = _flat(e)
        cross = CrossNetV2(self.num_layers, self.low_rank, self.num_experts, self.matmul_dtype,
                           name="cross")(x0)
        if not self.hidden:
            h = cross
        else:
            mlp = MLP(tuple(self.hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                      matmul_dtype=self.matmul_dtype, name="mlp")
            if self.structure == "stacked":
                h = mlp(cross, train)
            else:
                h = jnp.concatenate([cross, mlp(x0, train)], axis=-1)
        return nn.Dense(1, name="out")(h)[:, 0]


@register("cin")
class CINModel(nn.Module):
    """xDeepFM's Compressed Interaction Network alone, plus the linear term.

    Lian et al., "xDeepFM: Combining Explicit and Implicit Feature Interactions for Recommender
    Systems", KDD 2018: Eqns. 6-7 (vector-wise interactions, sum-pooled feature maps ``p+``) and
    Eqn. 8's output with the first-order term: ``linear + Dense(1)(p+)``. Defaults: embedding 10
    (AFN/BARS protocol); ``cin_layer_sizes=(200, 200, 200)``: 200 feature maps per layer, the
    paper's setting on Criteo (its implementation details), three layers (its depth study);
    BARS's tuned CIN_frappe_x1 uses 64-64-64 (``--set cin_layer_sizes=64,64,64``)."""

    schema: Schema
    embedding_dim: int = 10
    cin_layer_sizes: Sequence[int] = (200, 200, 200)

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        p = CIN(tuple(self.cin_layer_sizes), name="cin")(e)
        return LinearTerm(self.schema, name="linear")(batch) + nn.Dense(1, name="out")(p)[:, 0]


@register("xdeepfm")
class XDeepFM(ProtocolTower, CINModel):
    """xDeepFM: linear term + CIN + DNN, combined into one logit.

    Lian et al., KDD 2018, Eqn. 9: ``w_lin^T a + w_dnn^T x_dnn + w_cin^T p+ + b``, here
    ``LinearTerm(batch) + Dense(1)([p+, DNN(e)])`` (CIN: Eqns. 6-7). Defaults: embedding 10;
    DNN 400-400-400 with BatchNorm and ReLU (the paper's 400 units per DNN layer and the
    AFN/BARS protocol), dropout off; ``cin_layer_sizes=(200, 200, 200)`` as for ``cin`` (the
    paper's Criteo setting; BARS's tuned xDeepFM_frappe_x1 uses a single layer of 64)."""

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        parts = [CIN(tuple(self.cin_layer_sizes), name="cin")(e)]
        if self.hidden:
            parts.append(self.tower(name="mlp")(_flat(e), train))
        logit = nn.Dense(1, name="out")(jnp.concatenate(parts, axis=-1))[:, 0]
        return LinearTerm(self.schema, name="linear")(batch) + logit
