"""Weight-generate families ``g(z; θ) -> (W, b)`` of the Dynamic Parameterized Operation.

Paper: Zhu et al., "Dynamic Parameterized Network for CTR Prediction" (arXiv 2111.04983), §2.2 and the
Table 2a ablation; the equations written out in docs/dpo_math.md, §'Weight generators'.  Notation: input
``x ∈ R^m`` (``in_features``), context ``z ∈ R^c`` (``context_features``), output ``y ∈ R^n``
(``out_features``); every array carries a leading batch axis ``B``.

Every family here is *linear in a small coefficient pytree* ``κ(z)``::

    W(z) = Σ_k κ_k(z) K_k,      b(z) = Σ_k κ_k(z) β_k

(low-rank: ``κ = [1, h(z)]``; mixture: ``κ = softmax(gate(z))``; HyperDense: ``κ = [1, z]``; ...).
That one fact gives (a) the fused ``apply`` that never builds a per-instance ``n×m`` kernel and
(b) cheap field aggregations (``aggregate.py``): a sum or attention-weighted sum of generated kernels
is the kernel of the summed / weighted coefficients.  Hence the three primitives of a
:class:`WeightGenerator` -- ``coefficients``, ``combine`` (materialise) and ``apply_coefficients``
(fused) -- from which ``generate`` and ``apply`` are derived.

Initialisation (all families): the *static* part (the coefficient-1 kernel ``ḃ`` of Eqn. 5, the shared
kernel of the mixture) gets Flax ``Dense``'s default, LeCun-normal (variance ``1/fan_in``) with a zero
bias, so a fresh DPO is a well-initialised dense layer.  The *dynamic* part is scaled so that, for
unit-variance ``x`` and ``z``, its output has std ``≈ dynamic_scale · sqrt(E[h²])`` of the static one
(default 0.25; ReLU's ``E[h²] = 1/2`` gives ≈0.18).  The dynamic bias weights start at zero (like
``Dense``'s bias): they still receive gradient ``h·δ``.  Output variance at init is then
``1 + O(dynamic_scale²)`` times a Dense layer's, so the same learning rate is safe.  All random draws are ±2σ truncated normals rescaled to the stated std,
made in ONE call per init (see :func:`draw`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError

Array = jax.Array
Params = Any
Coefficients = Any  # a pytree of arrays, each with a leading batch axis
Activation = Callable[[Array], Array]

DEFAULT_DYNAMIC_SCALE = 0.25

ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "identity": lambda h: h,
    "linear": lambda h: h,  # the towers' name for it (nn/mlp.py)
}

GENERATORS = ("lowrank", "hyperdense", "multihead", "mixture", "diagonal", "rank1")


def resolve_activation(activation: str | Activation) -> Activation:
    """Maps an activation name (or a callable, returned as is) to a function."""
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown hidden activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation]


class WeightGenerator(NamedTuple):
    """A weight-generate family ``g(z; θ)`` with its hyper-parameters closed over (optax style).

    ``init(key) -> params``; ``coefficients(params, z [B,c]) -> κ`` (pytree, leading axis B);
    ``combine(params, κ) -> (W [B,n,m], b [B,n])`` materialises; ``apply_coefficients(params,
    x [B,m], κ) -> y [B,n]`` is the fused product ``W(κ) x + b(κ)``.
    """

    name: str
    in_features: int
    out_features: int
    context_features: int
    init: Callable[[chex.PRNGKey], Params]
    coefficients: Callable[[Params, Array], Coefficients]
    combine: Callable[[Params, Coefficients], tuple[Array, Array]]
    apply_coefficients: Callable[[Params, Array, Coefficients], Array]

    def generate(self, params: Params, z: Array) -> tuple[Array, Array]:
        """Materialising ``g``: ``z [B,c] -> (W [B,n,m], b [B,n])``."""
        chex.assert_rank(z, 2)
        chex.assert_shape(z, (None, self.context_features))
        w, b = self.combine(params, self.coefficients(params, z))
        chex.assert_shape([w, b], [(z.shape[0], self.out_features, self.in_features),
                                   (z.shape[0], self.out_features)])
        return w, b

    def apply(self, params: Params, x: Array, z: Array) -> Array:
        """Fused DPO ``y = W(z) x + b(z)``: ``x [B,m], z [B,c] -> y [B,n]`` (docs/dpo_math.md, §'Feature-based DPO')."""
        chex.assert_rank([x, z], 2)
        chex.assert_shape([x, z], [(None, self.in_features), (None, self.context_features)])
        chex.assert_equal_shape_prefix([x, z], 1)
        y = self.apply_coefficients(params, x, self.coefficients(params, z))
        chex.assert_shape(y, (x.shape[0], self.out_features))
        return y


# ---------------------------------------------------------------------------------------------
# shared helpers


# Inits are jitted with their hyper-parameters static and draw ALL their random numbers in ONE
# truncated-normal call: on CPU each random op costs ~0.5 s of XLA compile, so an eager
# ``model.init`` of a DPN would otherwise spend seconds per layer compiling random ops.
_STATIC_INIT_ARGS = ("in_features", "out_features", "context_features", "rank", "heads",
                     "num_kernels", "use_bias", "dynamic_scale", "dtype", "x_features",
                     "z_features", "shape", "fan_in")
_TRUNC_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2] (as in variance_scaling)


def jit_init(fn: Callable) -> Callable:
    """``jax.jit`` with every hyper-parameter argument of ``fn`` static."""
    names = tuple(n for n in inspect.signature(fn).parameters if n in _STATIC_INIT_ARGS)
    return jax.jit(fn, static_argnames=names)


def draw(key: chex.PRNGKey, specs: Sequence[tuple[tuple[int, ...], float]], dtype: Any
         ) -> list[Array]:
    """Arrays of the given ``(shape, std)`` from one truncated-normal (±2σ) draw.

    ``std = 1/sqrt(fan_in)`` is LeCun-normal, the distribution of ``flax.linen.Dense``'s kernel.
    """
    sizes = [math.prod(shape) for shape, _ in specs]
    flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), dtype)
    out, start = [], 0
    for (shape, std), size in zip(specs, sizes):
        out.append(flat[start:start + size].reshape(shape) * jnp.asarray(std / _TRUNC_STD, dtype))
        start += size
    return out


def lecun_std(fan_in: int) -> float:
    return 1.0 / math.sqrt(fan_in)


@jit_init
def lecun_normal(key: chex.PRNGKey, shape: tuple[int, ...], fan_in: int, dtype: Any = jnp.float32
                 ) -> Array:
    """LeCun truncated normal of any shape with an explicit ``fan_in``."""
    return draw(key, [(shape, lecun_std(fan_in))], dtype)[0]


def _with_one(h: Array) -> Array:
    """``[1, h]``: coefficient 0 selects the static kernel ``ḃ`` / bias ``b̃`` of Eqn. 5."""
    return jnp.concatenate([jnp.ones_like(h[..., :1]), h], axis=-1)


def _basis_apply(kernel: Array, bias: Array | None, x: Array, coef: Array,
                 matmul: Callable[[Array, Array], Array] = jnp.matmul) -> Array:
    """``Σ_k κ_k (x K_k) + κ·β`` with ``kernel [m,K,n]``: ONE matmul ``x @ [K_1 | ... | K_K]``
    (by ``matmul``, e.g. a bfloat16 product).

    Memory ``O(B·K·n)``; never an ``[B,n,m]`` kernel.
    """
    m, k, n = kernel.shape
    y_all = matmul(x, kernel.reshape(m, k * n)).reshape(x.shape[0], k, n)
    y = jnp.einsum("bkn,bk->bn", y_all, coef)
    return y if bias is None else y + coef @ bias


def _basis_combine(kernel: Array, bias: Array | None, coef: Array) -> tuple[Array, Array]:
    """Materialises ``W = Σ_k κ_k K_k^T [B,n,m]`` and ``b = Σ_k κ_k β_k [B,n]``."""
    w = jnp.einsum("bk,mkn->bnm", coef, kernel)
    b = jnp.zeros(w.shape[:2], w.dtype) if bias is None else coef @ bias
    return w, b


class HiddenParams(NamedTuple):
    """First layer of Eqn. 5: ``h = σ(Ŵ z + b̂)``."""

    kernel: Array  # Ŵ [c, l]
    bias: Array  # b̂ [l]


def _hidden_spec(context_features: int, rank: int) -> tuple[tuple[int, ...], float]:
    """LeCun ``Ŵ``: pre-activations get the variance of ``z``; ``b̂`` starts at zero."""
    return (context_features, rank), lecun_std(context_features)


def _hidden(kernel: Array) -> HiddenParams:
    return HiddenParams(kernel, jnp.zeros(kernel.shape[1:], kernel.dtype))


@jit_init
def init_hidden(key: chex.PRNGKey, context_features: int, rank: int, dtype: Any = jnp.float32
                ) -> HiddenParams:
    """LeCun ``Ŵ`` (pre-activations have the variance of ``z``), zero ``b̂``."""
    return _hidden(draw(key, [_hidden_spec(context_features, rank)], dtype)[0])


def hidden(params: HiddenParams, z: Array, activation: Activation) -> Array:
    """``h(z) = σ(Ŵ z + b̂)`` of the paper's Eqn. 5 (docs/dpo_math.md, §'Low-rank generator'): ``[B,c] -> [B,l]``."""
    return activation(z @ params.kernel + params.bias)


def _dynamic_std(fan_in: int, terms: int, scale: float) -> float:
    """Per-entry std so that ``terms`` dynamic kernels times unit-variance ``h`` give std ``scale``."""
    return scale / math.sqrt(fan_in * terms)


# ---------------------------------------------------------------------------------------------
# low-rank two-layer MLP (the paper's Eqn. 5, the default; docs/dpo_math.md, §'Low-rank generator')


class LowRankParams(NamedTuple):
    """``kernel[:, 0, :]`` is ``reshape(ḃ)`` in Dense layout ``[m, n]``; ``kernel[:, k, :]`` is
    ``reshape(Ẇ_k)``.  ``bias[0]`` is ``b̃``, ``bias[k]`` the row ``k`` of ``W̃``."""

    hidden: HiddenParams
    kernel: Array  # [m, l+1, n]
    bias: Array | None  # [l+1, n]


@jit_init
def init_lowrank(key: chex.PRNGKey, in_features: int, out_features: int, context_features: int,
                 rank: int = 4, *, use_bias: bool = True,
                 dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
                 ) -> LowRankParams:
    """Eqn. 5 parameters; static ``ḃ`` LeCun, ``Ẇ`` small (module docstring)."""
    hk, static, dyn = draw(key, [
        _hidden_spec(context_features, rank),
        ((in_features, 1, out_features), lecun_std(in_features)),
        ((in_features, rank, out_features), _dynamic_std(in_features, rank, dynamic_scale))],
        dtype)
    bias = jnp.zeros((rank + 1, out_features), dtype) if use_bias else None
    return LowRankParams(_hidden(hk), jnp.concatenate([static, dyn], axis=1), bias)


def lowrank(in_features: int, out_features: int, context_features: int, rank: int = 4, *,
            activation: str | Activation = "relu", use_bias: bool = True,
            dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32,
            matmul: Callable[[Array, Array], Array] = jnp.matmul) -> WeightGenerator:
    """Low-rank generator (the paper's Eqn. 5; docs/dpo_math.md, §'Low-rank generator'): ``h = σ(Ŵz + b̂)``, ``vec(W) = Ẇh + ḃ``, ``b = W̃h + b̃``.

    Fused cost ≈ ``rank + 1`` dense layers: ``W(z)x = ḃx + Σ_k h_k(z)(Ẇ_k x)``, the ``rank + 1``
    products done as one ``matmul(x, [ḃ | Ẇ_1 | ... | Ẇ_k])`` (``matmul``: e.g.
    :func:`dpn_jax.nn.precision.bf16_matmul`; the materialised ``combine`` path stays float32).
    """
    act = resolve_activation(activation)

    def coefficients(params: LowRankParams, z: Array) -> Array:
        return _with_one(hidden(params.hidden, z, act))

    return WeightGenerator(
        "lowrank", in_features, out_features, context_features,
        init=lambda key: init_lowrank(key, in_features, out_features, context_features, rank,
                                      use_bias=use_bias, dynamic_scale=dynamic_scale, dtype=dtype),
        coefficients=coefficients,
        combine=lambda p, c: _basis_combine(p.kernel, p.bias, c),
        apply_coefficients=lambda p, x, c: _basis_apply(p.kernel, p.bias, x, c, matmul),
    )


# ---------------------------------------------------------------------------------------------
# HyperDense (Ha et al. 2016): vec(W), b = Ŵ z + b̂


class HyperDenseParams(NamedTuple):
    """``kernel[:, 0, :]`` = ``b̂`` for ``vec(W)`` (Dense layout), ``kernel[:, 1+j, :]`` = column ``j``
    of ``Ŵ``; ``bias[0]`` / ``bias[1+j]`` likewise for ``b``.  Size ``O(mnc)``: the point."""

    kernel: Array  # [m, c+1, n]
    bias: Array | None  # [c+1, n]


@jit_init
def init_hyperdense(key: chex.PRNGKey, in_features: int, out_features: int,
                    context_features: int, *, use_bias: bool = True,
                    dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
                    ) -> HyperDenseParams:
    static, dyn = draw(key, [
        ((in_features, 1, out_features), lecun_std(in_features)),
        ((in_features, context_features, out_features),
         _dynamic_std(in_features, context_features, dynamic_scale))], dtype)
    bias = jnp.zeros((context_features + 1, out_features), dtype) if use_bias else None
    return HyperDenseParams(jnp.concatenate([static, dyn], axis=1), bias)


def hyperdense(in_features: int, out_features: int, context_features: int, *,
               use_bias: bool = True, dynamic_scale: float = DEFAULT_DYNAMIC_SCALE,
               dtype: Any = jnp.float32) -> WeightGenerator:
    """Full hypernetwork ``vec(W), b = Ŵ z + b̂`` (Table 2a "HyperDense"; docs/dpo_math.md, §'HyperDense').

    Its ``apply`` deliberately MATERIALISES the per-instance ``[B,n,m]`` kernel: that memory and
    time cost is what the paper's ablation measured.  (Algebraically it is the low-rank family with
    ``h = z``; ``lowrank(..., rank=c, activation="identity")`` with ``Ŵ = I`` is its fused form.)
    """

    def apply_coefficients(p: HyperDenseParams, x: Array, c: Array) -> Array:
        w, b = _basis_combine(p.kernel, p.bias, c)
        return jnp.einsum("bnm,bm->bn", w, x) + b

    return WeightGenerator(
        "hyperdense", in_features, out_features, context_features,
        init=lambda key: init_hyperdense(key, in_features, out_features, context_features,
                                         use_bias=use_bias, dynamic_scale=dynamic_scale,
                                         dtype=dtype),
        coefficients=lambda p, z: _with_one(z),
        combine=lambda p, c: _basis_combine(p.kernel, p.bias, c),
        apply_coefficients=apply_coefficients,
    )


# ---------------------------------------------------------------------------------------------
# multi-head low-rank: block-diagonal W, one Eqn.-5 generator per head


class MultiHeadParams(NamedTuple):
    hidden: HiddenParams  # kernel [c, H*l], bias [H*l]
    kernel: Array  # [H, m/H, l+1, n/H]
    bias: Array | None  # [H, l+1, n/H]


@jit_init
def init_multihead(key: chex.PRNGKey, in_features: int, out_features: int,
                   context_features: int, rank: int = 4, heads: int = 2, *,
                   use_bias: bool = True, dynamic_scale: float = DEFAULT_DYNAMIC_SCALE,
                   dtype: Any = jnp.float32) -> MultiHeadParams:
    mh, nh = in_features // heads, out_features // heads
    hk, static, dyn = draw(key, [
        _hidden_spec(context_features, heads * rank),
        ((heads, mh, 1, nh), lecun_std(mh)),  # fan-in per head
        ((heads, mh, rank, nh), _dynamic_std(mh, rank, dynamic_scale))], dtype)
    bias = jnp.zeros((heads, rank + 1, nh), dtype) if use_bias else None
    return MultiHeadParams(_hidden(hk), jnp.concatenate([static, dyn], axis=2), bias)


def multihead(in_features: int, out_features: int, context_features: int, rank: int = 4,
              heads: int = 2, *, activation: str | Activation = "relu", use_bias: bool = True,
              dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
              ) -> WeightGenerator:
    """Multi-head low-rank (paper §2.2, "multi-head mechanism"): ``x`` and ``y`` split into ``H``
    heads; head ``h`` has its own Eqn.-5 generator for an ``(n/H)×(m/H)`` kernel, so ``W(z)`` is
    block-diagonal and the generator costs ``1/H`` of the low-rank one."""
    if heads < 1 or in_features % heads or out_features % heads:
        raise ConfigError(
            f"multihead generator: heads={heads} must divide in_features={in_features} and "
            f"out_features={out_features}")
    act = resolve_activation(activation)

    def coefficients(p: MultiHeadParams, z: Array) -> Array:
        return _with_one(hidden(p.hidden, z, act).reshape(z.shape[0], heads, rank))

    def combine(p: MultiHeadParams, c: Array) -> tuple[Array, Array]:
        blocks = jnp.einsum("bhk,hmkn->bhnm", c, p.kernel)  # [B,H,n/H,m/H]
        eye = jnp.eye(heads, dtype=blocks.dtype)
        w = jnp.einsum("bhnm,hg->bhngm", blocks, eye)  # scatter blocks onto the diagonal
        w = w.reshape(c.shape[0], out_features, in_features)
        b = (jnp.zeros((c.shape[0], out_features), w.dtype) if p.bias is None
             else jnp.einsum("bhk,hkn->bhn", c, p.bias).reshape(c.shape[0], out_features))
        return w, b

    def apply_coefficients(p: MultiHeadParams, x: Array, c: Array) -> Array:
        xh = x.reshape(x.shape[0], heads, in_features // heads)
        y = jnp.einsum("bhkn,bhk->bhn", jnp.einsum("bhm,hmkn->bhkn", xh, p.kernel), c)
        if p.bias is not None:
            y = y + jnp.einsum("bhk,hkn->bhn", c, p.bias)
        return y.reshape(x.shape[0], out_features)

    return WeightGenerator(
        "multihead", in_features, out_features, context_features,
        init=lambda key: init_multihead(key, in_features, out_features, context_features, rank,
                                        heads, use_bias=use_bias, dynamic_scale=dynamic_scale,
                                        dtype=dtype),
        coefficients=coefficients, combine=combine, apply_coefficients=apply_coefficients,
    )


# ---------------------------------------------------------------------------------------------
# gated mixture of kernels: W(z) = Σ_k softmax_k(gate(z)) W_k


class MixtureParams(NamedTuple):
    gate_kernel: Array  # [c, K]
    gate_bias: Array  # [K]
    kernel: Array  # [m, K, n]: W_k in Dense layout
    bias: Array | None  # [K, n]


@jit_init
def init_mixture(key: chex.PRNGKey, in_features: int, out_features: int, context_features: int,
                 num_kernels: int = 4, *, use_bias: bool = True,
                 dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
                 ) -> MixtureParams:
    """``W_k = W_0 + δ_k``: since ``Σ_k s_k = 1`` the shared LeCun ``W_0`` is the static kernel;
    ``δ_k`` (std ``dynamic_scale·sqrt(K/m)``) is the gated part, ≈``dynamic_scale`` of it."""
    gate, shared, delta = draw(key, [
        ((context_features, num_kernels), lecun_std(context_features)),
        ((in_features, 1, out_features), lecun_std(in_features)),
        ((in_features, num_kernels, out_features),
         dynamic_scale * math.sqrt(num_kernels / in_features))], dtype)
    bias = jnp.zeros((num_kernels, out_features), dtype) if use_bias else None
    return MixtureParams(gate, jnp.zeros((num_kernels,), dtype), shared + delta, bias)


def mixture(in_features: int, out_features: int, context_features: int, num_kernels: int = 4, *,
            use_bias: bool = True, dynamic_scale: float = DEFAULT_DYNAMIC_SCALE,
            dtype: Any = jnp.float32) -> WeightGenerator:
    """Gated mixture of kernels (Table 2a, best): ``W(z) = Σ_k s_k W_k``, ``b(z) = Σ_k s_k b_k``,
    ``s = softmax(z G + g)``.  Fused: ``Σ_k s_k (W_k x)`` via one matmul."""
    return WeightGenerator(
        "mixture", in_features, out_features, context_features,
        init=lambda key: init_mixture(key, in_features, out_features, context_features,
                                      num_kernels, use_bias=use_bias,
                                      dynamic_scale=dynamic_scale, dtype=dtype),
        coefficients=lambda p, z: jax.nn.softmax(z @ p.gate_kernel + p.gate_bias, axis=-1),
        combine=lambda p, c: _basis_combine(p.kernel, p.bias, c),
        apply_coefficients=lambda p, x, c: _basis_apply(p.kernel, p.bias, x, c),
    )


# ---------------------------------------------------------------------------------------------
# complexity-reduced variants: keep Eqn. 5's static ḃ, generate only a diagonal / rank-1 term


class DiagonalParams(NamedTuple):
    hidden: HiddenParams
    kernel: Array  # static ḃ [m, n]
    diag: Array  # [l, min(m, n)]: d(z) = h(z) D
    bias: Array | None  # [l+1, n]


@jit_init
def init_diagonal(key: chex.PRNGKey, in_features: int, out_features: int, context_features: int,
                  rank: int = 4, *, use_bias: bool = True,
                  dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
                  ) -> DiagonalParams:
    k = min(in_features, out_features)
    # A diagonal entry multiplies one input (fan-in 1), hence no 1/m in its std.
    hk, static, diag = draw(key, [
        _hidden_spec(context_features, rank),
        ((in_features, out_features), lecun_std(in_features)),
        ((rank, k), _dynamic_std(1, rank, dynamic_scale))], dtype)
    return DiagonalParams(_hidden(hk), static, diag,
                          jnp.zeros((rank + 1, out_features), dtype) if use_bias else None)


def diagonal(in_features: int, out_features: int, context_features: int, rank: int = 4, *,
             activation: str | Activation = "relu", use_bias: bool = True,
             dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
             ) -> WeightGenerator:
    """``W(z) = reshape(ḃ) + diag(h(z) D)`` (rectangular diagonal when ``n ≠ m``): the generated part
    costs ``O(l·min(m,n))`` (Table 2a complexity reduction).  With ``ḃ = 0``, ``σ = identity`` and
    ``Ŵ = D = I`` it is ``g(z) = diag(z)`` (the FM relation, docs/dpo_math.md, §'FM and the cross layer')."""
    act = resolve_activation(activation)
    k = min(in_features, out_features)

    def coefficients(p: DiagonalParams, z: Array) -> Array:
        return _with_one(hidden(p.hidden, z, act))

    def combine(p: DiagonalParams, c: Array) -> tuple[Array, Array]:
        d = c[:, 1:] @ p.diag  # [B, k]
        eye = jnp.eye(out_features, in_features, dtype=d.dtype)  # rectangular identity
        w = c[:, 0, None, None] * p.kernel.T[None]
        w = w + jnp.pad(d, ((0, 0), (0, out_features - k)))[:, :, None] * eye[None]
        b = jnp.zeros((c.shape[0], out_features), w.dtype) if p.bias is None else c @ p.bias
        return w, b

    def apply_coefficients(p: DiagonalParams, x: Array, c: Array) -> Array:
        d = c[:, 1:] @ p.diag
        y = c[:, :1] * (x @ p.kernel)
        y = y + jnp.pad(d * x[:, :k], ((0, 0), (0, out_features - k)))
        return y if p.bias is None else y + c @ p.bias

    return WeightGenerator(
        "diagonal", in_features, out_features, context_features,
        init=lambda key: init_diagonal(key, in_features, out_features, context_features, rank,
                                       use_bias=use_bias, dynamic_scale=dynamic_scale,
                                       dtype=dtype),
        coefficients=coefficients, combine=combine, apply_coefficients=apply_coefficients,
    )


class RankOneParams(NamedTuple):
    hidden: HiddenParams
    kernel: Array  # static ḃ [m, n]
    u: Array  # [l, n]: u(z) = h U
    v: Array  # [l, m]: v(z) = h V
    bias: Array | None  # [l+1, n]


class RankOneCoefficients(NamedTuple):
    """``u vᵀ = Σ_{k,k'} h_k h_k' U_k V_k'ᵀ`` is linear in ``h⊗h``: keep it as its own coefficient
    so that sums over fields stay exact (``Σ_j h_j⊗h_j ≠ (Σ_j h_j)⊗(Σ_j h_j)``)."""

    linear: Array  # [B, l+1] = [1, h]
    quadratic: Array  # [B, l, l] = h ⊗ h


@jit_init
def init_rank1(key: chex.PRNGKey, in_features: int, out_features: int, context_features: int,
               rank: int = 4, *, use_bias: bool = True,
               dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
               ) -> RankOneParams:
    """Var(u) · Var(v·x) ≈ dynamic_scale² for unit ``h``: split the scale evenly over ``U``, ``V``."""
    s = math.sqrt(dynamic_scale)
    hk, static, u, v = draw(key, [
        _hidden_spec(context_features, rank),
        ((in_features, out_features), lecun_std(in_features)),
        ((rank, out_features), _dynamic_std(1, rank, s)),
        ((rank, in_features), _dynamic_std(in_features, rank, s))], dtype)
    return RankOneParams(_hidden(hk), static, u, v,
                         jnp.zeros((rank + 1, out_features), dtype) if use_bias else None)


def rank1(in_features: int, out_features: int, context_features: int, rank: int = 4, *,
          activation: str | Activation = "relu", use_bias: bool = True,
          dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32
          ) -> WeightGenerator:
    """``W(z) = reshape(ḃ) + u(z) v(z)ᵀ``, ``u = hU``, ``v = hV``: the generated part costs
    ``O(l(m+n))`` (Table 2a complexity reduction).  Fused: ``u (v·x)``."""
    act = resolve_activation(activation)

    def coefficients(p: RankOneParams, z: Array) -> RankOneCoefficients:
        h = hidden(p.hidden, z, act)
        return RankOneCoefficients(_with_one(h), h[:, :, None] * h[:, None, :])

    def combine(p: RankOneParams, c: RankOneCoefficients) -> tuple[Array, Array]:
        w = c.linear[:, 0, None, None] * p.kernel.T[None]
        w = w + jnp.einsum("bkj,kn,jm->bnm", c.quadratic, p.u, p.v)
        b = jnp.zeros(w.shape[:2], w.dtype) if p.bias is None else c.linear @ p.bias
        return w, b

    def apply_coefficients(p: RankOneParams, x: Array, c: RankOneCoefficients) -> Array:
        y = c.linear[:, :1] * (x @ p.kernel)
        y = y + jnp.einsum("bkj,bj->bk", c.quadratic, x @ p.v.T) @ p.u
        return y if p.bias is None else y + c.linear @ p.bias

    return WeightGenerator(
        "rank1", in_features, out_features, context_features,
        init=lambda key: init_rank1(key, in_features, out_features, context_features, rank,
                                    use_bias=use_bias, dynamic_scale=dynamic_scale, dtype=dtype),
        coefficients=coefficients, combine=combine, apply_coefficients=apply_coefficients,
    )


# ---------------------------------------------------------------------------------------------


def make_generator(name: str, in_features: int, out_features: int, context_features: int, *,
                   rank: int = 4, heads: int = 1, num_kernels: int = 4,
                   activation: str | Activation = "relu", use_bias: bool = True,
                   dynamic_scale: float = DEFAULT_DYNAMIC_SCALE, dtype: Any = jnp.float32,
                   matmul: Callable[[Array, Array], Array] | None = None) -> WeightGenerator:
    """Builds a family by name (one of :data:`GENERATORS`).

    ``"lowrank"`` with ``heads > 1`` is the multi-head low-rank family; ``heads`` is rejected for
    the other families, ``rank`` is ignored by ``hyperdense`` and ``mixture``. ``matmul`` (the
    product of :func:`lowrank`) is for single-head ``lowrank`` only, rejected elsewhere.
    """
    if name not in GENERATORS:
        raise ConfigError(f"unknown DPO generator {name!r}; expected one of {list(GENERATORS)}")
    for what, value in (("rank", rank), ("heads", heads), ("num_kernels", num_kernels)):
        if value < 1:
            raise ConfigError(f"DPO generator {name!r}: {what} must be >= 1, got {value}")
    if heads > 1 and name not in ("lowrank", "multihead"):
        raise ConfigError(f"DPO generator {name!r} has no heads (got heads={heads}); "
                          "heads apply to 'lowrank'/'multihead' only")
    if matmul is not None and (name != "lowrank" or heads > 1):
        raise ConfigError(f"DPO generator {name!r} (heads={heads}) has float32 products only; "
                          "a matmul_dtype other than float32 needs generator lowrank with one head")
    common = dict(use_bias=use_bias, dynamic_scale=dynamic_scale, dtype=dtype)
    dims = (in_features, out_features, context_features)
    if name == "multihead" or (name == "lowrank" and heads > 1):
        return multihead(*dims, rank, heads, activation=activation, **common)
    if name == "lowrank":
        return lowrank(*dims, rank, activation=activation, matmul=matmul or jnp.matmul, **common)
    if name == "hyperdense":
        return hyperdense(*dims, **common)
    if name == "mixture":
        return mixture(*dims, num_kernels, **common)
    if name == "diagonal":
        return diagonal(*dims, rank, activation=activation, **common)
    return rank1(*dims, rank, activation=activation, **common)
