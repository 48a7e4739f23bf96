"""Feature-aggregate functions ``f(x; W, b)`` and the field-based DPO (paper §2.3; docs/dpo_math.md, §'Feature-based DPO' and §'Field-based DPO').

* :func:`matrix_product` -- instance-wise ``y = W x + b`` (feature-based DPO, "DyMLP").
* :func:`fieldwise_product` -- per-field kernels ``y_i = W_i x_i + b_i`` on ``X ∈ R^{B×F×d}``.
* field aggregations of a generator ``g`` over field contexts ``Z ∈ R^{B×F×c}``:

  - ``"sum"``:       ``y_i = Σ_j g(z_j) x_i``  (``exclude_self``: ``Σ_{j≠i}``, the FM relation)
  - ``"self"``:      ``y_i = g(z_i) x_i``
  - ``"attentive"``: ``y_i = Σ_j a_ij g(z_j) x_i``
  - ``"concat"``:    ``y_i = g([z_1, …, z_F]) x_i``

  where ``g(z) x`` means ``W(z) x + b(z)`` (so the sum also sums the generated biases).

Every generator in ``generate.py`` is linear in its coefficient pytree ``κ(z)``; hence
``Σ_j a_ij g(z_j) x_i = g_κ(Σ_j a_ij κ(z_j)) x_i``.  The aggregations mix *coefficients* (a few numbers
per field) and then run the generator's fused product once per field: no ``[B,F,F,n,d]`` or
``[B,F,n,d]`` kernel is built unless the generator itself materialises (HyperDense).
:func:`field_kernels` gives the materialised per-field kernels for checks and inspection.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from dpn_jax.dpo.generate import WeightGenerator, draw, jit_init, lecun_std
from dpn_jax.errors import ConfigError

Array = jax.Array

FIELD_AGGREGATIONS = ("self", "sum", "attentive", "concat")


def matrix_product(w: Array, x: Array, b: Array | None = None) -> Array:
    """Instance-wise ``y = W x + b``: ``W [B,n,m], x [B,m], b [B,n] -> [B,n]`` (docs/dpo_math.md, §'Feature-based DPO')."""
    chex.assert_rank([w, x], [3, 2])
    chex.assert_equal_shape_prefix([w, x], 1)
    chex.assert_axis_dimension(w, 2, x.shape[1])
    y = jnp.einsum("bnm,bm->bn", w, x)
    if b is not None:
        chex.assert_shape(b, y.shape)
        y = y + b
    return y


def fieldwise_product(w: Array, x: Array, b: Array | None = None) -> Array:
    """Per-field kernels ``y_i = W_i x_i + b_i``: ``W [B,F,n,d], x [B,F,d], b [B,F,n] -> [B,F,n]``
    (docs/dpo_math.md, §'Field-based DPO': instance- and field-specific filters)."""
    chex.assert_rank([w, x], [4, 3])
    chex.assert_equal_shape_prefix([w, x], 2)
    chex.assert_axis_dimension(w, 3, x.shape[2])
    y = jnp.einsum("bfnd,bfd->bfn", w, x)
    if b is not None:
        chex.assert_shape(b, y.shape)
        y = y + b
    return y


class BilinearAttentionParams(NamedTuple):
    kernel: Array  # A [d_x, d_z]


@jit_init
def init_bilinear_attention(key: chex.PRNGKey, x_features: int, z_features: int,
                            dtype: Any = jnp.float32) -> BilinearAttentionParams:
    """LeCun ``A``: with unit-variance fields the scores ``x_iᵀ A z_j`` start with ~unit variance."""
    return BilinearAttentionParams(
        draw(key, [((x_features, z_features), lecun_std(x_features))], dtype)[0])


def bilinear_attention(params: BilinearAttentionParams, x: Array, z: Array, *,
                       exclude_self: bool = False) -> Array:
    """``a_ij = softmax_j(x_iᵀ A z_j / sqrt(d_z))``: ``x [B,F,d_x], z [B,F,d_z] -> a [B,F,F]``.

    The paper only says "a from an attention layer" (docs/dpo_math.md, §'Field-based DPO'); a bilinear form is the simplest one
    with parameters.  ``exclude_self`` masks ``j = i`` (needs ``F > 1``).
    """
    chex.assert_rank([x, z], 3)
    chex.assert_equal_shape_prefix([x, z], 2)
    chex.assert_shape(params.kernel, (x.shape[2], z.shape[2]))
    scores = jnp.einsum("bid,de,bje->bij", x, params.kernel, z) / jnp.sqrt(z.shape[2])
    if exclude_self:
        scores = jnp.where(jnp.eye(x.shape[1], dtype=bool), -jnp.inf, scores)
    return jax.nn.softmax(scores, axis=-1)


def _flatten_fields(tree: Any, batch: int, fields: int) -> Any:
    return jax.tree.map(lambda a: a.reshape((batch * fields,) + a.shape[2:]), tree)


def field_coefficients(aggregation: str, gen: WeightGenerator, params: Any, z: Array, *,
                       scores: Array | None = None, exclude_self: bool = False) -> Any:
    """Per-field generator coefficients ``κ_i [B,F,...]`` of an aggregation (see module doc).

    ``z [B,F,c]``; for ``"concat"`` ``gen.context_features`` must be ``F·c``.  ``scores [B,F,F]``
    (``a_ij``) are required for ``"attentive"``.
    """
    if aggregation not in FIELD_AGGREGATIONS:
        raise ConfigError(f"unknown field aggregation {aggregation!r}; expected one of "
                          f"{list(FIELD_AGGREGATIONS)}")
    chex.assert_rank(z, 3)
    bsz, fields, c = z.shape
    if aggregation == "concat":
        chex.assert_equal(gen.context_features, fields * c)
        coef = gen.coefficients(params, z.reshape(bsz, fields * c))
        # the same generated kernel for every field: broadcast the coefficients
        return jax.tree.map(lambda a: jnp.broadcast_to(a[:, None], (bsz, fields) + a.shape[1:]),
                            coef)
    chex.assert_equal(gen.context_features, c)
    coef = jax.tree.map(lambda a: a.reshape((bsz, fields) + a.shape[1:]),
                        gen.coefficients(params, z.reshape(bsz * fields, c)))
    if aggregation == "self":
        return coef
    if aggregation == "sum":
        # Σ_j κ_j (minus κ_i when self-excluded): O(F), not an F×F mix
        def total(a: Array) -> Array:
            s = jnp.sum(a, axis=1, keepdims=True)
            return s - a if exclude_self else jnp.broadcast_to(s, a.shape)

        return jax.tree.map(total, coef)
    if scores is None:
        raise ConfigError("field aggregation 'attentive' needs attention scores a_ij [B,F,F]")
    chex.assert_shape(scores, (bsz, fields, fields))
    return jax.tree.map(lambda a: jnp.einsum("bij,bj...->bi...", scores, a), coef)


def field_apply(aggregation: str, gen: WeightGenerator, params: Any, x: Array,
                z: Array | None = None, *, scores: Array | None = None,
                exclude_self: bool = False) -> Array:
    """Field-based DPO, fused: ``x [B,F,d], z [B,F,c] (default x) -> y [B,F,n]`` (docs/dpo_math.md, §'Field-based DPO')."""
    z = x if z is None else z
    chex.assert_rank([x, z], 3)
    chex.assert_equal_shape_prefix([x, z], 2)
    chex.assert_axis_dimension(x, 2, gen.in_features)
    bsz, fields, d = x.shape
    coef = field_coefficients(aggregation, gen, params, z, scores=scores,
                              exclude_self=exclude_self)
    y = gen.apply_coefficients(params, x.reshape(bsz * fields, d),
                               _flatten_fields(coef, bsz, fields))
    return y.reshape(bsz, fields, gen.out_features)


def field_kernels(aggregation: str, gen: WeightGenerator, params: Any, z: Array, *,
                  scores: Array | None = None, exclude_self: bool = False
                  ) -> tuple[Array, Array]:
    """Materialised per-field kernels ``(W [B,F,n,d], b [B,F,n])`` of an aggregation, so that
    ``fieldwise_product(W, x, b) == field_apply(...)``."""
    bsz, fields = z.shape[:2]
    coef = field_coefficients(aggregation, gen, params, z, scores=scores,
                              exclude_self=exclude_self)
    w, b = gen.combine(params, _flatten_fields(coef, bsz, fields))
    return (w.reshape(bsz, fields, gen.out_features, gen.in_features),
            b.reshape(bsz, fields, gen.out_features))


def field_self(gen: WeightGenerator, params: Any, x: Array, z: Array | None = None) -> Array:
    """Self-field DPO ``y_i = g(z_i) x_i``."""
    return field_apply("self", gen, params, x, z)


def field_sum(gen: WeightGenerator, params: Any, x: Array, z: Array | None = None, *,
              exclude_self: bool = False) -> Array:
    """Summation DPO ``y_i = Σ_j g(z_j) x_i`` (``Σ_{j≠i}`` with ``exclude_self``)."""
    return field_apply("sum", gen, params, x, z, exclude_self=exclude_self)


def field_attentive(gen: WeightGenerator, params: Any, x: Array, z: Array | None,
                    scores: Array) -> Array:
    """Attentive DPO ``y_i = Σ_j a_ij g(z_j) x_i`` with given ``a [B,F,F]``
    (see :func:`bilinear_attention`)."""
    return field_apply("attentive", gen, params, x, z, scores=scores)


def field_concat(gen: WeightGenerator, params: Any, x: Array, z: Array | None = None) -> Array:
    """Concat DPO ``y_i = g([z_1, …, z_F]) x_i`` (``gen.context_features == F·c``)."""
    return field_apply("concat", gen, params, x, z)
