"""Every registered model keeps its variable tree: the same paths, shapes and dtypes of
``params`` and ``batch_stats`` that its saved bundles and checkpoints hold.

One fingerprint per model at its default options on a small schema with every kind of field
(categorical, numeric, two behaviour histories). A refactor that moves a layer (a submodule
renamed, a tower nested one level deeper) changes the fingerprint; a new model needs its line.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from dpn_jax.data.schema import FieldInfo, Schema
from dpn_jax.models import available_models, build_model

# sha256 of the tree listing (see tree_listing), first 16 hex digits; recorded at 66caf20
FINGERPRINTS = {
    "afm": "e4c314be4736502b",
    "afn": "84a9ee5d649435f6",
    "afn_plus": "5957427597b7d9c1",
    "apg": "f16fe4cb38041df9",
    "autoint": "448e372cef66b9fd",
    "autoint_plus": "1de2610343fb8f3e",
    "bst": "28c2341bb9b2fc38",
    "bst_dpo": "7f54b1a7082112f2",
    "cin": "3c3422d732629c9f",
    "crossnet": "ba3ca20706904778",
    "dcn": "f18e27e5ae90a97e",
    "dcnv2": "01e4546728e017c0",
    "dien": "f6a7fd176fd88143",
    "dien_dpo": "50b6040e942f00b6",
    "din": "466d76f42ce2c2e4",
    "din_dpo": "b812a6671636c7cf",
    "dnn": "fa724ae655e61272",
    "dpn": "5925e824fa51c60d",
    "dpn_field": "1e33c210038d3505",
    "dpn_field_dnn": "4cd77d13e2f6fce0",
    "dyjoint": "04dea656024cc25a",
    "finalmlp": "020e759c0e64095f",
    "fm": "fe248a23efe343cd",
    "hofm": "d4658d556655f813",
    "ipnn": "cbc7ac94a22cc619",
    "kfatt": "a2eac87da77b9be1",
    "lr": "f8105b4cdf6b7bd9",
    "nfm": "a3b83f92edb67d5f",
    "opnn": "2bdb88ed2c40f607",
    "xdeepfm": "5f4c799da3783bba",
}


def small_schema() -> Schema:
    fields, offset = [], 0
    for i, (name, values) in enumerate({"user": 30, "item": 40, "cate": 8}.items()):
        fields.append(FieldInfo(name, "cat", column=i, offset=offset, vocab_size=values + 2))
        offset += values + 2
    fields.append(FieldInfo("price", "num", column=0))
    for target in ("item", "cate"):
        t = next(f for f in fields if f.name == target)
        fields.append(FieldInfo(f"hist_{target}", "seq", offset=t.offset, vocab_size=t.vocab_size,
                                max_len=6, share_vocab=target))
    return Schema(fields=tuple(fields), table_size=offset)


def tree_listing(name: str) -> str:
    """``collection/path shape dtype`` of every variable of model ``name``, one a line, sorted."""
    schema = small_schema()
    batch = {"cat": np.full((4, 3), 2, np.int32), "num": np.zeros((4, 1), np.float32),
             **{f"seq/{f.name}": np.full((4, f.max_len), f.offset + 2, np.int32)
                for f in schema.seq_fields}}
    model = build_model(name, schema)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch, train=False))
    return "\n".join(sorted(f"{jax.tree_util.keystr(p)} {tuple(x.shape)} {x.dtype}"
                            for p, x in jax.tree_util.tree_leaves_with_path(shapes)))


def fingerprint(name: str) -> str:
    return hashlib.sha256(tree_listing(name).encode()).hexdigest()[:16]


def test_every_model_has_a_fingerprint() -> None:
    assert sorted(FINGERPRINTS) == available_models()


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_variable_tree_is_unchanged(name: str) -> None:
    assert fingerprint(name) == FINGERPRINTS[name], f"{name}'s variables are now:\n{tree_listing(name)}"
