"""Attention-based behaviour models beyond DIN: KFAtt, the Transformer baseline (BST), the DPN
paper's sDPN (Table 4) and DyJoint (Table 6).  Layers in :mod:`dpn_jax.nn.transformer_layers`.

All share DIN's structure (:mod:`dpn_jax.models.sequence_family`): field embeddings of every
field; for each attention group (``attention_groups`` joint | pair) the target's embeddings are
the query and the histories' concatenated embeddings the behaviours, and the group's pooled
interest (``[B, D]``, ``D`` = the group's concatenated size) replaces the history slots among the
field embeddings (split back per history); all slots are flattened -> a tower -> a logit.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.errors import ConfigError
from dpn_jax.models.bases import BehaviourModel, FeatureDPNModel
from dpn_jax.models.registry import register
from dpn_jax.models.sequence_family import Array, with_interests
from dpn_jax.nn.activations import check_activation
from dpn_jax.nn.embedding import FieldEmbedding
from dpn_jax.nn.transformer_layers import (
    DECODERS,
    ENCODERS,
    BehaviourTransformer,
    KalmanAttention,
    check_choice,
    duplicate_counts,
)


def check_unit_options(blocks: int, heads: int, ffn_dim: int, dropout: float, max_positions: int,
                       encoder: str = "mhsa", decoder: str = "attention", **_: object) -> None:
    """The options of the Transformer unit (:class:`BehaviourTransformer`'s fields; the rest
    ignored) that are checkable before any layer is built (a schema without behaviours builds
    none). ``dropout`` is the models' ``encoder_dropout``."""
    for name, value in (("blocks", blocks), ("ffn_dim", ffn_dim), ("max_positions", max_positions)):
        if value < 0:
            raise ConfigError(f"{name}={value}; expected >= 0")
    if heads < 1:
        raise ConfigError(f"heads={heads}; expected >= 1 (and dividing the behaviour size)")
    if not 0 <= dropout < 1:
        raise ConfigError(f"encoder_dropout={dropout}; expected 0 <= rate < 1")
    check_choice("encoder", encoder, ENCODERS)
    check_choice("decoder", decoder, DECODERS)


class _InterestModel(BehaviourModel):
    """DIN's structure with a pluggable attention unit (``pool``); the tower as DIN's."""

    attention_groups: str = "joint"
    embedding_init_std: float = 1e-4

    def check_options(self) -> None:
        check_activation(self.act)

    def pool(self, g: int, q: Array, x: Array, mask: Array, ids: Array, train: bool) -> Array:
        raise NotImplementedError

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        self.check_options()
        embedding = FieldEmbedding(self.schema, dim=self.embedding_dim,
                                   init_std=self.embedding_init_std, name="embedding")
        e = embedding(batch)
        e = with_interests(self.schema, self.attention_groups, embedding, e, batch,
                           lambda *a: self.pool(*a, train))
        h = self.tower()(e.reshape(e.shape[0], -1), train)
        return nn.Dense(1, name="out")(h)[:, 0]


@register("kfatt")
class KFAtt(_InterestModel):
    """Kalman Filtering Attention (Liu et al., NeurIPS 2020) as DIN's attention unit.

    The DPN paper's strongest sequence baseline (Tables 4-5).

    Per attention group, :class:`~dpn_jax.nn.transformer_layers.KalmanAttention` (formulas,
    derivation of the frequency capping and reading of the paper there): multi-head softmax over
    ``[prior, valid behaviours]`` with logits ``[−log σ_q², s_i − log(n_i σ̃_i² + σ_i²)]`` mixing
    ``[μ_q, v_i]``; ``μ_q, σ_q²`` from the target, ``σ_i², σ̃_i²`` from each behaviour (one Dense
    layer each), ``n_i`` the number of valid steps of the history with the same raw ids as step
    ``i`` (all histories of the group equal).  An empty history pools to the prior mean ``μ_q``
    (through the output projection), not to zeros: the paper's point for new interests.

    Options: ``frequency_capping`` True (KFAtt-freq, the paper's full model; False = KFAtt-base);
    ``heads`` 2 (our choice, the same as ``bst``: the DPN paper does not state the
    head count of KFAtt on Amazon).  Everything else as ``din``: tower
    (200, 80) with Dice, no BatchNorm, Dice momentum 0.9, embedding 10, ``attention_groups``
    joint."""

    heads: int = 2
    frequency_capping: bool = True

    def check_options(self) -> None:
        super().check_options()
        if self.heads < 1:
            raise ConfigError(f"heads={self.heads}; expected >= 1 (and dividing the behaviour "
                              f"size)")

    def pool(self, g, q, x, mask, ids, train):
        counts = duplicate_counts(ids, mask) if self.frequency_capping else None
        return KalmanAttention(self.heads, self.frequency_capping, name=f"attention_{g}")(
            q, x, mask, counts)


@register("bst")
class BST(_InterestModel):
    """Transformer baseline: BST's encoder over the behaviours + multi-head target attention.

    The KFAtt/DPN papers' "Transformer" (Tables 4-5); the encoder from BST (Chen et al. 2019).

    Per attention group: behaviours + learned positional embeddings (index in the history,
    ``max_positions`` rows, 0 = the history length; later steps share the last row) -> ``blocks``
    post-LN blocks of masked multi-head self-attention and a ReLU FFN with residuals
    (``ffn_dim`` 0 = 4 × the group size, Vaswani et al.; ``encoder_dropout`` on both residual
    branches, 0 by default, BST used 0.2; ``norm_first`` the pre-LN block, Xiong et al. 2020) -> target attention of the projected target embedding
    over the encoder outputs (masked softmax, ``heads`` heads, concatenated -> Dense) = the
    pooled interest.  Encoder outputs at padded steps are zero and never attended to.

    Defaults: ``blocks`` 1 (BST's best), ``heads`` 2 (a choice: the group size, 2 × 10 in the
    joint setting, splits into 2 heads of 10; BST used 8 heads on larger embeddings); tower,
    embedding and ``attention_groups`` as ``din`` (200, 80 Dice).  ``bst`` is ``bst_dpo`` with
    ``encoder=mhsa, decoder=attention`` (same parameters)."""

    blocks: int = 1
    heads: int = 2
    ffn_dim: int = 0
    encoder_dropout: float = 0.0
    max_positions: int = 0
    norm_first: bool = False

    def check_options(self) -> None:
        super().check_options()
        check_unit_options(**self.unit_options())

    def unit_options(self) -> dict:
        return dict(blocks=self.blocks, heads=self.heads, ffn_dim=self.ffn_dim,
                    dropout=self.encoder_dropout, max_positions=self.max_positions,
                    norm_first=self.norm_first)

    def pool(self, g, q, x, mask, ids, train):
        return BehaviourTransformer(**self.unit_options(), name=f"transformer_{g}")(
            q, x, mask, train)


@register("bst_dpo")
class BSTDPO(BST):
    """sDPN: the Transformer with sequence-based DPO (DPN paper §2.4, §3.2 Table 4; docs/dpo_math.md, §'Sequence-based DPO').

    ``encoder``: ``mhsa`` (BST) | ``dpo`` (the homogeneous behaviour-behaviour DPO, a dynamic
    depthwise convolution, replaces the self-attention) | ``mhsa+dpo`` (default, sDPN: both as
    parallel branches summed before the residual + LayerNorm).  ``decoder``: ``attention`` (BST)
    | ``dpo`` (masked mean of the heterogeneous DPO outputs ``W(q) h_i + b(q)``) |
    ``attention+dpo`` (default, sDPN: target attention whose values are those DPO outputs).
    Every cell of Table 4 is ``--set encoder=... --set decoder=...``; ``mhsa``/``attention`` is
    exactly ``bst``.

    Homogeneous DPO: ``kernel_size`` 3 (centred window), ``conv_heads`` 0 (one kernel per
    channel, the paper's depthwise ``c = 1``), ``combine`` add (local + global view; "mul" the
    multiplicative reading), see :class:`~dpn_jax.nn.sequence_layers.DynamicConv`.
    Heterogeneous DPO: ``generator`` lowrank (Eqn. 5) with ``rank`` 4, ``generator_heads`` 1,
    ``num_kernels`` 4 (mixture), the target embedding as the context.  Everything else as
    ``bst``."""

    encoder: str = "mhsa+dpo"
    decoder: str = "attention+dpo"
    kernel_size: int = 3
    conv_heads: int = 0
    combine: str = "add"
    generator: str = "lowrank"
    rank: int = 4
    generator_heads: int = 1
    num_kernels: int = 4

    def unit_options(self) -> dict:
        return dict(super().unit_options(), encoder=self.encoder, decoder=self.decoder,
                    kernel_size=self.kernel_size, conv_heads=self.conv_heads,
                    combine=self.combine, generator=self.generator, rank=self.rank,
                    generator_heads=self.generator_heads, num_kernels=self.num_kernels)


@register("dyjoint")
class DyJoint(FeatureDPNModel):
    """DyJoint (DPN paper Table 6): feature-based DPN tower + sDPN behaviour interests.

    The feature-based DPN over the field embeddings whose history slots hold the sDPN pooled
    interests (feature + sequence DPO together).

    Sequence part: per attention group the ``bst_dpo`` unit (encoder ``mhsa+dpo``, decoder
    ``attention+dpo`` by default; ``blocks``, ``heads``, ``ffn_dim``, ``encoder_dropout``,
    ``max_positions``, ``norm_first``, ``kernel_size``, ``conv_heads``, ``combine`` as there) replaces the
    history slots, as in DIN.  Feature part: the ``dpn`` tower over the flattened slots, its
    ``dpo_layers`` (first) a feature DPO ``W(z) x + b(z)`` with ``context`` input (the flattened
    slots, interests included) | other_fields | field names, the other layers the protocol MLP
    (400-400-400, BatchNorm, ReLU: ``dpn``'s defaults).  ``generator``/``rank``/
    ``generator_heads``/``num_kernels`` are shared by the feature DPO and the heterogeneous
    sequence DPO (lowrank, rank 4; the paper's production model used a multi-head feature DPO,
    ``--set generator_heads=...``).  ``heads`` are the attention heads (``dpn``'s ``heads`` is
    ``generator_heads`` here).  The paper gives no further detail of its production layout."""

    generator_heads: int = 1
    num_kernels: int = 4
    context_norm: bool = False
    attention_groups: str = "joint"
    blocks: int = 1
    heads: int = 2
    ffn_dim: int = 0
    encoder_dropout: float = 0.0
    max_positions: int = 0
    encoder: str = "mhsa+dpo"
    decoder: str = "attention+dpo"
    kernel_size: int = 3
    conv_heads: int = 0
    combine: str = "add"
    norm_first: bool = False
    embedding_init_std: float = 1e-4

    def unit_options(self) -> dict:
        """:class:`BehaviourTransformer`'s fields (the generator's shared with the DPN tower)."""
        return dict(blocks=self.blocks, heads=self.heads, ffn_dim=self.ffn_dim,
                    dropout=self.encoder_dropout, encoder=self.encoder, decoder=self.decoder,
                    max_positions=self.max_positions, kernel_size=self.kernel_size,
                    conv_heads=self.conv_heads, combine=self.combine, generator=self.generator,
                    rank=self.rank, generator_heads=self.generator_heads,
                    num_kernels=self.num_kernels, norm_first=self.norm_first)

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        unit = self.unit_options()
        check_unit_options(**unit)
        embedding = FieldEmbedding(self.schema, dim=self.embedding_dim,
                                   init_std=self.embedding_init_std, name="embedding")
        e = embedding(batch)

        def pool(g, q, x, mask, ids):
            return BehaviourTransformer(**unit, name=f"transformer_{g}")(q, x, mask, train)

        e = with_interests(self.schema, self.attention_groups, embedding, e, batch, pool)
        h = self.dpn_tower(heads=self.generator_heads, num_kernels=self.num_kernels,
                           context_norm=self.context_norm)(e, train)
        return nn.Dense(1, name="out")(h)[:, 0]


__all__ = ["BST", "BSTDPO", "DECODERS", "ENCODERS", "DyJoint", "KFAtt", "with_interests"]
