"""The DNN baseline of the AFN/BARS protocol."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.models.bases import ProtocolModel
from dpn_jax.models.registry import register
from dpn_jax.nn.embedding import FieldEmbedding


@register("dnn")
class DNN(ProtocolModel):
    """Embedding -> MLP 400-400-400 (BatchNorm, ReLU, dropout) -> logit.

    Defaults follow the AFN paper (AAAI 2020, Sec. 4.1) and BARS: embedding 10, three hidden
    layers of 400 with BatchNorm and ReLU; dropout off (turn it on with ``--set dropout=0.2``).
    ``matmul_dtype=bfloat16``: the tower's products in bfloat16 with float32 accumulation
    (:mod:`dpn_jax.nn.precision`; parameters and Adam stay float32); ``bfloat16_mkl``: the same
    products computed by MKL on the CPU, with AMX where the CPU has it
    (:mod:`dpn_jax.nn.mkl_matmul`)."""

    matmul_dtype: str = "float32"

    @nn.compact
    def __call__(self, batch, train: bool = False) -> jnp.ndarray:
        e = FieldEmbedding(self.schema, dim=self.embedding_dim, name="embedding")(batch)
        h = e.reshape(e.shape[0], -1)
        h = self.tower(matmul_dtype=self.matmul_dtype, name="mlp")(h, train)
        return nn.Dense(1, name="out")(h)[:, 0]
