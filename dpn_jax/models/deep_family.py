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
from dpn_jax.models.registry import register
from dpn_jax.nn.afn_layers import DEFAULT_EPS, LogarithmicTransform
from dpn_jax.nn.attention_layers import APGDense, BilinearFusion, FeatureGate, InteractingLayer
from dpn_jax.nn.dropout import Dropout16, dropout_active
from dpn_jax.nn.embedding import FieldEmbedding, embedded_field_names
from dpn_jax.nn.mlp import MLP, activation


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


def _dnn_logit(module: nn.Module, x: jnp.ndarray, hidden: Sequence[int], train: bool,
               prefix: str = "") -> jnp.ndarray:
    """The protocol DNN tower + output unit, as submodules of ``module`` -> ``[B]``."""
    h = MLP(tuple(hidden), module.batch_norm, module.dropout, module.act, module.bn_momentum,
            name=f"{prefix}mlp")(x, train)
    return nn.Dense(1, name=f"{prefix}out")(h)[:, 0]


# ---------------------------------------------------------------------------------------------
# AutoInt / AutoInt+
# ---------------------------------------------------------------------------------------------


def _autoint_logit(m: nn.Module, e: jnp.ndarray) -> jnp.ndarray:
    h = e
    for i in range(m.attention_layers):
        h = InteractingLayer(m.attention_dim, m.num_heads, m.use_residual, m.use_scale,
                             name=f"attention_{i}")(h)
    return nn.Dense(1, name="attention_out")(_flat(h))[:, 0]


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

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        return _autoint_logit(self, e)


@register("autoint_plus")
class AutoIntPlus(nn.Module):
    """AutoInt+: AutoInt's attention stack plus a parallel DNN 400-400-400 on the same embeddings.

    Song et al., CIKM 2019 (the AutoInt+ variant, jointly trained with a feed-forward network).
    The logit is the sum of the attention output unit (Eqns. 5-9) and the DNN's output unit, as in
    FuxiCTR. Attention defaults as ``autoint``; DNN: 400-400-400 with BatchNorm and ReLU, no
    dropout (the AFN/BARS protocol tower; BARS's AutoInt+ Frappe config also uses 400-400-400+BN).
    """

    schema: Schema
    embedding_dim: int = 10
    attention_layers: int = 3
    num_heads: int = 2
    attention_dim: int = 64
    use_residual: bool = True
    use_scale: bool = False
    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        return _autoint_logit(self, e) + _dnn_logit(self, _flat(e), self.hidden, train, "dnn_")


# ---------------------------------------------------------------------------------------------
# AFN / AFN+
# ---------------------------------------------------------------------------------------------


def _afn_logit(m: nn.Module, batch, train: bool) -> jnp.ndarray:
    e = FieldEmbedding(m.schema, dim=m.embedding_dim, name="embedding")(batch)
    h = LogarithmicTransform(m.log_neurons, m.log_eps, m.batch_norm, m.bn_momentum,
                             name="log_net")(e, train)
    return _dnn_logit(m, _flat(h), m.hidden, train)


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

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        return _afn_logit(self, batch, train)


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

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        y_afn = _afn_logit(self, batch, train)
        e2 = FieldEmbedding(self.schema, dim=self.embedding_dim, name="dnn_embedding")(batch)
        y_dnn = _dnn_logit(self, _flat(e2), self.dnn_hidden, train, "dnn_")
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
    BatchNorm, ReLU and dropout (the protocol tower), then a static output unit.

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
        f = activation(self.act)
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        x = _flat(e)
        z = None
        if self.condition_mode == "group":
            z = x
            if self.condition_fields.strip():
                idx = _field_indices(self.schema, self.condition_fields, "condition_fields")
                z = _flat(e[:, jnp.asarray(idx)])
        for i, width in enumerate(self.hidden):
            x = APGDense(width, self.rank, self.overparam, tuple(self.hypernet_hidden),
                         self.generate_bias, name=f"apg_{i}")(x, x if z is None else z)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                 name=f"bn_{i}")(x)
            x = f(x)
            if dropout_active(self.dropout):
                x = Dropout16(self.dropout)(x, deterministic=not train)
        return nn.Dense(1, name="out")(x)[:, 0]
