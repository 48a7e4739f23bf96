"""Sequence-based DPO (paper §2.4, Fig. 2; docs/dpo_math.md, §'Sequence-based DPO') as pure JAX functions (no Flax).

Behaviours ``X ∈ R^{B×L×d}`` with a validity mask ``m ∈ {0,1}^{B×L}`` (True = a real step; the
schema's histories are right-padded, but any mask works), a query (target item) ``q ∈ R^{B×c}``.

Homogeneous behaviour-behaviour DPO (paper Eqns. 6-7, "dynamic depthwise convolution", ``c = 1``
channel per kernel).  A window of ``k`` (odd) steps centred on ``i``, offsets ``o ∈ [-r, r]``,
``r = (k-1)/2``; every step's kernel is generated from a *local* view (a depthwise convolution of
the masked behaviours followed by a pointwise projection: a separable convolution) and a *global*
one (the average of the valid behaviours)::

    u_i   = Σ_o a_o ⊙ m_{i+o} x_{i+o}                      local view, a ∈ R^{k×d}   (depthwise)
    g     = Σ_j m_j x_j / max(Σ_j m_j, 1)                  global view                (avg pool)
    s_i   = u_i P_l + g P_g + β          ("add", default)  kernel logits ∈ R^{H×k}
          = (u_i P_l) ⊙ (g P_g) + β      ("mul": the multiplicative local × global reading)
    W_i   = softmax_o(s_i + log m_{i+o})                   normalised over the VALID window slots
    y_i,c = m_i Σ_o W_{i,h(c),o} m_{i+o} x_{i+o,c}          depthwise windowed sum (Eqn. 6)

``H`` kernels (heads) per step, channel ``c`` uses head ``h(c) = c // (d/H)``; ``H = d`` is the fully
depthwise form (one kernel per channel), ``H = 1`` shares one kernel across channels
(LightConv/DynamicConv of Wu et al. 2019 use ``1 < H < d``).  The paper says "local-aware
function (convolution or separable convolution) followed by a global average pooling layer" and
"multiplicative interaction correspond to global aggregation features": how the two views are
combined is ambiguous, hence ``combine`` ("add" = a linear map of ``[u_i, g]``, default because it
keeps the logits' scale at init; "mul" = their product).  Facts (tested): padded steps contribute
nothing and padded outputs are zero; with softmax a length-1 history maps to itself (``y_0 = x_0``).

Heterogeneous query-behaviour DPO (paper §2.4; docs/dpo_math.md, §'Heterogeneous query-behaviour DPO'): the query generates ONE kernel per
instance that is applied to every behaviour, ``y_i = m_i (W(q) x_i + b(q))``, using any weight
generator of :mod:`dpn_jax.dpo.generate` (low-rank Eqn. 5 by default in the layers).  Because the
generators are linear in their coefficients ``κ(q)``, ``κ`` is computed once per instance and
broadcast to the ``L`` steps: no ``[B,L,n,m]`` kernel is built.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from dpn_jax.dpo.generate import WeightGenerator, draw, lecun_std
from dpn_jax.errors import ConfigError

Array = jax.Array

COMBINES = ("add", "mul")


# ---------------------------------------------------------------------------------------------
# helpers


def masked_mean(x: Array, mask: Array) -> Array:
    """Average of the valid steps ``Σ_j m_j x_j / max(Σ_j m_j, 1)``: ``[B,L,d], [B,L] -> [B,d]``.

    An empty history averages to zeros (not NaN).  Padded values never enter (``where``, not a
    product, so even non-finite padding cannot leak).
    """
    chex.assert_rank([x, mask], [3, 2])
    chex.assert_equal_shape_prefix([x, mask], 2)
    m = mask[..., None]
    total = jnp.sum(jnp.where(m, x, 0), axis=1)
    count = jnp.sum(m.astype(x.dtype), axis=1)
    return total / jnp.maximum(count, 1)


def check_kernel_size(kernel_size: int) -> int:
    """The half-width ``r`` of an odd window ``k = 2r + 1`` (the window is centred, docs/dpo_math.md, §'Homogeneous behaviour-behaviour DPO')."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"dynamic convolution: kernel_size must be a positive odd number "
                          f"(a window centred on each step), got {kernel_size}")
    return kernel_size // 2


def windows(x: Array, kernel_size: int, fill: Any = 0) -> Array:
    """Shifted views ``out[b,i,o] = x[b, i+o-r]`` (``fill`` outside ``[0,L)``): ``[B,L,...] ->
    [B,L,k,...]``.  Memory ``O(B·L·k·d)``; ``k`` is small."""
    r = check_kernel_size(kernel_size)
    length = x.shape[1]
    pad = [(0, 0), (r, r)] + [(0, 0)] * (x.ndim - 2)
    xp = jnp.pad(x, pad, constant_values=fill)
    return jnp.stack([xp[:, o:o + length] for o in range(kernel_size)], axis=2)


def _heads(features: int, heads: int) -> int:
    heads = features if heads == 0 else heads
    if heads < 1 or features % heads:
        raise ConfigError(f"dynamic convolution: heads={heads} must divide the behaviour size "
                          f"{features} (heads=0 means one kernel per channel)")
    return heads


# ---------------------------------------------------------------------------------------------
# homogeneous behaviour-behaviour DPO: dynamic depthwise convolution


class DynamicConvParams(NamedTuple):
    local_kernel: Array  # a [k, d]: depthwise local view
    local_proj: Array  # P_l [d, H*k]
    global_proj: Array  # P_g [d, H*k]
    bias: Array  # β [H*k]


@functools.partial(jax.jit, static_argnames=("features", "kernel_size", "heads", "dtype"))
def init_dynamic_conv(key: chex.PRNGKey, features: int, kernel_size: int = 3, heads: int = 0,
                      dtype: Any = jnp.float32) -> DynamicConvParams:
    """``a`` std ``1/√k`` (``u_i`` keeps the scale of ``x``), ``P_l, P_g`` LeCun, ``β = 0``.

    CTR embeddings start tiny (1e-4), so fresh kernels are ≈ uniform over the valid window: a
    fresh layer is a masked moving average.
    """
    check_kernel_size(kernel_size)
    hk = _heads(features, heads) * kernel_size
    a, pl, pg = draw(key, [((kernel_size, features), lecun_std(kernel_size)),
                           ((features, hk), lecun_std(features)),
                           ((features, hk), lecun_std(features))], dtype)
    return DynamicConvParams(a, pl, pg, jnp.zeros((hk,), dtype))


def dynamic_conv_logits(params: DynamicConvParams, x: Array, mask: Array, *,
                        combine: str = "add") -> Array:
    """Kernel logits ``s_i`` (module doc): ``x [B,L,d], mask [B,L] -> [B,L,H,k]``."""
    if combine not in COMBINES:
        raise ConfigError(f"dynamic convolution: combine={combine!r}; expected one of "
                          f"{list(COMBINES)}")
    chex.assert_rank([x, mask], [3, 2])
    chex.assert_equal_shape_prefix([x, mask], 2)
    k, d = params.local_kernel.shape
    chex.assert_axis_dimension(x, 2, d)
    hk = params.bias.shape[0]
    xm = jnp.where(mask[..., None], x, 0)
    local = jnp.einsum("blod,od->bld", windows(xm, k), params.local_kernel)  # u_i
    lp = local @ params.local_proj  # [B,L,H*k]
    gp = (masked_mean(x, mask) @ params.global_proj)[:, None]  # [B,1,H*k]
    s = (lp + gp if combine == "add" else lp * gp) + params.bias
    return s.reshape(x.shape[0], x.shape[1], hk // k, k)


def dynamic_conv_weights(params: DynamicConvParams, x: Array, mask: Array, *,
                         combine: str = "add", normalize: bool = True) -> Array:
    """Per-step kernels ``W [B,L,H,k]``: zero on padded window slots and on padded steps.

    ``normalize``: softmax over the valid slots of each window (docs/dpo_math.md, §'Homogeneous behaviour-behaviour DPO'); without it the raw
    logits are the weights (masked the same way).
    """
    s = dynamic_conv_logits(params, x, mask, combine=combine)
    k = s.shape[-1]
    valid = windows(mask, k, fill=False)[:, :, None, :]  # [B,L,1,k]: slot o of step i is real
    valid = valid & mask[:, :, None, None]
    if normalize:
        # A finite "minus infinity": a fully padded window (padded steps only) stays NaN-free.
        s = jnp.where(valid, s, jnp.asarray(-1e9, s.dtype))
        s = jax.nn.softmax(s, axis=-1)
    return jnp.where(valid, s, 0)


def windowed_sum(x: Array, weights: Array, mask: Array) -> Array:
    """Depthwise windowed sum ``y_i,c = m_i Σ_o W_{i,h(c),o} m_{i+o} x_{i+o,c}`` (Eqn. 6).

    ``x [B,L,d], weights [B,L,H,k] (H | d), mask [B,L] -> [B,L,d]``.  Never mixes across the mask:
    padded values are replaced by zeros before the sum and padded outputs are zero.
    """
    chex.assert_rank([x, weights, mask], [3, 4, 2])
    chex.assert_equal_shape_prefix([x, weights, mask], 2)
    bsz, length, d = x.shape
    heads, k = weights.shape[2:]
    if d % heads:
        raise ConfigError(f"windowed_sum: {heads} kernels per step do not divide {d} channels")
    xm = jnp.where(mask[..., None], x, 0)
    win = windows(xm, k).reshape(bsz, length, k, heads, d // heads)
    y = jnp.einsum("blhk,blkhc->blhc", weights, win).reshape(bsz, length, d)
    return jnp.where(mask[..., None], y, 0)


def dynamic_conv(params: DynamicConvParams, x: Array, mask: Array, *, combine: str = "add",
                 normalize: bool = True) -> Array:
    """Homogeneous behaviour-behaviour DPO: ``x [B,L,d], mask [B,L] -> [B,L,d]`` (module doc)."""
    w = dynamic_conv_weights(params, x, mask, combine=combine, normalize=normalize)
    y = windowed_sum(x, w, mask)
    chex.assert_shape(y, x.shape)
    return y


# ---------------------------------------------------------------------------------------------
# heterogeneous query-behaviour DPO: y_i = W(q) x_i + b(q)


def query_behaviour_kernels(gen: WeightGenerator, params: Any, q: Array) -> tuple[Array, Array]:
    """The query's materialised kernel ``(W [B,n,m], b [B,n])`` (checks and inspection)."""
    return gen.generate(params, q)


def query_behaviour_apply(gen: WeightGenerator, params: Any, x: Array, q: Array,
                          mask: Array | None = None, *, materialize: bool | None = None) -> Array:
    """Heterogeneous DPO: ``y_i = m_i (W(q) x_i + b(q))``.

    ``x [B,L,m]`` (``m = gen.in_features``), ``q [B,c]`` (``c = gen.context_features``),
    ``mask [B,L]`` (None: every step valid) ``-> [B,L,n]``; padded steps give zeros.

    Two exact evaluations (same function, float rounding aside): ``materialize=True`` builds
    each instance's kernel once (``gen.generate``, ``O(B·K·m·n)``) and applies it to the ``L``
    steps (``O(B·L·m·n)``); ``False`` is the fused form of the generator (coefficients ``κ(q)``
    broadcast to the steps, ``O(B·L·K·m·n)`` for a ``K``-term basis, no ``[B,n,m]`` kernel).
    ``None`` (default) materialises when the sequence is longer than one step (fewer FLOPs for
    ``L > 1``; timings in docs/results/speed.md, §'Behaviour models').
    """
    chex.assert_rank([x, q], [3, 2])
    chex.assert_equal_shape_prefix([x, q], 1)
    chex.assert_axis_dimension(x, 2, gen.in_features)
    chex.assert_axis_dimension(q, 1, gen.context_features)
    bsz, length, m = x.shape
    if mask is not None:
        chex.assert_shape(mask, (bsz, length))
        x = jnp.where(mask[..., None], x, 0)
    if materialize is None:
        materialize = length > 1
    if materialize:
        w, b = gen.generate(params, q)  # [B,n,m], [B,n]
        y = jnp.einsum("blm,bnm->bln", x, w) + b[:, None]
    else:
        coef = gen.coefficients(params, q)
        coef = jax.tree.map(
            lambda a: jnp.broadcast_to(a[:, None], (bsz, length) + a.shape[1:]).reshape(
                (bsz * length,) + a.shape[1:]), coef)
        y = gen.apply_coefficients(params, x.reshape(bsz * length, m), coef)
        y = y.reshape(bsz, length, gen.out_features)
    return y if mask is None else jnp.where(mask[..., None], y, 0)


# ---------------------------------------------------------------------------------------------
# DIN's attention features [q, k, q−k, q⊙k] times a kernel, without building them


def din_features(q: Array, keys: Array) -> Array:
    """DIN's activation-unit input ``[q, k_i, q−k_i, q⊙k_i]``: ``[B,d], [B,L,d] -> [B,L,4d]``."""
    qb = jnp.broadcast_to(q[:, None], keys.shape)
    return jnp.concatenate([qb, keys, qb - keys, qb * keys], axis=-1)


def din_features_dense(q: Array, keys: Array, kernel: Array, bias: Array | None = None) -> Array:
    """``din_features(q, k) @ kernel + bias`` without the ``[B,L,4d]`` features.

    With the kernel's row blocks ``W = [W_q; W_k; W_d; W_p]`` (each ``[d,n]``)::

        [q, k_i, q−k_i, q⊙k_i] W  =  q (W_q + W_d)  +  k_i (W_k − W_d + diag(q) W_p)
                                  =  c(q)           +  k_i M(q)

    so the query part is computed once per instance and each step costs ``2d×n`` (a static
    kernel: ``[k_i, q⊙k_i]`` times ``[W_k − W_d; W_p]``) or ``d×n`` (a per-instance kernel:
    ``k_i M(q)``) instead of ``4d×n``.  ``kernel [4d,n]`` (static, DIN) or ``[B,4d,n]`` (one per instance: a
    query-generated kernel, DIN-DPO); ``bias [n]`` or ``[B,n]``.  ``-> [B,L,n]``.
    """
    chex.assert_rank([q, keys], [2, 3])
    d = keys.shape[-1]
    if kernel.shape[-2] != 4 * d:
        raise ValueError(f"din_features_dense: kernel {kernel.shape} needs {4 * d} input rows "
                         f"(4 x the behaviour size {d})")
    wq, wk, wd, wp = jnp.split(kernel, 4, axis=-2)
    if kernel.ndim == 2:
        # One GEMM [k_i, q⊙k_i] @ [W_k − W_d; W_p] (2d rows): on CPU a large GEMM runs ~10x
        # faster per FLOP than the batched d×n products of k_i M(q) (XLA:CPU, measured).
        c = q @ (wq + wd)  # [B,n]
        kq = jnp.concatenate([keys, q[:, None] * keys], axis=-1)
        y = kq @ jnp.concatenate([wk - wd, wp], axis=0) + c[:, None]
    else:
        chex.assert_rank(kernel, 3)
        c = jnp.einsum("bd,bdn->bn", q, wq + wd)
        m = (wk - wd) + q[:, :, None] * wp  # M(q) [B,d,n]
        y = jnp.einsum("bld,bdn->bln", keys, m) + c[:, None]
    if bias is not None:
        y = y + (bias if bias.ndim == 1 else bias[:, None])
    return y


def query_behaviour_din_apply(gen: WeightGenerator, params: Any, z: Array, q: Array,
                              keys: Array, mask: Array | None = None) -> Array:
    """:func:`query_behaviour_apply` on DIN's features ``[q, k_i, q−k_i, q⊙k_i]`` (``gen``'s
    ``in_features = 4d``) with the kernel generated from the context ``z [B,c]`` (the query, or
    its normalised form), through :func:`din_features_dense` on the materialised kernel:
    ``q [B,d], keys [B,L,d], mask [B,L] -> [B,L,n]``; padded steps give zeros."""
    chex.assert_rank([z, q, keys], [2, 2, 3])
    chex.assert_axis_dimension(z, 1, gen.context_features)
    chex.assert_axis_dimension(q, 1, gen.in_features // 4)
    if mask is not None:
        keys = jnp.where(mask[..., None], keys, 0)
    w, b = gen.generate(params, z)  # [B,n,4d], [B,n]
    y = din_features_dense(q, keys, jnp.swapaxes(w, 1, 2), b)
    return y if mask is None else jnp.where(mask[..., None], y, 0)
