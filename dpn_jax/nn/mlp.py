"""The DNN tower of the AFN/BARS protocol: Dense -> BatchNorm -> activation -> dropout."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.nn.dropout import Dropout16, dropout_active
from dpn_jax.nn.precision import dense_dot_general

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid,
               "silu": nn.silu, "linear": lambda x: x}


def activation(name: str):
    from dpn_jax.errors import ConfigError

    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Hidden layers only (no output unit); ``bn_momentum`` uses Flax's convention
    (running = momentum * running + (1 - momentum) * batch), so 0.9 equals PyTorch's 0.1."""

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

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        f = activation(self.act)
        dot_general = dense_dot_general(self.matmul_dtype)
        for width in self.hidden:
            x = nn.Dense(width, use_bias=not self.batch_norm, dot_general=dot_general,
                         kernel_init=getattr(nn.initializers, self.kernel_init)())(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(x)
            x = f(x)
            if dropout_active(self.dropout):
                x = Dropout16(self.dropout)(x, deterministic=not train)
        return x
