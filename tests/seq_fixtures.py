"""Shared fixtures of the behaviour-sequence tests: a tiny item/user/category schema with item
and category histories, generated splits whose label depends on the history, and helpers that
perturb padding (values at padded steps, appended padded steps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax.data.schema import Dataset, FieldInfo, Schema

MAX_LEN = 6
N_ITEMS, N_CATES = 12, 5  # vocab sizes including pad (local 0) and OOV (local 1)


# ---------------------------------------------------------------------------------------------
# a tiny behaviour dataset: item / user / category, histories of items and of their categories


def seq_schema(max_len: int = MAX_LEN) -> Schema:
    fields = (
        FieldInfo("item", "cat", column=0, offset=0, vocab_size=N_ITEMS),
        FieldInfo("user", "cat", column=1, offset=N_ITEMS, vocab_size=6),
        FieldInfo("cate", "cat", column=2, offset=N_ITEMS + 6, vocab_size=N_CATES),
        FieldInfo("hist", "seq", offset=0, vocab_size=N_ITEMS, max_len=max_len,
                  share_vocab="item"),
        FieldInfo("hist_cate", "seq", offset=N_ITEMS + 6, vocab_size=N_CATES, max_len=max_len,
                  share_vocab="cate"),
    )
    return Schema(fields=fields, table_size=N_ITEMS + 6 + N_CATES)


# dien / dien_dpo small enough for a unit test (test_dien, test_experiments' DIEN probe)
DIEN_SMALL = dict(embedding_dim=4, hidden=(8, 4), attention_hidden=(6, 3), aux_hidden=(5,))
CATE_OF = np.array([0, 1] + [2 + (i % 3) for i in range(N_ITEMS - 2)])  # local item -> local cate


def make_split(n: int, seed: int, max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """Label: 1 when the target item is in the (right-padded) history, else 10% noise."""
    rng = np.random.default_rng(seed)
    item = rng.integers(2, N_ITEMS, n)
    lengths = rng.integers(0, MAX_LEN + 1, n)
    hist = np.zeros((n, max_len), np.int64)
    for r in range(n):
        hist[r, :lengths[r]] = rng.integers(2, N_ITEMS, lengths[r])
    label = ((hist == item[:, None]).any(1) | (rng.random(n) < 0.1)).astype(np.float32)
    off_c = N_ITEMS + 6
    return {
        "cat": np.stack([item, N_ITEMS + rng.integers(1, 6, n), off_c + CATE_OF[item]],
                        1).astype(np.int32),
        "num": np.zeros((n, 0), np.float32),
        "seq/hist": hist.astype(np.int32),
        "seq/hist_cate": np.where(hist > 0, off_c + CATE_OF[hist], off_c).astype(np.int32),
        "label": label,
    }


def tiny_dataset() -> Dataset:
    return Dataset("tiny_seq", seq_schema(), make_split(3000, 0), make_split(1000, 1),
                   make_split(1000, 2))


def jbatch(split: dict, n: int | None = None) -> dict:
    return {k: jnp.asarray(v[:n]) for k, v in split.items()}


def pad_more(split: dict, extra: int) -> dict:
    """The same rows with ``extra`` more padded steps appended to every history."""
    out = dict(split)
    for name, pad in (("hist", 0), ("hist_cate", N_ITEMS + 6)):
        a = np.asarray(split[f"seq/{name}"])
        out[f"seq/{name}"] = np.concatenate([a, np.full((a.shape[0], extra), pad, a.dtype)], 1)
    return out


def random_variables(init, *args, seed: int = 1, scale: float = 0.5, **kw):
    """Variables of ``init``'s structure filled with numpy normals (no init compile).

    Normalisation scales are drawn around 1 (``1 + scale/2·N``): with zero-centred scales and
    biases a small BatchNorm + ReLU layer can be dead for every row, silencing all gradients
    upstream whatever the code does."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda *a: init(jax.random.key(0), *a, **kw), *args)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name and "var" in name:  # running variances must stay positive
            return jnp.asarray(1.0 + 0.5 * rng.random(s.shape), s.dtype)
        if name.endswith("['scale']"):  # BatchNorm / LayerNorm scales
            return jnp.asarray(1.0 + 0.5 * scale * rng.normal(size=s.shape), s.dtype)
        return jnp.asarray(scale * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def sequences(b: int = 3, length: int = 6, d: int = 4, seed: int = 0):
    """Behaviours, a right-padded mask with lengths 0 .. length and one with a hole."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, length, d)).astype(np.float32)
    lengths = [length, 1, 3][:b] + [0] * max(0, b - 3)
    mask = np.arange(length)[None] < np.array(lengths)[:, None]
    return x, mask


def garbage_at_padding(x: np.ndarray, mask: np.ndarray, seed: int = 9) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(mask[..., None], x, 1e3 * rng.normal(size=x.shape)).astype(np.float32)


def append_padding(x: np.ndarray, mask: np.ndarray, extra: int = 3):
    rng = np.random.default_rng(5)
    xx = np.concatenate([x, rng.normal(size=(x.shape[0], extra, x.shape[2]))], 1)
    return xx.astype(np.float32), np.concatenate([mask, np.zeros((mask.shape[0], extra), bool)], 1)
