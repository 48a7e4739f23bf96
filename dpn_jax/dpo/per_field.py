"""Feature DPO with one context per input field: ``y = Σ_f W(z_f) x_f + mean_f b(z_f)``.

The "other fields" context of the feature-based DPN (docs/dpo_math.md, §'Feature-based DPO'): the block of the flattened input
that belongs to field ``f`` is multiplied by a kernel generated from the *other* fields, so no
field generates its own weights. With ``x = [x_1 | ... | x_F]`` (``x_f ∈ R^d``, ``m = F d``) and a
generator that is linear in its coefficients, ``W(z) = Σ_k κ_k(z) K_k``:

    Σ_f W(z_f) x_f = Σ_{f,d,k} κ_k(z_f) x_{fd} K_k[(f,d), :]

i.e. ONE matmul of ``u[b,(f,d),k] = κ_k(z_f) x_{fd}`` (``[B, m·K]``) with the stacked kernels
``[m·K, n]``: the cost of the ordinary fused low-rank path, plus F small coefficient passes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dpn_jax.dpo.generate import WeightGenerator

Array = jax.Array


def leave_one_field_out(e: Array) -> Array:
    """``[B,F,d] -> [B,F,F·d]``: row ``f`` is the flattened embedding with field ``f`` zeroed."""
    b, f, d = e.shape
    keep = 1.0 - jnp.eye(f, dtype=e.dtype)  # [F(ctx), F(field)]
    return (keep[None, :, :, None] * e[:, None, :, :]).reshape(b, f, f * d)


def is_basis_generator(params) -> bool:
    kernel = getattr(params, "kernel", None)
    return kernel is not None and getattr(kernel, "ndim", 0) == 3


def apply_per_field_context(gen: WeightGenerator, params, x_fields: Array, z_fields: Array) -> Array:
    """``x_fields [B,F,d]``, ``z_fields [B,F,c]`` -> ``[B,n]``; ``gen`` built for ``m = F·d``."""
    chex.assert_rank([x_fields, z_fields], 3)
    b, f, d = x_fields.shape
    c = z_fields.shape[-1]
    chex.assert_equal(gen.in_features, f * d)
    chex.assert_equal(gen.context_features, c)
    coef = gen.coefficients(params, z_fields.reshape(b * f, c))
    if (is_basis_generator(params) and isinstance(coef, jax.Array) and coef.ndim == 2
            and coef.shape[1] == params.kernel.shape[1]):
        kernel, bias = params.kernel, params.bias  # [m, K, n], [K, n]
        k = kernel.shape[1]
        coef = coef.reshape(b, f, k)
        u = (x_fields[..., None] * coef[:, :, None, :]).reshape(b, f * d * k)
        y = u @ kernel.reshape(f * d * k, -1)
        return y if bias is None else y + jnp.mean(coef, axis=1) @ bias
    # Any other family: F masked applications (F times the cost, exact).
    eye = jnp.eye(f, dtype=x_fields.dtype)
    x_only = (eye[None, :, :, None] * x_fields[:, None]).reshape(b * f, f * d)
    ys = gen.apply_coefficients(params, x_only, coef).reshape(b, f, -1)
    if getattr(params, "bias", None) is not None:
        # each application added its own bias; keep the mean, as in the basis path
        zero = jnp.zeros_like(x_only)
        bias = gen.apply_coefficients(params, zero, coef).reshape(b, f, -1)
        return jnp.sum(ys - bias, axis=1) + jnp.mean(bias, axis=1)
    return jnp.sum(ys, axis=1)
