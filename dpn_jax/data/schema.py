"""The encoded-dataset contract shared by readers, models and training.

Every field owns a contiguous block of rows in ONE concatenated embedding table, so a model
embeds all categorical inputs with a single gather. Inside a block the local layout is::

    local 0 = padding (sequence steps past the history; masked out by models)
    local 1 = out-of-vocabulary (unseen at train time, or rarer than ``min_count``)
    local 2.. = the vocabulary, most frequent first (ties broken by the token's string)

and the global id stored in the arrays is ``offset + local``. A ``sequence`` field with
``share_vocab: other`` uses the block of ``other`` (same offset and vocabulary), so a behaviour
and its target item share one embedding row.

Arrays of a split (all with the same leading dimension N)::

    "cat":   int32 [N, n_cat]   global ids of categorical and bucketised numeric fields
    "num":   float32 [N, n_num] standardised dense numeric fields
    "seq/<name>": int32 [N, max_len] global ids, left-truncated to the most recent max_len,
             right-padded with the field's pad id (== its offset)
    "label": float32 [N]        0/1

Models see field embeddings in the order of ``Schema.fields`` (cat, then num, then seq).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal

import numpy as np

FieldType = Literal["categorical", "numeric", "sequence"]
PAD, OOV, FIRST = 0, 1, 2  # local ids inside a field's block


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One encoded input field.

    kind: "cat" (a column of ``cat``), "num" (a column of ``num``) or "seq" (array ``seq/<name>``).
    ``column`` is the index into ``cat``/``num``; ``vocab_size`` counts pad and OOV (0 for num).
    """

    name: str
    kind: Literal["cat", "num", "seq"]
    column: int = 0
    offset: int = 0
    vocab_size: int = 0
    max_len: int = 0
    share_vocab: str | None = None

    @property
    def pad_id(self) -> int:
        return self.offset + PAD

    @property
    def oov_id(self) -> int:
        return self.offset + OOV


@dataclasses.dataclass(frozen=True)
class Schema:
    """Static description of an encoded dataset: what a model needs to build its layers."""

    fields: tuple[FieldInfo, ...]
    table_size: int  # rows of the concatenated embedding table

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def cat_fields(self) -> tuple[FieldInfo, ...]:
        return tuple(f for f in self.fields if f.kind == "cat")

    @property
    def numeric_fields(self) -> tuple[FieldInfo, ...]:
        return tuple(f for f in self.fields if f.kind == "num")

    @property
    def seq_fields(self) -> tuple[FieldInfo, ...]:
        return tuple(f for f in self.fields if f.kind == "seq")

    def field(self, name: str) -> FieldInfo:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"unknown field {name!r}; the dataset's fields are {list(self.field_names)}")

    def to_json(self) -> dict:
        return {"table_size": self.table_size, "fields": [dataclasses.asdict(f) for f in self.fields]}

    @classmethod
    def from_json(cls, d: Mapping) -> Schema:
        return cls(fields=tuple(FieldInfo(**f) for f in d["fields"]), table_size=int(d["table_size"]))


Split = dict[str, np.ndarray]  # "cat", "num", "seq/<name>", "label" -> arrays with leading dim N


def split_len(split: Split) -> int:
    return int(split["label"].shape[0])


@dataclasses.dataclass
class Dataset:
    """An encoded dataset: schema + train/valid/test arrays (+ free-form metadata)."""

    name: str
    schema: Schema
    train: Split
    valid: Split
    test: Split
    meta: dict = dataclasses.field(default_factory=dict)

    def splits(self) -> Iterator[tuple[str, Split]]:
        yield from (("train", self.train), ("valid", self.valid), ("test", self.test))

    def summary(self) -> str:
        sizes = ", ".join(f"{k} {split_len(v):,}" for k, v in self.splits())
        return (
            f"{self.name}: {self.schema.num_fields} fields, {self.schema.table_size:,} embedding rows; {sizes}"
        )


def empty_arrays(n: int, schema: Schema) -> Split:
    """Zero-filled arrays of the right shapes and dtypes (a helper for generators and tests)."""
    out: Split = {
        "cat": np.zeros((n, len(schema.cat_fields)), np.int32),
        "num": np.zeros((n, len(schema.numeric_fields)), np.float32),
        "label": np.zeros((n,), np.float32),
    }
    for f in schema.seq_fields:
        out[f"seq/{f.name}"] = np.full((n, f.max_len), f.pad_id, np.int32)
    return out
