"""AFN's logarithmic transformation layer (Cheng et al., AAAI 2020, Eqns. 3-6).

A logarithmic neuron turns a product of powers of the field embeddings into a weighted sum of
logs, so the order of each feature in a cross feature is a learned coefficient::

    y_j = exp( sum_i w_ij ln|e_i| ) = prod_i |e_i| ** w_ij          (Eqns. 3-4, element-wise in d)

Logs need positive inputs: embeddings are made positive by ``max(|e|, eps)`` before the log
(``eps`` = 1e-5 as in FuxiCTR/BARS, who found it better than the paper's 1e-7; the official
TensorFlow code clips at 1e-4). Entries below ``eps`` get a zero (not NaN/inf) gradient.
BatchNorm follows the log and the exp (the official AFN code and FuxiCTR): per field / per
neuron, with statistics over the batch and the embedding dimension.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_EPS = 1e-5


def safe_log_abs(e: Array, eps: float = DEFAULT_EPS) -> Array:
    """``ln(max(|e|, eps))``: finite for every input, zero gradient where ``|e| < eps``."""
    return jnp.log(jnp.maximum(jnp.abs(e), eps))


def logarithmic_neurons(log_e: Array, w: Array) -> Array:
    """Eqn. 4 on log inputs: ``log_e [B, F, d], w [F, N] -> exp(sum_i w_ij log_e_i) [B, N, d]``."""
    return jnp.exp(jnp.einsum("bfd,fn->bnd", log_e, w))


class LogarithmicTransform(nn.Module):
    """``e [B, F, d] -> [B, N, d]``: log (+BN) -> ``N`` logarithmic neurons -> exp (+BN).

    With ``batch_norm=False`` the layer is exactly ``exp(W^T ln max(|e|, eps))``. The weights
    ``w [F, N]`` start as ``normal(0.1)`` (the official AFN code); there is no bias (Eqn. 4).
    """

    num_neurons: int = 600
    eps: float = DEFAULT_EPS
    batch_norm: bool = True
    bn_momentum: float = 0.9
    init_std: float = 0.1

    @nn.compact
    def __call__(self, e: Array, train: bool = False) -> Array:
        z = safe_log_abs(e, self.eps)
        if self.batch_norm:
            z = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, axis=1,
                             name="log_bn")(z)
        w = self.param("weights", nn.initializers.normal(self.init_std), (e.shape[1], self.num_neurons))
        y = logarithmic_neurons(z, w)
        if self.batch_norm:
            y = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, axis=1,
                             name="exp_bn")(y)
        return y
