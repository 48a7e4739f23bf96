"""Flax Linen layers of Transformer-style behaviour modelling: masked multi-head self-attention,
post-LN encoder blocks (BST), multi-head target attention, the sDPN encoder/decoder of the DPN
paper (Table 4) and Kalman Filtering Attention (KFAtt).

Shapes: behaviours ``x [B,L,D]``, a validity ``mask [B,L]`` (True = a real step), a query (the
target's embedding) ``q [B,c]``.  Every layer is padding invariant as those of
:mod:`dpn_jax.nn.sequence_layers`: padded values are replaced by zeros (``jnp.where``, never a
product) before they reach a parameter, padded steps are never attended to, per-step outputs are
zero at padded steps, and a history without a valid step stays finite (its attention weights are
all zero).  Heads split the ``D`` channels: ``heads`` must divide ``D`` (``d_h = D / heads``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax.dpo.sequence import masked_mean
from dpn_jax.errors import ConfigError
from dpn_jax.nn.dropout import Dropout16, dropout_active
from dpn_jax.nn.sequence_layers import DynamicConv, QueryBehaviourDPO

Array = jax.Array

ENCODERS = ("mhsa", "dpo", "mhsa+dpo")
DECODERS = ("attention", "dpo", "attention+dpo")
POSITION_INIT_STD = 1e-4  # the field embeddings' init (FieldEmbedding): positions start at their scale


# ---------------------------------------------------------------------------------------------
# helpers


def masked_softmax(logits: Array, mask: Array, axis: int = -1) -> Array:
    """Softmax over the valid entries of ``axis``; zero on padded entries and on rows without a
    valid entry (no NaN, no division by zero).

    ``mask`` broadcasts against ``logits``.  Stable and gradient-safe: the row maximum is taken
    over the valid entries only (a constant shift, so it is not differentiated), and padded
    logits are replaced by that maximum before the ``exp`` (no overflow, even with garbage or
    infinite values there) and then discarded by ``where``.  A valid row's denominator is at least
    1 (its maximum contributes ``exp(0)``); an empty row divides by 1.
    """
    mask = jnp.broadcast_to(mask, logits.shape)
    top = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=axis, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0))
    e = jnp.where(mask, jnp.exp(jnp.where(mask, logits, top) - top), 0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(jnp.any(mask, axis=axis, keepdims=True), total, 1)


def head_dim(features: int, heads: int) -> int:
    """``d_h = features / heads``; a ConfigError naming ``heads`` when it does not divide."""
    if heads < 1 or features % heads:
        raise ConfigError(f"heads={heads}: the number of attention heads must be >= 1 and divide "
                          f"the behaviour size {features} (the concatenated embeddings of an "
                          f"attention group)")
    return features // heads


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{option}={value!r}; expected one of {list(allowed)}")
    return value


def duplicate_counts(ids: Array, mask: Array) -> Array:
    """``n_i``: how many valid steps of the history hold the same behaviour as step ``i``.

    ``ids [B,L]`` or ``[B,L,G]`` (``G`` histories of one attention group: steps are equal when
    ALL their ids are), ``mask [B,L]`` -> float ``[B,L]``, ``n_i = Σ_j m_j [ids_j = ids_i]`` (so
    ``n_i >= 1`` at a valid step); 1 at padded steps (their value is never used).
    """
    if ids.ndim == 2:
        ids = ids[..., None]
    same = jnp.all(ids[:, :, None, :] == ids[:, None, :, :], axis=-1)  # [B,L,L]
    n = jnp.sum(same & mask[:, None, :], axis=-1).astype(jnp.float32)
    return jnp.where(mask, n, 1.0)


def _split(x: Array, heads: int) -> Array:
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


# ---------------------------------------------------------------------------------------------
# Transformer encoder (BST) and the homogeneous DPO branch (sDPN)


class MultiHeadSelfAttention(nn.Module):
    """Masked multi-head self-attention (Vaswani et al. 2017): ``x [B,L,D], mask -> [B,L,D]``.

    ``Q, K, V = x W_{q,k,v} + b`` split into ``heads``; ``A_h = softmax_j(Q_h,i·K_h,j / √d_h)``
    over the VALID steps ``j``; heads concatenated -> Dense ``out``.  Padded steps are neither
    attended to nor attend (their outputs are zero).  Params ``query, key, value, out`` Dense
    ``D -> D`` with bias.
    """

    heads: int = 2

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        if x.ndim != 3 or mask.shape != x.shape[:2]:
            raise ValueError(f"MultiHeadSelfAttention expects x [B,L,D] and mask [B,L], got "
                             f"{x.shape}, {mask.shape}")
        d = x.shape[-1]
        dh = head_dim(d, self.heads)
        m = mask[..., None]
        x = jnp.where(m, x, 0)
        q, k, v = (_split(nn.Dense(d, name=n)(x), self.heads) for n in ("query", "key", "value"))
        s = jnp.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(dh)
        a = masked_softmax(s, mask[:, None, None, :])
        o = jnp.einsum("bhij,bjhc->bihc", a, v).reshape(x.shape)
        return jnp.where(m, nn.Dense(d, name="out")(o), 0)


class EncoderBlock(nn.Module):
    """A post-LN Transformer block (BST, Chen et al. 2019; Vaswani et al. 2017)::

        u = LN_1(x + drop(A(x)))          A = MHSA | DynamicConv | MHSA + DynamicConv  (encoder)
        y = LN_2(u + drop(W_2 relu(W_1 u + b_1) + b_2))

    or, ``norm_first=True``, the pre-LN block (Xiong et al. 2020; PyTorch's ``norm_first``)::

        u = x + drop(A(LN_1(x))),         y = u + drop(FFN(LN_2(u)))

    (no final LayerNorm: the block's output is not normalised; the identity path from the
    embeddings to the output is not divided by a per-step norm as in the post-LN block).

    ``encoder``: ``"mhsa"`` (BST), ``"dpo"`` (the homogeneous behaviour-behaviour DPO, the
    dynamic depthwise convolution of :class:`DynamicConv`, replaces the self-attention),
    ``"mhsa+dpo"`` (both as parallel branches, outputs summed before the residual: the sDPN
    encoder of the DPN paper, Table 4).  ``ffn_dim`` 0 = ``4·D`` (Vaswani et al.).  ``dropout``:
    residual dropout on both sub-layer outputs.  Padded steps are zero in and out (LayerNorm is
    per step, so padded values never reach a valid step).
    """

    heads: int = 2
    ffn_dim: int = 0
    dropout: float = 0.0
    encoder: str = "mhsa"
    kernel_size: int = 3
    conv_heads: int = 0
    combine: str = "add"
    norm_first: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, train: bool = False) -> Array:
        check_choice("encoder", self.encoder, ENCODERS)
        if self.ffn_dim < 0:
            raise ConfigError(f"ffn_dim={self.ffn_dim}; expected 0 (4 x the behaviour size) or a "
                              f"positive width")
        d = x.shape[-1]
        m = mask[..., None]
        x = jnp.where(m, x, 0)
        ln_1, ln_2 = nn.LayerNorm(name="ln_1"), nn.LayerNorm(name="ln_2")
        a = jnp.where(m, ln_1(x), 0) if self.norm_first else x
        y = jnp.zeros_like(x)
        if "mhsa" in self.encoder:
            y = y + MultiHeadSelfAttention(self.heads, name="self_attention")(a, mask)
        if "dpo" in self.encoder:
            y = y + DynamicConv(self.kernel_size, self.conv_heads, self.combine,
                                name="dynamic_conv")(a, mask)
        if dropout_active(self.dropout):
            y = Dropout16(self.dropout)(y, deterministic=not train)
        x = jnp.where(m, x + y if self.norm_first else ln_1(x + y), 0)
        a = jnp.where(m, ln_2(x), 0) if self.norm_first else x
        f = nn.relu(nn.Dense(self.ffn_dim or 4 * d, name="ffn_0")(a))
        f = nn.Dense(d, name="ffn_1")(f)
        if dropout_active(self.dropout):
            f = Dropout16(self.dropout)(f, deterministic=not train)
        return jnp.where(m, x + f if self.norm_first else ln_2(x + f), 0)


class TransformerEncoder(nn.Module):
    """Learned positional embeddings + ``blocks`` :class:`EncoderBlock` (BST's encoder).

    ``x [B,L,D], mask [B,L] -> [B,L,D]`` (zero at padded steps).  Position ``i`` is the index of
    the step in the (right-padded) history; the table has ``max_positions`` rows (0 = ``L``, the
    history's length) initialised like the field embeddings (normal, std 1e-4); steps beyond the
    table share its last row.  ``blocks=0``: the embeddings plus positions only.
    """

    blocks: int = 1
    heads: int = 2
    ffn_dim: int = 0
    dropout: float = 0.0
    encoder: str = "mhsa"
    max_positions: int = 0
    kernel_size: int = 3
    conv_heads: int = 0
    combine: str = "add"
    norm_first: bool = False

    @nn.compact
    def __call__(self, x: Array, mask: Array, train: bool = False) -> Array:
        if self.blocks < 0 or self.max_positions < 0:
            raise ConfigError(f"blocks={self.blocks}, max_positions={self.max_positions}; both "
                              f"must be >= 0")
        length, d = x.shape[1:]
        rows = self.max_positions or length
        pos = self.param("position", nn.initializers.normal(POSITION_INIT_STD), (rows, d))
        idx = jnp.minimum(jnp.arange(length), rows - 1)
        x = jnp.where(mask[..., None], x + pos[idx][None].astype(x.dtype), 0)
        for i in range(self.blocks):
            x = EncoderBlock(self.heads, self.ffn_dim, self.dropout, self.encoder,
                             self.kernel_size, self.conv_heads, self.combine, self.norm_first,
                             name=f"block_{i}")(x, mask, train)
        return x


# ---------------------------------------------------------------------------------------------
# decoders: multi-head target attention (optionally with heterogeneous-DPO values)


class TargetAttention(nn.Module):
    """Multi-head target attention: ``q [B,c], keys [B,L,D], mask -> [B,D]``::

        Q = W_q q + b_q,  K_i = W_k x_i + b_k,  V_i = W_v x_i + b_v   (split into heads)
        o_h = Σ_i softmax_i(Q_h·K_h,i / √d_h) V_h,i   (valid steps only)
        out = W_o [o_1, ..., o_H] + b_o

    ``value_dpo=True`` (the sDPN decoder, DPN paper Table 4 "attention+dpo"): the values are the
    heterogeneous query-behaviour DPO ``V_i = W(q) x_i + b(q)`` (:class:`QueryBehaviourDPO`,
    kernel generated from ``q``; ``generator``, ``rank``, ``generator_heads``, ``num_kernels``)
    in place of ``W_v``.  An empty history pools to zeros (``out = b_o``).
    """

    heads: int = 2
    value_dpo: bool = False
    generator: str = "lowrank"
    rank: int = 4
    generator_heads: int = 1
    num_kernels: int = 4

    @nn.compact
    def __call__(self, q: Array, keys: Array, mask: Array,
                 return_weights: bool = False) -> Array | tuple[Array, Array]:
        """Pooled ``[B,D]`` (and the weights ``[B,H,L]`` when ``return_weights``)."""
        if keys.ndim != 3 or q.ndim != 2 or mask.shape != keys.shape[:2] \
                or q.shape[0] != keys.shape[0]:
            raise ValueError(f"TargetAttention expects q [B,c], keys [B,L,D], mask [B,L]; got "
                             f"{q.shape}, {keys.shape}, {mask.shape}")
        bsz, _, d = keys.shape
        dh = head_dim(d, self.heads)
        keys = jnp.where(mask[..., None], keys, 0)
        qh = _split(nn.Dense(d, name="query")(q), self.heads)  # [B,H,dh]
        k = _split(nn.Dense(d, name="key")(keys), self.heads)  # [B,L,H,dh]
        if self.value_dpo:
            v = QueryBehaviourDPO(d, self.generator, self.rank, self.generator_heads,
                                  self.num_kernels, name="value_dpo")(keys, q, mask)
        else:
            v = nn.Dense(d, name="value")(keys)
        v = _split(v, self.heads)
        s = jnp.einsum("bhc,blhc->bhl", qh, k) / math.sqrt(dh)
        a = masked_softmax(s, mask[:, None, :])
        o = jnp.einsum("bhl,blhc->bhc", a, v).reshape(bsz, d)
        out = nn.Dense(d, name="out")(o)
        return (out, a) if return_weights else out


class BehaviourTransformer(nn.Module):
    """The encoder-decoder behaviour unit of BST / the DPN paper's Transformer and sDPN (Table 4):
    ``q [B,c], x [B,L,D], mask [B,L] -> [B,D]`` (the target-specific pooled interest).

    Encoder: :class:`TransformerEncoder` (``blocks``, ``heads``, ``ffn_dim``, ``dropout``,
    ``encoder`` mhsa | dpo | mhsa+dpo, ``max_positions``, ``norm_first``; the homogeneous DPO's
    ``kernel_size``, ``conv_heads``, ``combine``).  Decoder (``decoder``): ``"attention"`` = :class:`TargetAttention`
    of ``q`` over the encoder outputs; ``"attention+dpo"`` = the same with heterogeneous-DPO values
    ``W(q) h_i + b(q)``; ``"dpo"`` = the masked mean of the heterogeneous DPO outputs
    ``mean_i m_i (W(q) h_i + b(q))`` (no attention).  Generator options as
    :class:`TargetAttention`.
    """

    blocks: int = 1
    heads: int = 2
    ffn_dim: int = 0
    dropout: float = 0.0
    encoder: str = "mhsa"
    decoder: str = "attention"
    max_positions: int = 0
    kernel_size: int = 3
    conv_heads: int = 0
    combine: str = "add"
    generator: str = "lowrank"
    rank: int = 4
    generator_heads: int = 1
    num_kernels: int = 4
    norm_first: bool = False

    @nn.compact
    def __call__(self, q: Array, x: Array, mask: Array, train: bool = False) -> Array:
        check_choice("encoder", self.encoder, ENCODERS)
        check_choice("decoder", self.decoder, DECODERS)
        h = TransformerEncoder(self.blocks, self.heads, self.ffn_dim, self.dropout, self.encoder,
                               self.max_positions, self.kernel_size, self.conv_heads,
                               self.combine, self.norm_first, name="encoder")(x, mask, train)
        if self.decoder == "dpo":
            y = QueryBehaviourDPO(x.shape[-1], self.generator, self.rank, self.generator_heads,
                                  self.num_kernels, name="decoder_dpo")(h, q, mask)
            return masked_mean(y, mask)
        return TargetAttention(self.heads, self.decoder == "attention+dpo", self.generator,
                               self.rank, self.generator_heads, self.num_kernels,
                               name="decoder")(q, h, mask)


# ---------------------------------------------------------------------------------------------
# Kalman Filtering Attention


class KalmanAttention(nn.Module):
    """Kalman Filtering Attention (Liu et al., NeurIPS 2020): ``q [B,c], keys [B,L,D], mask
    [B,L] (, counts [B,L]) -> [B,D]``, per head ``h`` (``d_h = D / heads``)::

        q_h = W_q q,  k_i = W_k x_i,  v_i = W_v x_i,  s_i = q_h·k_i / √d_h
        μ_q = W_μ q + b_μ                      prior (global) interest mean
        log σ_q² = w_q q + β_q                 prior variance       (one per head)
        log σ_i² = w_m x_i + β_m               measurement variance of behaviour i
        log σ̃_i² = w_s x_i + β_s               system variance (frequency capping only)

    KFAtt-base (``frequency_capping=False``), the MAP estimate of the interest ``v_q`` under the
    prior ``N(μ_q, σ_q²)`` with every valid behaviour a measurement ``v_i ~ N(v_q, σ_i²)``
    weighted by its relevance ``exp(s_i)``::

        v̂ = (μ_q/σ_q² + Σ_i m_i e^{s_i} v_i/σ_i²) / (1/σ_q² + Σ_i m_i e^{s_i}/σ_i²)
          = softmax over [prior, valid i] of the logits [−log σ_q², s_i − log σ_i²]
            mixing [μ_q, v_i]

    computed in that softmax form (stable for any variances: the log-variances are unbounded
    network outputs, the "exp of a log" parametrisation, and enter only as logit shifts).

    KFAtt-freq (``frequency_capping=True``, default: the paper's full model).  Our reading of
    the paper's frequency capping: in its search setting each DEDUPLICATED historical query is
    one sensor and the clicks under it are repeated noisy measurements; in the DIN/Amazon
    setting behaviours carry no query, so a behaviour is identified by its raw ids (every history
    of the attention group).  A behaviour ``j`` repeated ``n_j`` times is ONE sensor with ``n_j``
    noisy measurements.  Its true value ``v_j`` deviates from the interest by
    a per-behaviour system error ``σ̃_j²``; each click measures ``v_j`` with error ``σ_j²``, so
    the mean of the ``n_j`` measurements observes ``v_q`` with variance ``σ̃_j² + σ_j²/n_j``::

        v̂ = (μ_q/σ_q² + Σ_j e^{s_j} v̄_j/(σ̃_j² + σ_j²/n_j)) / (1/σ_q² + Σ_j e^{s_j}/(σ̃_j² + σ_j²/n_j))

    summed over DISTINCT behaviours ``j``.  In a history the ``n_j`` occurrences carry the same
    embedding (hence the same ``v, s, σ, σ̃``), so ``v̄_j = v_j`` and the sum over distinct ``j``
    equals the sum over every occurrence ``i`` with the weight divided by ``n_i``::

        weight_i = e^{s_i} / (n_i σ̃_i² + σ_i²),   logit_i = s_i − log(n_i σ̃_i² + σ_i²)

    A behaviour's total weight ``n e^s/(n σ̃² + σ²)`` saturates at ``e^s/σ̃²`` as ``n`` grows (the
    cap); base attention grows linearly in ``n``.  ``n_i``: :func:`duplicate_counts` of the raw
    ids among the valid steps (``counts=None`` = all distinct, ``n_i = 1``).  With no duplicates
    freq differs from base only by ``σ̃_i²`` added to ``σ_i²``; with ``σ̃ → 0`` it is base.

    An empty history gives the prior mean ``μ_q``; ``σ_q² → ∞`` with equal ``σ_i`` gives plain
    softmax attention.  Heads are concatenated -> Dense ``out`` (``D``).  Params: Dense
    ``query, key, value, out`` (``D``), ``prior_mean`` (``D``), ``prior_logvar``,
    ``measurement_logvar`` and (freq only) ``system_logvar`` (``heads`` outputs each).
    """

    heads: int = 2
    frequency_capping: bool = True

    @nn.compact
    def __call__(self, q: Array, keys: Array, mask: Array, counts: Array | None = None,
                 return_weights: bool = False) -> Array | tuple[Array, tuple[Array, Array]]:
        """Pooled ``[B,D]`` (and the weights ``(prior [B,H], behaviours [B,H,L])`` when
        ``return_weights``; they sum to 1 per head)."""
        if keys.ndim != 3 or q.ndim != 2 or mask.shape != keys.shape[:2] \
                or q.shape[0] != keys.shape[0]:
            raise ValueError(f"KalmanAttention expects q [B,c], keys [B,L,D], mask [B,L]; got "
                             f"{q.shape}, {keys.shape}, {mask.shape}")
        bsz, _, d = keys.shape
        heads = self.heads
        dh = head_dim(d, heads)
        keys = jnp.where(mask[..., None], keys, 0)
        qh = _split(nn.Dense(d, name="query")(q), heads)  # [B,H,dh]
        k = _split(nn.Dense(d, name="key")(keys), heads)  # [B,L,H,dh]
        v = _split(nn.Dense(d, name="value")(keys), heads)
        mu = _split(nn.Dense(d, name="prior_mean")(q), heads)  # [B,H,dh]
        prior_logvar = nn.Dense(heads, name="prior_logvar")(q)  # [B,H]
        logvar = nn.Dense(heads, name="measurement_logvar")(keys)  # [B,L,H]
        if self.frequency_capping:
            system = nn.Dense(heads, name="system_logvar")(keys)
            n = jnp.ones(mask.shape, keys.dtype) if counts is None else counts.astype(keys.dtype)
            n = jnp.where(mask, jnp.maximum(n, 1), 1)
            logvar = jnp.logaddexp(jnp.log(n)[..., None] + system, logvar)  # log(nσ̃² + σ²)
        s = jnp.einsum("bhc,blhc->bhl", qh, k) / math.sqrt(dh)
        logits = s - jnp.swapaxes(logvar, 1, 2)  # [B,H,L]
        prior_logit = -prior_logvar  # [B,H]
        valid = mask[:, None, :]
        top = jnp.maximum(prior_logit, jnp.max(jnp.where(valid, logits, -jnp.inf), axis=-1))
        top = jax.lax.stop_gradient(top)
        e_prior = jnp.exp(prior_logit - top)
        e = jnp.where(valid, jnp.exp(jnp.where(valid, logits, top[..., None]) - top[..., None]),
                      0)
        total = e_prior + jnp.sum(e, axis=-1)  # >= 1: the largest logit contributes exp(0)
        w_prior, w = e_prior / total, e / total[..., None]
        pooled = w_prior[..., None] * mu + jnp.einsum("bhl,blhc->bhc", w, v)
        out = nn.Dense(d, name="out")(pooled.reshape(bsz, d))
        return (out, (w_prior, w)) if return_weights else out


__all__ = ["DECODERS", "ENCODERS", "BehaviourTransformer", "EncoderBlock", "KalmanAttention",
           "MultiHeadSelfAttention", "TargetAttention", "TransformerEncoder", "duplicate_counts",
           "head_dim", "masked_softmax"]
