"""The hidden-layer tower of every model: linear map -> [BatchNorm] -> activation -> [dropout].

``MLP`` is the AFN/BARS protocol tower (Dense layers). A tower whose linear maps are something else
subclasses it and overrides :meth:`MLP.linear` (the feature DPN's :class:`DPNTower`, APG's tower):
one layer loop for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.nn.activations import activation_layer, check_activation
from dpn_jax.nn.dropout import Dropout16, dropout_active
from dpn_jax.nn.precision import dense_dot_general


class MLP(nn.Module):
    """Hidden layers only (no output unit); ``bn_momentum`` uses Flax's convention
    (running = momentum * running + (1 - momentum) * batch), so 0.9 equals PyTorch's 0.1.
    ``act``: any name :func:`~dpn_jax.nn.activations.activation_layer` knows (dice, prelu too)."""

    hidden: Sequence[int] = (400, 400, 400)
    batch_norm: bool = True
    dropout: float = 0.0
    act: str = "relu"
    bn_momentum: float = 0.9
    # Glorot-normal kernels, zero biases: FuxiCTR/BARS's init (BaseModel.init_weights).
    kernel_init: str = "glorot_normal"
    # "bfloat16": the Dense products read bfloat16 operands, accumulate in float32 (nn/precision.py);
    # "bfloat16_mkl": the same products by MKL on the CPU (nn/mkl_matmul.py)
    matmul_dtype: str = "float32"
    # Submodule names: Flax's own (Dense_<i>, BatchNorm_<i>) or dense_<i>, bn_<i>, act_<i>: each
    # model keeps the parameter paths its saved bundles and checkpoints have.
    layer_names: bool = False

    def layer_name(self, kind: str, i: int) -> str | None:
        return f"{kind}_{i}" if self.layer_names else None

    def linear(self, i: int, width: int, x: jnp.ndarray, context: Any) -> jnp.ndarray:
        """Layer ``i``'s linear map of ``x`` (``context``: what :meth:`__call__` was given)."""
        return nn.Dense(width, use_bias=not self.batch_norm,
                        dot_general=dense_dot_general(self.matmul_dtype),
                        kernel_init=getattr(nn.initializers, self.kernel_init)(),
                        name=self.layer_name("dense", i))(x)

    def layers(self, x: jnp.ndarray, train: bool, context: Any = None) -> jnp.ndarray:
        # bad options fail here even when there is no layer to build
        check_activation(self.act)
        dense_dot_general(self.matmul_dtype)
        for i, width in enumerate(self.hidden):
            x = self.linear(i, width, x, context)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                 name=self.layer_name("bn", i))(x)
            x = activation_layer(self.act, self.bn_momentum, self.layer_name("act", i))(x, train)
            if dropout_active(self.dropout):
                x = Dropout16(self.dropout)(x, deterministic=not train)
        return x

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        return self.layers(x, train)
