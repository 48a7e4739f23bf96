"""DIEN and the DPO-armed DIEN (Zhou et al., AAAI 2019, "Deep Interest Evolution Network"; paper
Table 5 "DPO-armed DIEN").

Per attention unit (the groups of DIN, :func:`dpn_jax.models.sequence_family.attention_groups`:
histories of the same length concatenated, their masks AND-ed), with behaviours ``e_t`` and
validity ``m_t``:

1. interest extractor: a masked GRU over the behaviours, interest states ``h_t``
   (:mod:`dpn_jax.nn.recurrent_layers`);
2. auxiliary loss (train mode only, DIEN Eqn. 6): for each step ``t`` with ``m_t`` and
   ``m_{t+1}`` (and the negative's step ``t+1``) valid::

       ℓ_t = BCE(s([h_t, e_{t+1}]), 1) + BCE(s([h_t, e⁻_{t+1}]), 0)

   averaged over those pairs of the whole batch (DIEN's public code averages over all ``B·(L−1)``
   slots, padded ones counting zero); ``s`` an MLP (``aux_hidden`` with sigmoid, DIEN's public
   code; it has a BatchNorm first and a 2-way softmax output, here a single logit), summed
   over the attention units (one unit in DIEN's setting).  Negatives
   ``e⁻``: the behaviour at the same position of ANOTHER row of the batch, the rows matched by a
   random derangement (one random cycle through the batch, :func:`negative_rows`, drawn from the
   ``"dropout"`` rng), a pair counting only where that row's step is valid.  This keeps the item
   and category of a negative consistent and samples negatives by item popularity; DIEN's public
   code instead feeds negatives sampled by the data pipeline.  The loss times
   ``aux_loss_weight`` (DIEN's ``α``) is sowed into the ``"losses"`` collection, which the train
   step adds to the data loss (:func:`dpn_jax.train.state.aux_loss`);
3. attention of the target over the interest states with DIN's unit, softmax-normalised (DIEN);
4. interest evolution: an attentional GRU (``evolution``) over the interest states with those
   scores; its final state is the evolved interest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpn_jax.dpo.sequence import masked_mean
from dpn_jax.errors import ConfigError
from dpn_jax.models.bases import BehaviourModel
from dpn_jax.models.registry import register
from dpn_jax.models.sequence_family import AttentionDPO, attention_groups, with_interests
from dpn_jax.nn.activations import Activation, PReLU, check_activation
from dpn_jax.nn.embedding import FieldEmbedding
from dpn_jax.nn.recurrent_layers import EVOLUTIONS, GRU
from dpn_jax.nn.sequence_layers import DIN_WEIGHT_NORMS, DINAttention

Array = jax.Array
AUX_LOSS_NAME = "dien_aux"
QUERY_TRANSFORMS = ("auto", "dense_prelu")


def negative_rows(key: jax.Array | None, batch_size: int) -> Array:
    """Row ``neg[b] ≠ b`` whose behaviours are row ``b``'s negatives: a uniformly random single
    cycle through the batch (``neg[π_i] = π_{i+1}`` for a random permutation ``π``), so no row is
    its own negative when ``batch_size > 1``.  ``key=None``: the cyclic shift ``neg[b] = b + 1``
    (used at initialisation, where no ``"dropout"`` rng exists)."""
    rows = jnp.arange(batch_size)
    if key is None:
        return jnp.roll(rows, -1)
    perm = jax.random.permutation(key, batch_size)
    return jnp.zeros_like(rows).at[perm].set(jnp.roll(perm, -1))


def auxiliary_loss(h: Array, pos: Array, neg: Array, valid: Array,
                   score: Callable[[Array], Array]) -> Array:
    """DIEN's auxiliary loss ``Σ_valid [BCE(s([h, pos]), 1) + BCE(s([h, neg]), 0)] / max(#valid, 1)``.

    ``h [B,T,H]`` interest states, ``pos``/``neg [B,T,d]`` the next behaviours and their
    negatives, ``valid [B,T]`` bool, ``score: [..., H+d] -> [...]`` logits.  Invalid pairs are
    zeroed before scoring (``where``): their values never reach an output or a gradient."""
    m = valid[..., None]
    h, pos, neg = (jnp.where(m, t, 0) for t in (h, pos, neg))
    lp = score(jnp.concatenate([h, pos], axis=-1))
    ln = score(jnp.concatenate([h, neg], axis=-1))
    per = (optax.sigmoid_binary_cross_entropy(lp, jnp.ones_like(lp))
           + optax.sigmoid_binary_cross_entropy(ln, jnp.zeros_like(ln)))
    count = jnp.sum(valid.astype(per.dtype))
    return jnp.sum(jnp.where(valid, per, 0)) / jnp.maximum(count, 1)


class AuxiliaryNet(nn.Module):
    """The auxiliary scorer ``[h_t, e] -> logit``: Dense layers with ``act`` then Dense(1)."""

    hidden: Sequence[int] = (100, 50)
    act: str = "sigmoid"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            x = Activation(self.act, name=f"act_{i}")(x)
        return nn.Dense(1, name="score")(x)[..., 0]


@register("dien")
class DIEN(BehaviourModel):
    """Deep Interest Evolution Network: GRU interest extractor, auxiliary loss, AUGRU evolution.

    Zhou et al., AAAI 2019 (the formulas are in the docstring of :mod:`dpn_jax.models.dien`).  Per
    behaviour history: GRU interest states (+ the auxiliary next-behaviour loss in training),
    target attention over them, AUGRU interest evolution; the tower input is every field
    embedding flattened (each history slot the masked mean of its behaviours, DIEN's pooled
    behaviour) with the final evolved interest of each attention unit.  ``attention_groups`` as
    DIN (joint | pair).  A schema without behaviour pairs reduces to the tower over the fields.

    Defaults and their sources: tower (200, 80) with Dice and no BatchNorm, attention MLP (80, 40)
    with sigmoid, Dice momentum 0.9, embedding 10, as ``din``; ``evolution`` augru (DIEN's best;
    agru | aigru are its ablations); ``gru_dim`` 0 = the behaviour size of each unit (DIEN's
    code); ``aux_loss_weight`` 1.0 (DIEN's α; 0 switches the auxiliary loss off);
    ``aux_hidden`` (100, 50) with sigmoid (DIEN's code); ``embedding_init_std`` 1e-4 (FuxiCTR).
    Attention: ``attention_scale`` divides the scores by √d (DIN's code; DIEN's
    ``din_fcn_attention`` does not: ``--set attention_scale=false``); ``attention_norm`` softmax
    (DIEN) | sigmoid (each step's gate ``σ(s_t)`` on its own) | none; ``query_transform`` auto (a
    Dense projection only when the query and the interest states differ in size) | dense_prelu
    (DIEN's ``din_fcn_attention``: Dense to the interest size, then PReLU starting at 0).  What
    these options do to the trained attention: docs/results/behaviour_models.md, §'Table 5'."""

    attention_hidden: Sequence[int] = (80, 40)
    attention_act: str = "sigmoid"
    attention_groups: str = "joint"
    evolution: str = "augru"
    gru_dim: int = 0
    aux_loss_weight: float = 1.0
    aux_hidden: Sequence[int] = (100, 50)
    embedding_init_std: float = 1e-4
    attention_scale: bool = True
    attention_norm: str = "softmax"
    query_transform: str = "auto"

    def attention_dpo(self) -> dict:
        """The attention unit's DPO options (none: DIEN's static unit)."""
        return {}

    def attention_unit(self, name: str) -> DINAttention:
        return DINAttention(tuple(self.attention_hidden), self.attention_act, self.attention_norm,
                            self.bn_momentum, **self.attention_dpo(), scale=self.attention_scale,
                            name=name)

    def check_options(self) -> None:
        check_activation(self.act)
        check_activation(self.attention_act)
        if self.evolution not in EVOLUTIONS:
            raise ConfigError(f"dien: evolution={self.evolution!r}; expected one of "
                              f"{list(EVOLUTIONS)}")
        if self.gru_dim < 0:
            raise ConfigError(f"dien: gru_dim={self.gru_dim}; expected 0 (the behaviour size) "
                              f"or a positive number of units")
        if self.attention_norm not in DIN_WEIGHT_NORMS:
            raise ConfigError(f"dien: attention_norm={self.attention_norm!r}; expected one of "
                              f"{list(DIN_WEIGHT_NORMS)}")
        if self.aux_loss_weight < 0:
            raise ConfigError(f"dien: aux_loss_weight={self.aux_loss_weight}; expected >= 0")
        if self.query_transform not in QUERY_TRANSFORMS:
            raise ConfigError(f"dien: query_transform={self.query_transform!r}; expected one of "
                              f"{list(QUERY_TRANSFORMS)}")

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        self.check_options()
        embedding = FieldEmbedding(self.schema, dim=self.embedding_dim,
                                   init_std=self.embedding_init_std, name="embedding")
        e = embedding(batch)
        bsz = e.shape[0]
        interests = []
        # The auxiliary network is built at initialisation (so its parameters exist) and run in a
        # train step that collects the losses; evaluation and BatchNorm recalibration (losses not
        # mutable) skip it.
        aux_on = bool(attention_groups(self.schema, self.attention_groups)) and (
            self.aux_loss_weight > 0
            and (self.is_initializing() or (train and self.is_mutable_collection("losses"))))
        if aux_on:
            key = self.make_rng("dropout") if self.has_rng("dropout") else None
            neg_idx = negative_rows(key, bsz)
            other = (neg_idx != jnp.arange(bsz))[:, None]
            aux = []

        def unit(g, q, keys, mask, ids):
            """Extractor, auxiliary loss, attention and evolution of group ``g``; the history
            slots get the masked mean of their behaviours (DIEN's pooled behaviour)."""
            mask = jnp.asarray(mask)  # numpy when the batch is a closed-over constant
            units = self.gru_dim or keys.shape[-1]
            states, _ = GRU(units, "gru", name=f"extractor_{g}")(keys, mask)
            if aux_on:
                valid = mask[:, :-1] & mask[:, 1:] & mask[neg_idx][:, 1:] & other
                scorer = AuxiliaryNet(tuple(self.aux_hidden), name=f"aux_{g}")
                aux.append(auxiliary_loss(states[:, :-1], keys[:, 1:], keys[neg_idx][:, 1:],
                                          valid, scorer))
            if self.query_transform == "dense_prelu":
                q = PReLU(0.0, name=f"query_prelu_{g}")(nn.Dense(units, name=f"query_{g}")(q))
            elif units != keys.shape[-1]:
                q = nn.Dense(units, name=f"query_{g}")(q)
            _, a = self.attention_unit(f"attention_{g}")(q, states, mask, train,
                                                         return_weights=True)
            _, final = GRU(units, self.evolution, name=f"evolution_{g}")(states, mask, a)
            interests.append(final)
            return masked_mean(keys, mask)  # per channel, so each history's slot is its own mean

        e = with_interests(self.schema, self.attention_groups, embedding, e, batch, unit)
        if aux_on and train:
            self.sow("losses", AUX_LOSS_NAME, self.aux_loss_weight * sum(aux))
            self.sow("intermediates", "dien_negative_rows", neg_idx)  # for inspection
        x = jnp.concatenate([e.reshape(bsz, -1), *interests], axis=-1)
        h = self.tower()(x, train)
        return nn.Dense(1, name="out")(h)[:, 0]


@register("dien_dpo")
class DIENDPO(AttentionDPO, DIEN):
    """DIEN armed with the heterogeneous query-behaviour DPO in its attention unit (Table 5,
    "DPO-armed DIEN").

    Paper §2.4/§3.2 (docs/dpo_math.md, §'Heterogeneous query-behaviour DPO'): the first layer of the attention MLP that scores the interest
    states becomes ``W(q) x_i + b(q)``, its kernel generated from the target ``q`` (``generator``
    lowrank = Eqn. 5, rank 4, or any of ``dpn_jax.dpo.GENERATORS``; ``heads``, ``num_kernels``).
    ``dpo_input="features"`` (default) applies it to DIN's ``[q, h_i, q−h_i, q⊙h_i]`` (its static
    kernel is DIEN's first attention layer: dien_dpo ⊇ dien); ``"behaviour"`` to the interest
    state ``h_i`` alone.  Everything else as ``dien``."""
