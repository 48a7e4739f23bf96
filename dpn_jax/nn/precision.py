"""Mixed-precision matrix products for Dense layers: bfloat16 operands, float32 accumulation.

Parameters, optimizer state and everything outside the products stay float32; only the three
matrix products of a Dense layer (forward ``x W``, input gradient ``g Wᵀ``, weight gradient
``xᵀ g``) read bfloat16 copies of their operands and accumulate in float32 (a custom VJP, so the
backward products are bfloat16 too, as PyTorch's autocast does).

Why the weight gradient reads a row-major ``xᵀ`` on the CPU (``with_layout_constraint``): XLA
folds a transpose into the dot's dimension numbers, and XLA:CPU's YNNPACK dots then take a slow
path on the batch-contracting product (``experiments/step_anatomy.py``). Other platforms get the
plain transpose (:func:`row_major_transpose`). The bfloat16 products are fast
where the hardware has them: GPUs, TPUs, and CPUs with AMX when XLA's YNNPACK dots are on
(``DPN_JAX_XLA_DEFAULTS=0``; dpn_jax/xla_flags.py turns them off for float32 by default).
XLA:CPU does not use AMX tiles; ``matmul_dtype="bfloat16_mkl"`` has MKL compute the same
products on the CPU (:mod:`dpn_jax.nn.mkl_matmul`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

from dpn_jax.errors import ConfigError
from dpn_jax.nn import mkl_matmul

MATMUL_DTYPES = ("float32", "bfloat16", "bfloat16_mkl")


def _row_major(xt: jax.Array) -> jax.Array:
    return with_layout_constraint(xt, Layout(major_to_minor=(0, 1)))


def row_major_transpose(x: jax.Array) -> jax.Array:
    """``xᵀ`` of a 2-D array; on the CPU stored row-major (not folded into the consuming dot).

    The constraint is a CPU remedy and its ``LayoutConstraint`` custom call cannot be exported:
    ``platform_dependent`` keeps it in programs lowered for the CPU only, so a train step lowered
    for a GPU or TPU holds the plain transpose (same values) and lowers there."""
    return jax.lax.platform_dependent(jnp.asarray(x).T, cpu=_row_major, default=lambda xt: xt)


def bf16_matmul_with(dot: Callable[..., jax.Array]) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``x [n,m] @ w [m,k]`` with bfloat16 operands and a float32 result, the backward products
    likewise (gradients returned in the inputs' dtypes): a custom VJP whose three products are
    ``dot(a, b, trans_a, trans_b) = op(a) @ op(b)`` on bfloat16 ``a``, ``b`` (XLA's below, MKL's
    in :mod:`dpn_jax.nn.mkl_matmul`)."""

    @jax.custom_vjp
    def matmul(x, w):
        return dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), False, False)

    def fwd(x, w):
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        # empty arrays carry the inputs' dtypes (residuals must be arrays)
        return dot(xb, wb, False, False), (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))

    def bwd(res, g):
        xb, wb, x_like, w_like = res
        gb = g.astype(jnp.bfloat16)
        dx = dot(gb, wb, False, True)
        dw = dot(xb, gb, True, False)
        return dx.astype(x_like.dtype), dw.astype(w_like.dtype)

    matmul.defvjp(fwd, bwd)
    return matmul


def _xla_bf16_dot(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    """XLA's product; a transposed ``a`` (the weight gradient's ``xᵀ``) is made row-major."""
    return jnp.dot(row_major_transpose(a) if trans_a else a, b.T if trans_b else b,
                   preferred_element_type=jnp.float32)


bf16_matmul = bf16_matmul_with(_xla_bf16_dot)
# The same by MKL on the CPU; the transposes of the backward products are MKL's flags, so no xᵀ
# or Wᵀ is materialised.
mkl_bf16_matmul = bf16_matmul_with(mkl_matmul.mkl_dot)


def _dense_bf16_dot_general(lhs, rhs, dimension_numbers, precision=None,
                            preferred_element_type=None, matmul=bf16_matmul):
    """flax ``Dense``'s ``dot_general`` (``x [..., m]`` contracted with ``kernel [m, k]``)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2:
        raise ValueError(f"bfloat16 matmul: expected a Dense product x[..., m] @ kernel[m, k], "
                         f"got dimension numbers {dimension_numbers} for {lhs.shape} @ {rhs.shape}")
    out = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


def matmul_for(matmul_dtype: str) -> Callable | None:
    """``(x [n,m], w [m,k]) -> [n,k]`` float32 for ``matmul_dtype`` (None: plain float32).

    ``"bfloat16_mkl"``: the bfloat16 products computed by MKL (:mod:`dpn_jax.nn.mkl_matmul`),
    checked here so a missing library or compiler fails before any tracing."""
    if matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(f"matmul_dtype={matmul_dtype!r}; expected one of {list(MATMUL_DTYPES)}")
    if matmul_dtype == "bfloat16_mkl":
        reason = mkl_matmul.unavailable_reason()
        if reason:
            raise ConfigError(reason)
        return mkl_bf16_matmul
    return bf16_matmul if matmul_dtype == "bfloat16" else None


def dense_dot_general(matmul_dtype: str) -> Callable | None:
    """The ``dot_general`` to give a flax ``Dense`` for ``matmul_dtype`` (None: flax's own)."""
    matmul = matmul_for(matmul_dtype)
    return None if matmul is None else functools.partial(_dense_bf16_dot_general, matmul=matmul)
