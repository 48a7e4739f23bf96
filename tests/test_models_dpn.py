"""Feature- and field-based DPN models, and the per-field-context DPO they use."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dpo_layers import layer_norm

from dpn_jax import dpo
from dpn_jax.data.synthetic import make_synthetic
from dpn_jax.dpo.per_field import apply_per_field_context, leave_one_field_out
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.nn.dpn_tower import dpo_layer_indices
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit


def test_leave_one_field_out():
    e = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    out = np.asarray(leave_one_field_out(jnp.asarray(e)))
    for f in range(3):
        expect = e.copy()
        expect[:, f] = 0
        np.testing.assert_array_equal(out[:, f], expect.reshape(2, 12))


@pytest.mark.parametrize("name", ["lowrank", "mixture", "hyperdense", "multihead", "diagonal", "rank1"])
def test_per_field_context_equals_explicit_sum(name):
    b, f, d, n = 3, 4, 2, 6
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(b, f, d)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(b, f, 5)), jnp.float32)
    gen = dpo.make_generator(name, f * d, n, 5, rank=3, heads=2 if name == "multihead" else 1)
    params = gen.init(jax.random.PRNGKey(0))
    # make every part non-trivial (biases and dynamic parts start small or at zero)
    params = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
    y = np.asarray(apply_per_field_context(gen, params, x, z))
    expect = np.zeros((b, n))
    biases = []
    for j in range(f):
        w, bias = gen.generate(params, z[:, j])  # [B, n, m], [B, n]
        x_only = np.zeros((b, f, d), np.float32)
        x_only[:, j] = np.asarray(x[:, j])
        expect += np.einsum("bnm,bm->bn", np.asarray(w), x_only.reshape(b, -1))
        biases.append(np.asarray(bias))
    expect += np.mean(biases, axis=0)
    np.testing.assert_allclose(y, expect, rtol=2e-4, atol=2e-5)


def test_other_fields_context_norm_normalises_the_whole_embedding_then_drops_each_field():
    from dpn_jax.nn.dpo_context import FieldContextDPO

    b, f, d, n = 3, 4, 2, 5
    e = np.random.default_rng(2).normal(size=(b, f, d)).astype(np.float32)
    model = FieldContextDPO(n, rank=2, context_norm=True)
    v = model.init(jax.random.PRNGKey(0), e)
    v = jax.tree_util.tree_map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), v)
    p = v["params"]
    zn = layer_norm(e.reshape(b, -1), p["context_norm"]["scale"],
                    p["context_norm"]["bias"]).astype(np.float32)
    gen = dpo.lowrank(f * d, n, f * d, 2)
    pure = dpo.LowRankParams(dpo.HiddenParams(p["hidden_kernel"], p["hidden_bias"]), p["kernel"],
                             p["bias"])
    expect = apply_per_field_context(gen, pure, jnp.asarray(e),
                                     leave_one_field_out(jnp.asarray(zn.reshape(b, f, d))))
    np.testing.assert_allclose(model.apply(v, e), expect, rtol=1e-5, atol=1e-5)


def test_dpo_layer_indices_and_context_errors(tiny_synthetic):
    assert dpo_layer_indices("first", 3) == {0} and dpo_layer_indices("all", 2) == {0, 1}
    assert dpo_layer_indices("2,3", 3) == {1, 2}
    for bad in ("fourth", "0", "4", ""):
        with pytest.raises(ConfigError, match="dpo_layers"):
            dpo_layer_indices(bad, 3)
    batch = {k: v[:4] for k, v in tiny_synthetic.train.items()}
    with pytest.raises(ConfigError, match="unknown field.*f0, f1"):
        build_model("dpn", tiny_synthetic.schema, context="user").init(jax.random.PRNGKey(0), batch)


def test_dpn_with_zero_dynamic_part_is_the_dnn(tiny_synthetic):
    """With the generated part switched off, dpn's first layer is a Dense layer: copying the
    static kernel into a DNN gives the same logits."""
    batch = {k: jnp.asarray(v[:16]) for k, v in tiny_synthetic.train.items()}
    dpn_model = build_model("dpn", tiny_synthetic.schema, hidden=(8, 4))
    v = dpn_model.init(jax.random.PRNGKey(0), batch)
    p = jax.tree_util.tree_map(lambda x: x, v["params"])
    k = p["dpo_0"]["kernel"]  # [m, rank+1, n]
    p["dpo_0"]["kernel"] = k.at[:, 1:, :].set(0.0)
    dnn = build_model("dnn", tiny_synthetic.schema, hidden=(8, 4))
    vd = dnn.init(jax.random.PRNGKey(0), batch)
    pd = vd["params"]
    pd["embedding"] = p["embedding"]
    pd["mlp"]["Dense_0"]["kernel"] = k[:, 0, :]
    pd["mlp"]["Dense_1"]["kernel"] = p["dense_1"]["kernel"]
    pd["mlp"]["BatchNorm_0"], pd["mlp"]["BatchNorm_1"] = p["bn_0"], p["bn_1"]
    pd["out"] = p["out"]
    stats = {"mlp": {"BatchNorm_0": v["batch_stats"]["bn_0"], "BatchNorm_1": v["batch_stats"]["bn_1"]}}
    a = dpn_model.apply({"params": p, "batch_stats": v["batch_stats"]}, batch)
    b = dnn.apply({"params": pd, "batch_stats": stats}, batch)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # and the dynamic part matters once it is non-zero
    p2 = dict(p, dpo_0=dict(p["dpo_0"], kernel=k.at[:, 1:, :].set(0.5)))
    c = dpn_model.apply({"params": p2, "batch_stats": v["batch_stats"]}, batch)
    assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("layers", [1, 2])
def test_self_field_dpn_is_additive_in_the_fields_and_sum_is_not(layers, tiny_synthetic):
    """``y_i = g(x_i) x_i`` has no cross-field term: the mixed difference of the logit over two
    fields' ids is zero (an additive model, LR's class); the summation variant's is not."""
    cat = np.asarray(tiny_synthetic.train["cat"][:1])
    a, b = cat[0, 0], cat[0, 1]
    a2, b2 = tiny_synthetic.train["cat"][:, 0].max(), tiny_synthetic.train["cat"][:, 1].max()
    assert a != a2 and b != b2
    rows = np.repeat(cat, 4, axis=0)
    rows[:, 0] = [a, a, a2, a2]
    rows[:, 1] = [b, b2, b, b2]
    batch = {"cat": jnp.asarray(rows), "num": jnp.zeros((4, 0), jnp.float32)}
    mixed, scale = {}, {}
    for aggregation in ("self", "sum"):
        model = build_model("dpn_field", tiny_synthetic.schema, aggregation=aggregation,
                            layers=layers)
        v = model.init(jax.random.PRNGKey(0), batch)
        v = jax.tree_util.tree_map(  # make every path (dynamic parts start small) non-trivial
            lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), v)
        out = np.asarray(model.apply(v, batch), np.float64)
        mixed[aggregation] = out[0] - out[1] - out[2] + out[3]
        scale[aggregation] = np.abs(out).max()
    assert abs(mixed["self"]) < 1e-5 * max(scale["self"], 1.0), (mixed, scale)
    assert abs(mixed["sum"]) > 1e-2, mixed


MODELS = [
    ("dpn", {}),
    ("dpn", {"context": "other_fields"}),
    ("dpn", {"context": "f0", "dpo_layers": "all", "generator": "mixture"}),
    ("dpn_field", {}),
    ("dpn_field", {"aggregation": "attentive", "layers": 2}),
    ("dpn_field_dnn", {"aggregation": "sum"}),
]


@pytest.mark.parametrize("name,kw", MODELS)
def test_dpn_models_shapes_and_gradients(name, kw, tiny_synthetic):
    model = build_model(name, tiny_synthetic.schema, **kw)
    batch = {k: jnp.asarray(v[:8]) for k, v in tiny_synthetic.train.items()}
    v = model.init(jax.random.PRNGKey(0), batch)
    chex.assert_shape(model.apply(v, batch), (8,))

    def loss(params):
        out = model.apply({**v, "params": params}, batch, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.PRNGKey(1)})[0]
        return jnp.mean(out ** 2) + jnp.mean(out)

    g = jax.grad(loss)(v["params"])
    chex.assert_tree_all_finite(g)
    assert any(float(jnp.abs(x).sum()) > 0 for x in jax.tree_util.tree_leaves(g))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpn", "dpn_field", "dpn_field_dnn"])
def test_dpn_models_train(name):
    data = make_synthetic(seed=0, rows=20_000, fields=4, vocab=10)
    model = build_model(name, data.schema, **({"hidden": (64, 64)} if name != "dpn_field" else {}))
    res = fit(model, data, TrainConfig(batch_size=512, max_epochs=3), log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.6, res.test


@pytest.mark.slow
def test_field_dpo_learns_pairwise_interactions_beyond_lr():
    """The summation field DPO carries cross-field (second-order) terms: on data whose only
    non-additive structure is pairwise it must beat logistic regression clearly. Measured
    (2026-11-28): dpn_field(sum) 0.7238, lr 0.6663, Bayes 0.7529; with the former defaults (ReLU
    generator, embeddings at 1e-4, dynamic scale 0.25) dpn_field stayed at 0.6662 = LR."""
    data = make_synthetic(seed=2021, rows=50_000, vocab=10, contextual=0.0)
    cfg = TrainConfig(batch_size=1024)
    lr = fit(build_model("lr", data.schema), data, cfg, log=lambda s: None, progress=False)
    field = fit(build_model("dpn_field", data.schema, aggregation="sum"), data, cfg,
                log=lambda s: None, progress=False)
    assert field.test["auc"] > lr.test["auc"] + 0.03, (field.test, lr.test)
