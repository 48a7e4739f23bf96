"""Attention (AutoInt), logarithmic (AFN), two-stream (FinalMLP) and parameter-generation (APG)
baselines.

All use the shared ``FieldEmbedding`` (dimension 10, the AFN/BARS protocol) and, for their DNN
parts, the protocol tower ``MLP`` (Dense -> BatchNorm -> activation -> dropout). The layers live in
``dpn_jax.nn.attention_layers`` and ``dpn_jax.nn.afn_layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models.bases import ProtocolTower
from dpn_jax.models.registry import register
from dpn_jax.nn.afn_layers import DEFAULT_EPS, LogarithmicTransform
from dpn_jax.nn.attention_layers import APGTower, BilinearFusion, FeatureGate, InteractingLayer
from dpn_jax.nn.embedding import FieldEmbedding, embedded_field_names
from dpn_jax.nn.mlp import MLP


def _flat(e: jnp.ndarray) -> jnp.ndarray:
    return e.reshape(e.shape[0], -1)


def _field_indices(schema: Schema, names: str, option: str) -> tuple[int, ...]:
    """Positions of the comma-separated field ``names`` in the ``[B, F, d]`` embedding tensor
    (ConfigError if unknown). Options hold names as one string so ``--set fs1_context=user,item``
    parses (an empty-tuple default would be parsed as integers)."""
    names = [n.strip() for n in names.split(",") if n.strip()]
    order = embedded_field_names(schema)
    bad = [n for n in names if n not in order]
    if bad:
        raise ConfigError(f"{option}: unknown field(s) {bad}; the dataset's fields are {list(order)}")
    return tuple(order.index(n) for n in names)


def _logit(tower: MLP, x: jnp.ndarray, train: bool, out: str) -> jnp.ndarray:
    """A tower and its output unit ``out`` -> ``[B]``."""
    return nn.Dense(1, name=out)(tower(x, train))[:, 0]


def _afn_logit(e: jnp.ndarray, log_net: LogarithmicTransform, tower: MLP, train: bool) -> jnp.ndarray:
    """AFN: the logarithmic neurons' cross features of ``e [B,F,d]`` -> tower -> unit ``out``."""
    return _logit(tower, _flat(log_net(e, train)), train, "out")


# ---------------------------------------------------------------------------------------------
# AutoInt / AutoInt+
# ---------------------------------------------------------------------------------------------


@register("autoint")
class AutoInt(nn.Module):
    """Multi-head self-attention over field embeddings with residual connections (AutoInt).

    Song et al., "AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural
    Networks", CIKM 2019. Implements Eqns. 5-8 (``InteractingLayer``: per-head inner-product
    attention, concatenated heads, ``ReLU(e~ + W_Res e)``) stacked ``attention_layers`` times,
    then Eqn. 9's output unit on the concatenated field vectors.

    Defaults: the paper's setting (Sec. 5.1; the official run script uses ``--blocks 3 --heads 2
    --block_shape [64,64,64]``): 3 interacting layers, 2 heads of ``d' = 32`` (``attention_dim``
    64 = heads x d'), residual on, unscaled inner products (Eqn. 5). Embedding 10 (AFN/BARS
    protocol, the paper used 16). BARS's tuned Frappe config differs (6 layers, 4 heads,
    attention_dim 128): ``--set attention_layers=6 num_heads=4 attention_dim=128``.
    """

    schema: Schema
    embedding_dim: int = 10
    attention_layers: int = 3
    num_heads: int = 2
    attention_dim: int = 64
    use_residual: bool = True
    use_scale: bool = False

    def attention_logit(self, e: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.attention_layers):
            e = InteractingLayer(self.attention_dim, self.num_heads, self.use_residual,
                                 self.use_scale, name=f"attention_{i}")(e)
        return nn.Dense(1, name="attention_out")(_flat(e))[:, 0]

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        return self.attention_logit(e)


@register("autoint_plus")
class AutoIntPlus(ProtocolTower, AutoInt):
    """AutoInt+: AutoInt's attention stack plus a parallel DNN 400-400-400 on the same embeddings.

    Song et al., CIKM 2019 (the AutoInt+ variant, jointly trained with a feed-forward network).
    The logit is the sum of the attention output unit (Eqns. 5-9) and the DNN's output unit, as in
    FuxiCTR. Attention defaults as ``autoint``; DNN: 400-400-400 with BatchNorm and ReLU, no
    dropout (the AFN/BARS protocol tower; BARS's AutoInt+ Frappe config also uses 400-400-400+BN).
    """

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        return self.attention_logit(e) + _logit(self.tower(name="dnn_mlp"), _flat(e), train,
                                                "dnn_out")


# ---------------------------------------------------------------------------------------------
# AFN / AFN+
# ---------------------------------------------------------------------------------------------


@register("afn")
class AFN(nn.Module):
    """Adaptive Factorization Network: logarithmic neurons (learned-order cross features) -> MLP.

    Cheng, Shen & Huang, "Adaptive Factorization Network: Learning Adaptive-Order Feature
    Interactions", AAAI 2020. Implements Eqns. 3-6: ``y_j = exp(sum_i w_ij ln max(|e_i|, eps))``
    per embedding dimension (``LogarithmicTransform``, BatchNorm after the log and after the
    exp), the ``N x d`` cross features flattened into an MLP, then one output unit.

    Defaults: embedding 10 and MLP 400-400-400 with BatchNorm + ReLU, no dropout (paper Sec. 4.1;
    official code ``deep_layers=400,400,400``, ``dropout=1,1,1`` keep-probabilities); 600
    logarithmic neurons = the official script's Frappe setting (``hidden_size=600``; MovieLens 800,
    Avazu 1200, Criteo 1500; BARS's Frappe config used 1000); ``log_eps`` 1e-5 (FuxiCTR/BARS).
    """

    schema: Schema
    embedding_dim: int = 10
    log_neurons: int = 600
    log_eps: float = DEFAULT_EPS
    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9

    def mlp(self, hidden: Sequence[int], name: str) -> MLP:
        return MLP(tuple(hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                   name=name)

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        log_net = LogarithmicTransform(self.log_neurons, self.log_eps, self.batch_norm,
                                       self.bn_momentum, name="log_net")
        return _afn_logit(e, log_net, self.mlp(self.hidden, "mlp"), train)


@register("afn_plus")
class AFNPlus(nn.Module):
    """AFN+: AFN ensembled with a DNN on its own embeddings, combined by learned weights.

    Cheng, Shen & Huang, AAAI 2020 (the AFN+ variant): ``y = w1 * y_AFN + w2 * y_DNN + b`` with
    ``w1 = w2 = 0.5``, ``b = 0`` at start (the official code). The DNN has a separate embedding
    table. Deviation: the official code trains with three losses (ensemble + each branch) and
    stops the ensemble's gradient into the branches; dpn-jax's loop trains one logit, so here
    the ensemble loss trains everything end to end.

    Defaults: AFN's (600 log neurons, 400-400-400) and a DNN of 400-400-400 with BatchNorm
    (official code ``layers_dnn = [400, 400, 400]``).
    """

    schema: Schema
    embedding_dim: int = 10
    log_neurons: int = 600
    log_eps: float = DEFAULT_EPS
    hidden: Sequence[int] = (400, 400, 400)
    dnn_hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9

    def mlp(self, hidden: Sequence[int], name: str) -> MLP:
        return MLP(tuple(hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                   name=name)

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        log_net = LogarithmicTransform(self.log_neurons, self.log_eps, self.batch_norm,
                                       self.bn_momentum, name="log_net")
        y_afn = _afn_logit(e, log_net, self.mlp(self.hidden, "mlp"), train)
        e2 = FieldEmbedding(self.schema, dim=self.embedding_dim, name="dnn_embedding")(batch)
        y_dnn = _logit(self.mlp(self.dnn_hidden, "dnn_mlp"), _flat(e2), train, "dnn_out")
        w = self.param("ensemble_weights", nn.initializers.constant(0.5), (2,))
        b = self.param("ensemble_bias", nn.initializers.zeros, ())
        return w[0] * y_afn + w[1] * y_dnn + b


# ---------------------------------------------------------------------------------------------
# FinalMLP
# ---------------------------------------------------------------------------------------------


@register("finalmlp")
class FinalMLP(nn.Module):
    """Two MLP streams with feature-selection gates and multi-head bilinear fusion (FinalMLP).

    Mao et al., "FinalMLP: An Enhanced Two-Stream MLP Model for CTR Prediction", AAAI 2023.
    Eqns. 1-2: ``h_s = 2 sigmoid(Gate_s(x_s)) (.) e`` per stream, where ``x_s`` is the
    concatenated embeddings of the stream's context fields (``fs1_context`` / ``fs2_context``,
    comma-separated names), or a learnable vector when empty (a constant input: the gate is then
    a learned global one). Eqns. 3-5: ``y = sum_j b_j + w1_j^T o1_j + w2_j^T o2_j +
    o1_j^T W3_j o2_j`` over ``num_heads`` chunks of the stream outputs ``o1, o2``. Context fields
    reuse the shared embeddings (FuxiCTR embeds them again in a separate table).
    ``use_fs=False`` gives DualMLP.

    Defaults: BARS's FinalMLP Frappe_x1 config (``FinalMLP_frappe_x1_tuner_config_16``):
    embedding 10, stream 1 MLP (400,), stream 2 MLP (100,), both with BatchNorm and dropout 0.4,
    gate MLP (400,), 5 fusion heads. BARS used ``fs1_context=user``, ``fs2_context=item`` on
    Frappe (dataset-specific, hence empty here) and ``embedding_l2=0.05``.
    """

    schema: Schema
    embedding_dim: int = 10
    mlp1_hidden: Sequence[int] = (400,)
    mlp2_hidden: Sequence[int] = (100,)
    batch_norm: bool = True
    dropout: float = 0.4
    act: str = "relu"
    bn_momentum: float = 0.9
    use_fs: bool = True
    fs_hidden: Sequence[int] = (400,)
    fs1_context: str = ""
    fs2_context: str = ""
    num_heads: int = 5

    def _gate_input(self, e: jnp.ndarray, fields: str, name: str, option: str) -> jnp.ndarray:
        if not fields.strip():
            ctx = self.param(name, nn.initializers.zeros, (self.embedding_dim,))
            return jnp.broadcast_to(ctx, (e.shape[0], self.embedding_dim))
        idx = _field_indices(self.schema, fields, option)
        return _flat(e[:, jnp.asarray(idx)])

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        flat = _flat(e)
        h1 = h2 = flat
        if self.use_fs:
            x1 = self._gate_input(e, self.fs1_context, "fs1_context_vector", "fs1_context")
            x2 = self._gate_input(e, self.fs2_context, "fs2_context_vector", "fs2_context")
            h1 = FeatureGate(flat.shape[-1], tuple(self.fs_hidden), name="gate1")(x1) * flat
            h2 = FeatureGate(flat.shape[-1], tuple(self.fs_hidden), name="gate2")(x2) * flat
        o1 = MLP(tuple(self.mlp1_hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                 name="mlp1")(h1, train)
        o2 = MLP(tuple(self.mlp2_hidden), self.batch_norm, self.dropout, self.act, self.bn_momentum,
                 name="mlp2")(h2, train)
        return BilinearFusion(self.num_heads, name="fusion")(o1, o2)


# ---------------------------------------------------------------------------------------------
# APG
# ---------------------------------------------------------------------------------------------


@register("apg")
class APG(nn.Module):
    """DNN whose hidden layers get instance-wise weights W(z) = U S(z) V from a hyper-network (APG).

    Yan et al., "APG: Adaptive Parameter Generation Network for Click-Through Rate Prediction",
    NeurIPS 2022. Variant: the full APG of Sec. 3 -- low-rank parameterisation with decomposed
    feed-forwarding ``y = ((x U) S(z)) V + b(z)``, parameter sharing (only the ``K x K`` core
    ``S`` and the bias are generated), over-parameterisation ``U = U_l U_r, V = V_l V_r``
    (``overparam = P``; 0 = off). Each of the ``hidden`` layers is an ``APGDense`` followed by
    BatchNorm, ReLU and dropout (the protocol tower, ``APGTower``), then a static output unit.

    Condition ``z``: ``condition_mode="group"`` (default) uses the concatenated embeddings of
    ``condition_fields`` (comma-separated; empty = all fields) for every layer; ``"self"`` uses each layer's input
    (the paper's self-wise condition, FuxiCTR's default).

    Defaults: DNN 400-400-400 with BatchNorm (AFN/BARS protocol tower); rank ``K = 8``,
    ``P = 64``, hyper-network MLP (512, 256) with ReLU, generated bias (FuxiCTR's APG config
    template, ``model_zoo/APG/config/model_config.yaml``); ``K`` is capped at each layer's
    in/out width.
    """

    schema: Schema
    embedding_dim: int = 10
    hidden: Sequence[int] = (400, 400, 400)
    rank: int = 8
    overparam: int = 64
    hypernet_hidden: Sequence[int] = (512, 256)
    generate_bias: bool = True
    condition_mode: str = "group"
    condition_fields: str = ""
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        if self.condition_mode not in ("group", "self"):
            raise ConfigError(f"condition_mode={self.condition_mode!r}: choose 'group' or 'self'")
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        x = _flat(e)
        z = None
        if self.condition_mode == "group":
            z = x
            if self.condition_fields.strip():
                idx = _field_indices(self.schema, self.condition_fields, "condition_fields")
                z = _flat(e[:, jnp.asarray(idx)])
        tower = APGTower(tuple(self.hidden), self.batch_norm, self.dropout, self.act,
                         self.bn_momentum, rank=self.rank, overparam=self.overparam,
                         hypernet_hidden=tuple(self.hypernet_hidden),
                         generate_bias=self.generate_bias, name="tower")
        nn.share_scope(self, tower)  # its layers stay at the top level, where saved models have them
        return nn.Dense(1, name="out")(tower(x, z, train))[:, 0]
