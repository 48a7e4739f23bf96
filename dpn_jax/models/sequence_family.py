"""Behaviour (sequence) models: DIN and the DPO-armed DIN (paper §3.2, Tables 4-5; docs/dpo_math.md, §'Sequence-based DPO' and §'Where the DPO sits').

The behaviours come from the schema: every ``sequence`` field whose ``share_vocab`` names a
categorical field is the history of that target (e.g. ``hist_item -> item_id``); its steps and
the target share embedding rows.  Other sequence fields stay mean-pooled as in every model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models.bases import BehaviourModel
from dpn_jax.models.registry import register
from dpn_jax.nn.activations import check_activation
from dpn_jax.nn.embedding import FieldEmbedding, embedded_field_names
from dpn_jax.nn.sequence_layers import DIN_WEIGHT_NORMS, DINAttention

GROUPINGS = ("joint", "pair")


def behaviour_pairs(schema: Schema) -> tuple[tuple[str, str], ...]:
    """``(target, history)`` names: each sequence field sharing a categorical field's vocabulary."""
    cats = {f.name for f in schema.cat_fields}
    return tuple((f.share_vocab, f.name) for f in schema.seq_fields if f.share_vocab in cats)


def attention_groups(schema: Schema, grouping: str = "joint") -> list[tuple[tuple[str, str], ...]]:
    """The attention units of a schema.

    ``"joint"``: pairs whose histories have the same ``max_len`` share ONE unit over their
    concatenated embeddings (DIN's Amazon setting: goods = [item id, category id], one attention
    over both); its mask is the AND of the histories' masks.  ``"pair"``: one unit per pair
    (FuxiCTR's per-pair DIN).
    """
    if grouping not in GROUPINGS:
        raise ConfigError(f"attention_groups={grouping!r}; expected one of {list(GROUPINGS)}")
    pairs = behaviour_pairs(schema)
    if grouping == "pair":
        return [(p,) for p in pairs]
    by_len: dict[int, list[tuple[str, str]]] = {}
    for p in pairs:
        by_len.setdefault(schema.field(p[1]).max_len, []).append(p)
    return [tuple(g) for g in by_len.values()]


Array = Any
# pool(g, q [B,D], behaviours [B,L,D], mask [B,L], ids [B,L,G]) -> interest [B,D]
Pool = Callable[[int, Array, Array, Array, Array], Array]


def with_interests(schema: Schema, grouping: str, embedding: FieldEmbedding, e: Array,
                   batch: dict, pool: Pool) -> Array:
    """``e [B,F,d]`` with each history slot replaced by its attention group's pooled interest.

    Per group (:func:`attention_groups`): ``q`` = the targets' embeddings concatenated, the
    behaviours = the histories' embeddings concatenated, the mask = the AND of the histories'
    masks, ``ids [B,L,G]`` = the raw ids of the histories (``batch["seq/<name>"]``).  The pooled
    ``[B, G·d]`` is split back into the ``G`` slots.  No group: ``e`` unchanged.
    """
    groups = attention_groups(schema, grouping)
    if not groups:
        return e
    d = e.shape[-1]
    names = embedded_field_names(schema)
    seqs = embedding.embed_sequences(batch)
    slots = [e[:, i] for i in range(e.shape[1])]
    for g, group in enumerate(groups):
        q = jnp.concatenate([e[:, names.index(t)] for t, _ in group], axis=-1)
        x = jnp.concatenate([seqs[h][0] for _, h in group], axis=-1)
        mask = seqs[group[0][1]][1]
        for _, h in group[1:]:
            mask = mask & seqs[h][1]
        ids = jnp.stack([batch[f"seq/{h}"] for _, h in group], axis=-1)
        v = pool(g, q, x, mask, ids)
        for j, (_, h) in enumerate(group):
            slots[names.index(h)] = v[:, j * d:(j + 1) * d]
    return jnp.stack(slots, axis=1)


@register("din")
class DIN(BehaviourModel):
    """Deep Interest Network: target-attention pooling of each behaviour history -> MLP (Dice).

    Zhou et al., KDD 2018.  Field embeddings of every field; for each attention unit (see
    ``attention_groups``: joint | pair) the history is pooled by DIN's local activation unit
    ``v = Σ_i m_i a([q, k_i, q−k_i, q⊙k_i]) k_i`` with NO softmax (``attention_norm="none"``, §4.3
    of the paper; ``"softmax"`` = the public code) and replaces the history's slot among the field
    embeddings; all slots are flattened -> tower -> logit.

    Defaults and sources: tower (200, 80) with Dice and no BatchNorm (the DIN paper's
    experiments: MLP 200-80 with PReLU or Dice); attention MLP (80, 40) with sigmoid (DIN's public code); Dice
    statistics momentum 0.9 (FuxiCTR; the protocol's BatchNorm momentum); embedding 10 (the
    repository protocol, paper §3.1).  The protocol tower instead: ``--set hidden=400,400,400
    --set act=relu --set batch_norm=true``.  A schema without behaviour pairs reduces to the
    tower over the field embeddings (DIN without behaviours)."""

    attention_hidden: Sequence[int] = (80, 40)
    attention_act: str = "sigmoid"
    attention_norm: str = "none"
    attention_groups: str = "joint"
    embedding_init_std: float = 1e-4

    def attention_dpo(self) -> dict:
        """The attention unit's DPO options (none: DIN's static unit)."""
        return {}

    def attention_unit(self, name: str) -> DINAttention:
        return DINAttention(tuple(self.attention_hidden), self.attention_act, self.attention_norm,
                            self.bn_momentum, **self.attention_dpo(), name=name)

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        check_activation(self.act)
        check_activation(self.attention_act)
        if self.attention_norm not in DIN_WEIGHT_NORMS:  # the option's name, not the layer's field
            raise ConfigError(f"din/din_dpo: attention_norm={self.attention_norm!r}; "
                              f"expected one of {list(DIN_WEIGHT_NORMS)}")
        embedding = FieldEmbedding(self.schema, dim=self.embedding_dim,
                                   init_std=self.embedding_init_std, name="embedding")
        e = embedding(batch)
        e = with_interests(self.schema, self.attention_groups, embedding, e, batch,
                           lambda g, q, keys, mask, ids: self.attention_unit(f"attention_{g}")(
                               q, keys, mask, train))
        h = self.tower()(e.reshape(e.shape[0], -1), train)
        return nn.Dense(1, name="out")(h)[:, 0]


class AttentionDPO(nn.Module):
    """The options of the DPO-armed attention unit (``din_dpo``, ``dien_dpo``): a base listed
    before the model's class, so these options follow the model's own."""

    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    dpo_input: str = "features"

    def attention_dpo(self) -> dict:
        return dict(dpo=True, dpo_input=self.dpo_input, generator=self.generator, rank=self.rank,
                    heads=self.heads, num_kernels=self.num_kernels)


@register("din_dpo")
class DINDPO(AttentionDPO, DIN):
    """DIN armed with the heterogeneous query-behaviour DPO in its attention unit (Table 5).

    Paper §2.4/§3.2 (docs/dpo_math.md, §'Heterogeneous query-behaviour DPO'): the first layer of the attention MLP becomes ``W(q) x_i + b(q)``,
    its kernel generated from the target ``q`` (``generator`` lowrank = Eqn. 5, rank 4, or any of
    ``dpn_jax.dpo.GENERATORS``; ``heads``, ``num_kernels``) and applied to every behaviour before
    the scoring.  ``dpo_input="features"`` (default) applies it to DIN's ``[q, k_i, q−k_i,
    q⊙k_i]`` (its static kernel is DIN's first layer: din_dpo ⊇ din); ``"behaviour"`` to ``k_i``
    alone.  Everything else as ``din``."""
