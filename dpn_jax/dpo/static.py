"""The static part of a DPO: its parameters with the generated (context-dependent) part zeroed.

Every DPO computes ``y = W(z) x + b(z)`` with weights that split into a part that does not depend
on the context and a generated part that does.  :func:`static_part` returns parameters of the SAME
family and shapes whose weights are the static part for every input, so the DPO applied with them
is an ordinary (static) layer -- the knock-out of the dynamic part:

* ``lowrank`` / ``hyperdense`` (coefficients ``[1, h(z)]`` / ``[1, z]``): kernels and bias rows
  ``1:`` set to zero, leaving ``W = ḃ``, ``b = b̃`` (coefficient 0 is the constant 1);
* ``multihead``: the same per head (a block-diagonal ``ḃ``);
* ``diagonal`` / ``rank1``: ``D`` / ``U, V`` zero and bias rows ``1:`` zero, leaving ``ḃ``, ``b̃``;
* ``mixture`` (``W = Σ_k s_k(z) W_k`` with ``Σ_k s_k = 1``): every ``W_k`` (``b_k``) replaced by
  their mean ``W̄`` (``b̄``), so ``W = W̄`` whatever the gate; the generated part is
  ``Σ_k s_k (W_k − W̄)``, zero for a uniform gate;
* the dynamic convolution (kernel logits ``s_i = u_i P_l ∘ g P_g + β``): ``P_l = P_g = 0``, leaving
  the fixed kernel ``softmax(β)`` over the valid slots of each window.

Field aggregations mix coefficients linearly (``aggregate.py``), so the knocked-out field DPO is
static too: ``Σ_j g(z_j) x_i`` becomes ``F (ḃ x_i + b̃)`` (``F − 1`` without self), the attentive
and the other aggregations ``ḃ x_i + b̃`` (attention weights sum to 1).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from dpn_jax.dpo.generate import (
    DiagonalParams,
    HyperDenseParams,
    LowRankParams,
    MixtureParams,
    MultiHeadParams,
    RankOneParams,
)
from dpn_jax.dpo.sequence import DynamicConvParams
from dpn_jax.errors import ConfigError

PARAMS_TYPES: dict[str, type] = {
    "lowrank": LowRankParams,
    "hyperdense": HyperDenseParams,
    "multihead": MultiHeadParams,
    "mixture": MixtureParams,
    "diagonal": DiagonalParams,
    "rank1": RankOneParams,
    "dynamic_conv": DynamicConvParams,
}


def generator_family(generator: str, heads: int = 1) -> str:
    """The family ``make_generator(generator, heads=heads)`` builds (lowrank with heads > 1 is
    the multi-head family)."""
    if generator not in PARAMS_TYPES or generator == "dynamic_conv":
        raise ConfigError(f"unknown DPO generator {generator!r}; expected one of "
                          f"{[g for g in PARAMS_TYPES if g != 'dynamic_conv']}")
    return "multihead" if generator == "lowrank" and heads > 1 else generator


def _zero_from_one(a: Any, axis: int) -> Any:
    """``a`` with its slices ``1:`` along ``axis`` (the generated coefficients) set to zero."""
    if a is None:
        return None
    index = [slice(None)] * a.ndim
    index[axis] = slice(1, None)
    return jnp.asarray(a).at[tuple(index)].set(0)


def static_part(params: Any) -> Any:
    """``params`` (a generator's or the dynamic convolution's NamedTuple) with the generated part
    zeroed (module doc): the DPO then computes its static part for every input."""
    if isinstance(params, (LowRankParams, HyperDenseParams)):
        return params._replace(kernel=_zero_from_one(params.kernel, 1),
                               bias=_zero_from_one(params.bias, 0))
    if isinstance(params, MultiHeadParams):
        return params._replace(kernel=_zero_from_one(params.kernel, 2),
                               bias=_zero_from_one(params.bias, 1))
    if isinstance(params, DiagonalParams):
        return params._replace(diag=jnp.zeros_like(params.diag),
                               bias=_zero_from_one(params.bias, 0))
    if isinstance(params, RankOneParams):
        return params._replace(u=jnp.zeros_like(params.u), v=jnp.zeros_like(params.v),
                               bias=_zero_from_one(params.bias, 0))
    if isinstance(params, MixtureParams):
        kernel = jnp.broadcast_to(jnp.mean(params.kernel, axis=1, keepdims=True),
                                  params.kernel.shape)
        bias = None if params.bias is None else jnp.broadcast_to(
            jnp.mean(params.bias, axis=0, keepdims=True), params.bias.shape)
        return params._replace(kernel=kernel, bias=bias)
    if isinstance(params, DynamicConvParams):
        return params._replace(local_proj=jnp.zeros_like(params.local_proj),
                               global_proj=jnp.zeros_like(params.global_proj))
    raise ConfigError(f"static_part: {type(params).__name__} is not the parameters of a DPO "
                      f"family; expected one of {[t.__name__ for t in PARAMS_TYPES.values()]}")
