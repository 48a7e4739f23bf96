"""Field embeddings: every input field becomes one d-dimensional vector.

One concatenated table holds the rows of all categorical (and bucketised numeric) fields, so the
categorical part is embedded with a single gather (the field offsets are already in the ids, see
``dpn_jax.data.schema``). Dense numeric fields scale a learned per-field vector by their value
(as in AutoInt/FuxiCTR). Sequence fields are mean-pooled over their valid steps when a model
wants one vector per field; sequence models read ``embed_sequences`` instead.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dpn_jax.data.schema import Schema

Batch = dict

# A batch may carry ``rows/<key>`` next to an id array ``<key>``: the ids' positions in a table
# holding only the rows the batch uses (``optimizer=lazy_adam``, dpn_jax.train.lazy_adam).
# Lookups then read those rows; masks still compare the original ids with the pad id.
ROWS_PREFIX = "rows/"


def embedded_field_names(schema: Schema) -> tuple[str, ...]:
    """Field order of the ``[B, F, d]`` tensor that ``FieldEmbedding`` returns."""
    cat = sorted(schema.cat_fields, key=lambda f: f.column)
    num = sorted(schema.numeric_fields, key=lambda f: f.column)
    return tuple(f.name for f in (*cat, *num, *schema.seq_fields))


class FieldEmbedding(nn.Module):
    """``batch -> [B, F, dim]`` in the order of ``embedded_field_names``.

    ``init_std`` 1e-4 follows FuxiCTR/BARS (normal init); LR and the FM linear term use
    ``dim=1`` with ``init_std=0`` (zero init is the exact optimum start of a convex model).
    """

    schema: Schema
    dim: int = 10
    init_std: float = 1e-4

    def _init(self):
        if self.init_std == 0:
            return nn.initializers.zeros
        return nn.initializers.normal(self.init_std)

    def setup(self):
        self.table = self.param("table", self._init(), (self.schema.table_size, self.dim))
        n_num = len(self.schema.numeric_fields)
        if n_num:
            self.numeric = self.param("numeric", self._init(), (n_num, self.dim))

    def embed_ids(self, ids: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.table, ids, axis=0)

    def _embed_key(self, batch: Batch, key: str) -> jnp.ndarray:
        return self.embed_ids(batch.get(ROWS_PREFIX + key, batch[key]))

    def embed_sequences(self, batch: Batch) -> dict[str, tuple[jnp.ndarray, jnp.ndarray]]:
        """``{name: (emb [B, L, dim], mask [B, L] bool)}`` for every sequence field."""
        out = {}
        for f in self.schema.seq_fields:
            ids = batch[f"seq/{f.name}"]
            out[f.name] = (self._embed_key(batch, f"seq/{f.name}"), ids != f.pad_id)
        return out

    def __call__(self, batch: Batch) -> jnp.ndarray:
        parts = []
        if self.schema.cat_fields:
            parts.append(self._embed_key(batch, "cat"))
        if self.schema.numeric_fields:
            parts.append(batch["num"][..., None].astype(self.table.dtype) * self.numeric)
        for emb, mask in self.embed_sequences(batch).values():
            m = mask[..., None].astype(emb.dtype)
            # Mean over valid steps; an empty history embeds to zeros rather than NaN.
            parts.append((jnp.sum(emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0))[:, None])
        return jnp.concatenate(parts, axis=1)
