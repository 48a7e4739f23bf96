"""Flax Linen wrappers of the DPO (paper §2.2-2.3; docs/dpo_math.md, §'Feature-based DPO' and §'Field-based DPO').

The modules only own parameters; every formula lives in the pure functions of :mod:`dpn_jax.dpo`.
Each field of the generator's parameter NamedTuple becomes one Flax param (nested fields are joined
with ``_``), so checkpoints read ``params["kernel"]``, ``params["hidden_kernel"]``, ...
The low-rank ``kernel`` is ``[m, rank+1, n]`` with ``kernel[:, 0, :]`` the static, Dense-layout kernel.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax import dpo
from dpn_jax.errors import ConfigError
from dpn_jax.nn.precision import matmul_for

Array = jax.Array


def _declare(module: nn.Module, init_fn: Callable[[jax.Array], Any]) -> Any:
    """Registers the NamedTuple returned by ``init_fn(key)`` field by field and rebuilds it.

    ``init_fn`` runs once, at init, on the module's ``params`` RNG; when applying only its
    structure is traced (``eval_shape``) to name the stored params.
    """
    if module.is_initializing():
        template = init_fn(module.make_rng("params"))
    else:
        template = jax.eval_shape(init_fn, jax.random.key(0))

    def declare(path: tuple[str, ...], node: Any) -> Any:
        if node is None:
            return None
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(declare(path + (f,), v) for f, v in zip(node._fields, node)))
        # Flax wants one name per param: join nested paths ("hidden_kernel").
        return module.param("_".join(path), lambda _key, value=node: value)

    return declare((), template)


def _is_params_tuple(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, tuple) and hasattr(t, "_fields")


def named_params(params_type: type, flat: Mapping[str, Any]) -> Any:
    """The inverse of :func:`_declare`'s naming: a layer's Flax params (``hidden_kernel``, ...)
    back to the NamedTuple ``params_type`` (a field without a param, an unused bias, is None).
    Extra entries (``context_norm``, ``attention_kernel``) are ignored."""

    def build(t: type, prefix: str) -> Any:
        hints = typing.get_type_hints(t)
        values = []
        for f in t._fields:
            name = prefix + f
            if _is_params_tuple(hints.get(f)):
                values.append(build(hints[f], name + "_"))
            else:
                values.append(flat.get(name))
        return t(*values)

    return build(params_type, "")


def flat_params(named: Any) -> dict[str, Any]:
    """A NamedTuple of parameters as the layer's Flax params (:func:`_declare`'s names); None
    fields are left out."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if node is None:
            return
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            for f, v in zip(node._fields, node):
                walk(f"{prefix}_{f}" if prefix else f, v)
        else:
            out[prefix] = node

    walk("", named)
    return out


def normalise_context(z: Array, enabled: bool, param_dtype: Any = jnp.float32) -> Array:
    """The DPO layers' optional context LayerNorm (param name ``context_norm``), created in the
    calling module's compact ``__call__``; ``z`` unchanged when not ``enabled``."""
    if not enabled:
        return z
    return nn.LayerNorm(name="context_norm", param_dtype=param_dtype)(z)


class FeatureDPO(nn.Module):
    """Feature-based DPO ("DyMLP", docs/dpo_math.md, §'Feature-based DPO'): ``y = W(z) x + b(z)``, ``x [B,m], z [B,c] -> [B,features]``.

    ``generator``: one of ``dpn_jax.dpo.GENERATORS`` (``"lowrank"`` = Eqn. 5, the default;
    ``heads > 1`` makes it multi-head).  A fresh layer behaves like ``nn.Dense(features)``
    (static part LeCun-initialised, dynamic part ``dynamic_scale`` of it).

    ``context_norm``: ``z`` passes a LayerNorm (learned scale and shift) before the generator.
    Default False: on ``dpn`` the normalised context lost test AUC (the raw context grows with the
    embeddings in training; LayerNorm discards each instance's embedding scale), see
    docs/results/feature_models.md, §'Measurements behind the DPN defaults'.  The field DPO needs
    it (``FieldDPO``, ``dpn_field``).
    """

    features: int
    generator: str = "lowrank"
    rank: int = 4
    heads: int = 1
    num_kernels: int = 4
    hidden_activation: str = "relu"
    use_bias: bool = True
    dynamic_scale: float = dpo.DEFAULT_DYNAMIC_SCALE
    context_norm: bool = False
    param_dtype: Any = jnp.float32
    # "bfloat16" / "bfloat16_mkl": the lowrank family's fused product x @ [K_0 | ... | K_r] in
    # bfloat16 with float32 accumulation (dpn_jax/nn/precision.py)
    matmul_dtype: str = "float32"

    def _generator(self, in_features: int, context_features: int) -> dpo.WeightGenerator:
        return dpo.make_generator(
            self.generator, in_features, self.features, context_features, rank=self.rank,
            heads=self.heads, num_kernels=self.num_kernels, activation=self.hidden_activation,
            use_bias=self.use_bias, dynamic_scale=self.dynamic_scale, dtype=self.param_dtype,
            matmul=matmul_for(self.matmul_dtype))

    @nn.compact
    def __call__(self, x: Array, z: Array) -> Array:
        if x.ndim != 2 or z.ndim != 2:
            raise ValueError(f"FeatureDPO expects x [B,m] and z [B,c], got {x.shape}, {z.shape}")
        gen = self._generator(x.shape[-1], z.shape[-1])
        params = _declare(self, gen.init)
        return gen.apply(params, x, normalise_context(z, self.context_norm, self.param_dtype))


class FieldDPO(nn.Module):
    """Field-based DPO (docs/dpo_math.md, §'Field-based DPO'): ``x [B,F,d], z [B,F,c] (default x) -> [B,F,features or d]``.

    ``aggregation``: ``"self"`` ``y_i = g(z_i)x_i``, ``"sum"`` ``Σ_j g(z_j)x_i`` (``exclude_self``
    drops ``j = i``), ``"attentive"`` ``Σ_j a_ij g(z_j)x_i`` (``a`` from ``scores`` if given, else a
    learned bilinear attention ``softmax_j(x_iᵀA z_j/√c)``), ``"concat"`` ``g([z_1..z_F])x_i``.
    The generator is shared by all fields; the kernels differ per field and per instance.
    ``context_norm``: each field's context ``z_i`` passes a LayerNorm before the generator and the
    attention (as in ``FeatureDPO``; default False here, the models choose).
    """

    aggregation: str = "self"
    generator: str = "lowrank"
    rank: int = 4
    features: int | None = None
    heads: int = 1
    num_kernels: int = 4
    hidden_activation: str = "relu"
    use_bias: bool = True
    exclude_self: bool = False
    dynamic_scale: float = dpo.DEFAULT_DYNAMIC_SCALE
    context_norm: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, z: Array | None = None, scores: Array | None = None) -> Array:
        if self.aggregation not in dpo.FIELD_AGGREGATIONS:
            raise ConfigError(f"unknown field aggregation {self.aggregation!r}; expected one of "
                              f"{list(dpo.FIELD_AGGREGATIONS)}")
        z = x if z is None else z
        if x.ndim != 3 or z.ndim != 3 or x.shape[:2] != z.shape[:2]:
            raise ValueError(f"FieldDPO expects x [B,F,d] and z [B,F,c], got {x.shape}, {z.shape}")
        z = normalise_context(z, self.context_norm, self.param_dtype)
        fields, d, c = x.shape[1], x.shape[2], z.shape[2]
        context = fields * c if self.aggregation == "concat" else c
        gen = dpo.make_generator(
            self.generator, d, self.features or d, context, rank=self.rank, heads=self.heads,
            num_kernels=self.num_kernels, activation=self.hidden_activation,
            use_bias=self.use_bias, dynamic_scale=self.dynamic_scale, dtype=self.param_dtype)
        params = _declare(self, gen.init)
        if self.aggregation == "attentive" and scores is None:
            att = self.param("attention_kernel", lambda k: dpo.init_bilinear_attention(
                k, d, c, self.param_dtype).kernel)
            scores = dpo.bilinear_attention(dpo.BilinearAttentionParams(att), x, z,
                                            exclude_self=self.exclude_self)
        return dpo.field_apply(self.aggregation, gen, params, x, z, scores=scores,
                               exclude_self=self.exclude_self)
