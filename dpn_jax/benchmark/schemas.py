"""Made-up schemas for benchmarking, and random encoded rows of any schema.

Throughput and latency depend on shapes (fields, vocabulary sizes, history lengths), not on
what a model learns, so the benchmark builds its models on these instead of a real dataset:

- :func:`criteo_like_schema`: 39 categorical fields sharing a 1,000,000-row vocabulary (Criteo's
  shape: 13 numeric fields bucketised plus 26 categorical ones, without its licence);
- :func:`frappe_like_schema`: Frappe's 10 fields and 5,382 feature values;
- :func:`behaviour_like_schema`: Amazon-Grocery-like (user, target item and category, their
  histories of 50) for the behaviour models.
"""

from __future__ import annotations

import numpy as np

from dpn_jax.data.schema import FIRST, FieldInfo, Schema
from dpn_jax.models import model_options
from dpn_jax.serving.predictor import model_inputs

CRITEO_FIELDS = 39
CRITEO_VOCAB = 1_000_000
FRAPPE_VOCAB = (957, 4082, 7, 7, 2, 3, 2, 9, 80, 233)  # values per field (+ pad and OOV rows)
BEHAVIOUR_VOCAB = {"user": 14_681, "item": 8_714, "cate": 1_000}
BEHAVIOUR_MAX_LEN = 50


def _categorical(vocab: dict[str, int]) -> tuple[list[FieldInfo], int]:
    """One categorical field per ``name: values`` (+ pad and OOV rows), blocks laid end to end."""
    fields, offset = [], 0
    for i, (name, v) in enumerate(vocab.items()):
        fields.append(FieldInfo(name, "cat", column=i, offset=offset, vocab_size=v + FIRST))
        offset += v + FIRST
    return fields, offset


def criteo_like_schema(fields: int = CRITEO_FIELDS, vocab: int = CRITEO_VOCAB) -> Schema:
    """``fields`` categorical fields sharing ``vocab`` values (the last takes the remainder)."""
    per = vocab // fields
    sizes = [per] * (fields - 1) + [vocab - per * (fields - 1)]
    infos, offset = _categorical({f"C{i + 1}": v for i, v in enumerate(sizes)})
    return Schema(fields=tuple(infos), table_size=offset)


def frappe_like_schema() -> Schema:
    infos, offset = _categorical({f"f{i}": v for i, v in enumerate(FRAPPE_VOCAB)})
    return Schema(fields=tuple(infos), table_size=offset)


def behaviour_like_schema() -> Schema:
    fields, offset = _categorical(BEHAVIOUR_VOCAB)
    for target in ("item", "cate"):
        t = next(f for f in fields if f.name == target)
        fields.append(FieldInfo(f"hist_{target}", "seq", offset=t.offset, vocab_size=t.vocab_size,
                                max_len=BEHAVIOUR_MAX_LEN, share_vocab=target))
    return Schema(fields=tuple(fields), table_size=offset)


def is_behaviour_model(name: str) -> bool:
    """Models that pool behaviour histories (they all have the ``attention_groups`` option)."""
    return "attention_groups" in model_options(name)


def schema_for(name: str) -> Schema:
    """The made-up schema a model is benchmarked on: behaviour-like or Frappe-like."""
    return behaviour_like_schema() if is_behaviour_model(name) else frappe_like_schema()


def random_batch(schema: Schema, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` encoded rows of ``schema`` (no label): uniform in-vocabulary ids, standard normal
    numeric values, right-padded histories of random lengths 1..max_len."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype, width in model_inputs(schema):
        if name == "cat":
            cols = sorted(schema.cat_fields, key=lambda f: f.column)
            out[name] = np.stack([f.offset + rng.integers(2, f.vocab_size, rows) for f in cols], 1).astype(dtype) \
                if cols else np.zeros((rows, 0), dtype)
        elif name == "num":
            out[name] = rng.standard_normal((rows, width)).astype(dtype)
        else:
            f = schema.field(name[4:])
            ids = f.offset + rng.integers(2, f.vocab_size, (rows, width))
            keep = np.arange(width)[None] < rng.integers(1, width + 1, (rows, 1))
            out[name] = np.where(keep, ids, f.pad_id).astype(dtype)
    return out
