"""LR, FM, DNN and the field embedding against direct numpy formulas."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpn_jax.data.schema import Dataset, FieldInfo, Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models import available_models, build_model, model_options
from dpn_jax.models.linear import fm_interaction
from dpn_jax.nn.embedding import FieldEmbedding, embedded_field_names


def mixed_schema() -> Schema:
    # two categorical fields (blocks of 5 and 4 rows), one dense numeric, one sequence sharing
    # the first field's vocabulary and one with its own block.
    fields = (
        FieldInfo("a", "cat", column=0, offset=0, vocab_size=5),
        FieldInfo("b", "cat", column=1, offset=5, vocab_size=4),
        FieldInfo("x", "num", column=0),
        FieldInfo("hist", "seq", offset=0, vocab_size=5, max_len=3, share_vocab="a"),
        FieldInfo("tags", "seq", offset=9, vocab_size=3, max_len=2),
    )
    return Schema(fields=fields, table_size=12)


def mixed_batch():
    return {
        "cat": jnp.array([[2, 6], [4, 8]], jnp.int32),
        "num": jnp.array([[0.5], [-1.0]], jnp.float32),
        "seq/hist": jnp.array([[2, 3, 0], [0, 0, 0]], jnp.int32),
        "seq/tags": jnp.array([[10, 11], [11, 9]], jnp.int32),
        "label": jnp.array([1.0, 0.0]),
    }


def test_field_embedding_matches_numpy():
    schema = mixed_schema()
    emb = FieldEmbedding(schema, dim=3, init_std=1.0)
    params = emb.init(jax.random.PRNGKey(0), mixed_batch())
    out = np.asarray(emb.apply(params, mixed_batch()))
    table = np.asarray(params["params"]["table"])
    num = np.asarray(params["params"]["numeric"])
    chex.assert_shape(out, (2, 5, 3))
    assert embedded_field_names(schema) == ("a", "b", "x", "hist", "tags")
    np.testing.assert_allclose(out[0, 0], table[2], rtol=1e-6)
    np.testing.assert_allclose(out[1, 1], table[8], rtol=1e-6)
    np.testing.assert_allclose(out[0, 2], 0.5 * num[0], rtol=1e-6)
    # mean over valid steps only; empty history -> zeros, not NaN
    np.testing.assert_allclose(out[0, 3], (table[2] + table[3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[1, 3], np.zeros(3), atol=0)
    np.testing.assert_allclose(out[1, 4], table[11], rtol=1e-6)  # 9 is the pad of "tags"


def test_fm_trick_equals_pairwise_sum():
    e = np.random.default_rng(0).normal(size=(5, 6, 4)).astype(np.float32)
    explicit = sum(np.sum(e[:, i] * e[:, j], -1) for i, j in itertools.combinations(range(6), 2))
    np.testing.assert_allclose(np.asarray(fm_interaction(jnp.asarray(e))), explicit, rtol=1e-4, atol=1e-5)


def test_lr_and_fm_logits_match_numpy():
    schema = mixed_schema()
    batch = mixed_batch()
    lr = build_model("lr", schema)
    p = lr.init(jax.random.PRNGKey(0), batch)
    # Perturb the zero-initialised weights so the check is not trivially 0 == 0.
    p = jax.tree_util.tree_map(lambda x: x + jax.random.normal(jax.random.PRNGKey(1), x.shape), p)
    w = np.asarray(p["params"]["linear"]["weights"]["table"])[:, 0]
    wn = np.asarray(p["params"]["linear"]["weights"]["numeric"])[:, 0]
    bias = float(p["params"]["linear"]["bias"])
    expect = np.array([
        bias + w[2] + w[6] + 0.5 * wn[0] + (w[2] + w[3]) / 2 + (w[10] + w[11]) / 2,
        bias + w[4] + w[8] - 1.0 * wn[0] + 0.0 + w[11],
    ])
    np.testing.assert_allclose(np.asarray(lr.apply(p, batch)), expect, rtol=1e-5)

    fm = build_model("fm", schema, embedding_dim=3)
    pf = fm.init(jax.random.PRNGKey(0), batch)
    pf = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape), pf)
    e = np.asarray(FieldEmbedding(schema, 3).apply({"params": pf["params"]["embedding"]}, batch))
    lin = np.asarray(build_model("lr", schema).apply({"params": pf["params"]}, batch))
    pair = sum(np.sum(e[:, i] * e[:, j], -1) for i, j in itertools.combinations(range(5), 2))
    np.testing.assert_allclose(np.asarray(fm.apply(pf, batch)), lin + pair, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lr", "fm", "dnn"])
def test_every_model_gives_finite_logits_and_grads(name, tiny_synthetic: Dataset):
    model = build_model(name, tiny_synthetic.schema)
    batch = {k: jnp.asarray(v[:16]) for k, v in tiny_synthetic.train.items()}
    variables = model.init(jax.random.PRNGKey(0), batch)
    logits = model.apply(variables, batch)
    chex.assert_shape(logits, (16,))
    chex.assert_tree_all_finite(logits)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, batch, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(out**2)

    chex.assert_tree_all_finite(jax.grad(loss)(variables["params"]))


def test_dnn_parameter_count_formula(tiny_synthetic: Dataset):
    s = tiny_synthetic.schema
    model = build_model("dnn", s, hidden=(7, 5))
    batch = {k: jnp.asarray(v[:4]) for k, v in tiny_synthetic.train.items()}
    v = model.init(jax.random.PRNGKey(0), batch)
    n = sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))
    d, f = 10, s.num_fields
    # table + (dense without bias + BN scale/bias) per layer + output layer
    assert n == s.table_size * d + (f * d * 7 + 2 * 7) + (7 * 5 + 2 * 5) + (5 + 1)


def test_registry_errors():
    assert {"lr", "fm", "dnn"} <= set(available_models())
    with pytest.raises(ConfigError, match="did you mean 'dnn'"):
        build_model("dnnn", mixed_schema())
    with pytest.raises(ConfigError, match="has no option 'width'.*hidden"):
        build_model("dnn", mixed_schema(), width=3)
    assert model_options("dnn")["hidden"] == (400, 400, 400)


def test_dropout16_is_unbiased_with_the_right_rate():
    from dpn_jax.nn.dropout import Dropout16

    x = jnp.ones((400, 1000))
    y = np.asarray(Dropout16(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.005
    np.testing.assert_allclose(y[kept], 65536 / (65536 - round(0.3 * 65536)), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01
    np.testing.assert_array_equal(np.asarray(Dropout16(0.3).apply({}, x, deterministic=True)), np.asarray(x))
    # different keys give different masks (the bits are really used)
    y2 = np.asarray(Dropout16(0.3).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}))
    assert (kept != (y2 != 0)).mean() > 0.3
