"""FM-family and product-network baselines of the DPN paper's Table 1: AFM, HOFM, NFM, IPNN, OPNN.

All use the AFN/BARS protocol the DPN paper adopts (Sec. 3.1): field embeddings of size 10 and,
where a model has a DNN, the 400-400-400 MLP with BatchNorm and ReLU. The interaction layers
live in ``dpn_jax.nn.fm_layers`` (with the math and equation numbers).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models.bases import ProtocolModel
from dpn_jax.models.linear import LinearTerm
from dpn_jax.models.registry import register
from dpn_jax.nn.dropout import Dropout16
from dpn_jax.nn.embedding import FieldEmbedding
from dpn_jax.nn.fm_layers import (
    AttentionalPooling,
    KernelProduct,
    anova_kernels,
    bi_interaction,
    inner_products,
    outer_product_sum_pooling,
    pairwise_products,
)

OUTER_PRODUCTS = ("sum_pool", "kernel")


@register("afm")
class AFM(nn.Module):
    """Attentional FM: linear term + p^T Σ_{i<j} a_ij (e_i ⊙ e_j), attention-weighted pairs.

    Xiao, Ye, He, Zhang, Wu, Chua, "Attentional Factorization Machines", IJCAI 2017.
    Implements Eqn. 5: ``y = w0 + Σ_i w_i x_i + p^T Σ_{i<j} a_ij (v_i ⊙ v_j) x_i x_j`` with the
    pair-wise interaction layer (Eqn. 1) and attention network (Eqn. 4) of
    ``dpn_jax.nn.fm_layers``.

    Defaults: embedding 10 (AFN/BARS protocol); ``attention_dim`` 10 (the attention factor ``t``;
    BARS/FuxiCTR's AFM default); ``attention_dropout`` 0 on the attention weights and ``dropout``
    0 on the pair-wise interaction layer (the paper's dropout, Sec. 3.3; FuxiCTR's AFM_base
    ``attention_dropout: [0, 0]``).
    """

    schema: Schema
    embedding_dim: int = 10
    attention_dim: int = 10
    attention_dropout: float = 0.0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        linear = LinearTerm(self.schema, name="linear")(batch)
        if e.shape[1] < 2:
            return linear  # no pair to interact
        pairs = Dropout16(self.dropout)(pairwise_products(e), deterministic=not train)
        pooled, _ = AttentionalPooling(self.attention_dim, self.attention_dropout,
                                       name="attention")(pairs, train)
        p = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.glorot_normal(), name="p")
        return linear + p(pooled)[:, 0]


@register("hofm")
class HOFM(nn.Module):
    """Higher-order FM (order 3 by default): linear term + Σ_{t=2..order} Σ_d A^t over fields.

    Blondel, Fujino, Ueda, Ishihata, "Higher-Order Factorization Machines", NeurIPS 2016.
    ``y = <w, x> + Σ_{t=2}^{m} Σ_{s=1}^{k} A^t(p_s^(t), x)``: a separate embedding table per
    order (``embedding`` for t = 2, ``embedding_<t>`` for t >= 3; the paper's ``P^(t)``), each
    order's ANOVA kernel evaluated with the paper's O(F m d) dynamic programme
    (``dpn_jax.nn.fm_layers.anova_kernels``).

    Defaults: order 3 (the DPN Table 1 / AFN baseline), embedding 10 (AFN/BARS protocol) for
    every order; ``reuse_embedding=False`` as in the paper and FuxiCTR (True shares one table).
    """

    schema: Schema
    embedding_dim: int = 10
    order: int = 3
    reuse_embedding: bool = False

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        if self.order < 2:
            raise ConfigError(f"hofm: order must be >= 2 (got {self.order}); order 2 is the FM")
        out = LinearTerm(self.schema, name="linear")(batch)
        if self.reuse_embedding:
            e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
            kernels = anova_kernels(e, self.order)
            return out + jnp.sum(kernels[2:], axis=(0, 2))
        for t in range(2, self.order + 1):
            name = "embedding" if t == 2 else f"embedding_{t}"
            e = FieldEmbedding(self.schema, dim=self.embedding_dim, name=name)(batch)
            out = out + jnp.sum(anova_kernels(e, t)[t], axis=-1)
        return out


@register("nfm")
class NFM(ProtocolModel):
    """Neural FM: linear term + MLP(Bi-Interaction pooling Σ_{i<j} e_i ⊙ e_j) -> logit.

    He & Chua, "Neural Factorization Machines for Sparse Predictive Analytics", SIGIR 2017.
    Implements Eqn. 1 ``y = w0 + Σ_i w_i x_i + f(x)`` with the Bi-Interaction layer (Eqns. 3-4),
    hidden layers (Eqn. 5) and prediction ``h^T z_L`` (Eqn. 6; no bias, ``w0`` is the linear
    term's).

    Defaults: embedding 10 and MLP 400-400-400 with BatchNorm + ReLU, dropout 0 -- the protocol
    the DPN paper states for every model with a DNN (Sec. 3.1, following AFN/BARS).
    ``bi_batch_norm`` / ``bi_dropout`` (off by default, as in FuxiCTR/BARS) are the NFM paper's
    BatchNorm and dropout on the Bi-Interaction output. The paper's own architecture (one
    hidden layer, BN and dropout on the Bi-Interaction layer; its dropout ratio is tuned) is e.g.
    ``--set hidden=64 bi_batch_norm=true bi_dropout=0.3``.
    """

    bi_batch_norm: bool = False
    bi_dropout: float = 0.0

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        h = bi_interaction(e)
        if self.bi_batch_norm:
            h = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name="bi_bn")(h)
        h = Dropout16(self.bi_dropout)(h, deterministic=not train)
        h = self.tower(name="mlp")(h, train)
        return LinearTerm(self.schema, name="linear")(batch) + nn.Dense(1, use_bias=False, name="out")(h)[:, 0]


class _PNN(ProtocolModel):
    """Shared body of IPNN/OPNN: [flattened embeddings (l_z), product signals (l_p)] -> MLP -> logit."""

    def products(self, e: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        h = jnp.concatenate([e.reshape(e.shape[0], -1), self.products(e)], axis=-1)
        h = self.tower(name="mlp")(h, train)
        return nn.Dense(1, name="out")(h)[:, 0]


@register("ipnn")
class IPNN(_PNN):
    """Inner-product PNN: [embeddings, all <e_i, e_j>] -> MLP 400-400-400 -> logit.

    Qu, Cai, Ren, Zhang, Yu, Wen, Wang, "Product-based Neural Networks for User Response
    Prediction", ICDM 2016, Sec. III-B. The product layer's linear part ``l_z`` and inner-product
    part ``l_p`` (``p_ij = <f_i, f_j>``, i < j) are computed as one Dense layer over the
    concatenation [flatten(e), p] -- the first layer of the MLP (as in FuxiCTR/BARS).

    Defaults: embedding 10, MLP 400-400-400 with BatchNorm + ReLU, dropout 0 (DPN Sec. 3.1 /
    AFN / BARS protocol).
    """

    def products(self, e: jnp.ndarray) -> jnp.ndarray:
        return inner_products(e)


@register("opnn")
class OPNN(_PNN):
    """Outer-product PNN: [embeddings, outer-product signals] -> MLP 400-400-400 -> logit.

    Qu et al., ICDM 2016, Sec. III-C. ``outer="sum_pool"`` (default) is the paper's superposition
    form ``p = f_Σ f_Σ^T`` with ``f_Σ = Σ_i f_i`` (d*d signals); ``outer="kernel"`` is the kernel
    product ``p_ij = f_i^T K_ij f_j`` (one learned d x d kernel per pair) of the authors' released
    code and of KPNN (Qu et al., TOIS 2018). Either is concatenated with flatten(e) and fed to the
    MLP, as in IPNN.

    Defaults: embedding 10, MLP 400-400-400 with BatchNorm + ReLU, dropout 0 (DPN Sec. 3.1 /
    AFN / BARS protocol); sum pooling (the ICDM paper's equation).
    """

    outer: str = "sum_pool"

    def products(self, e: jnp.ndarray) -> jnp.ndarray:
        if self.outer == "sum_pool":
            return outer_product_sum_pooling(e)
        if self.outer == "kernel":
            return KernelProduct(name="kernel_product")(e)
        raise ConfigError(f"opnn: outer={self.outer!r} is not known; choose one of {list(OUTER_PRODUCTS)}")
