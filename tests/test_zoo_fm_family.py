"""AFM, HOFM, NFM, IPNN and OPNN: each interaction layer against explicit loops, parameter
counts by formula, finite gradients and a short training run per model."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpn_jax.models.fm_family  # noqa: F401  (registers the models)
from dpn_jax.data.schema import Dataset
from dpn_jax.errors import ConfigError
from dpn_jax.models import available_models, build_model, model_options, model_summary
from dpn_jax.nn.embedding import FieldEmbedding
from dpn_jax.nn.fm_layers import (
    AttentionalPooling,
    KernelProduct,
    anova_kernel,
    anova_kernels,
    bi_interaction,
    inner_products,
    outer_product_sum_pooling,
    pair_indices,
    pairwise_products,
)

MODELS = ["afm", "hofm", "nfm", "ipnn", "opnn"]


def _emb(b=3, f=5, d=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, f, d)).astype(np.float32)


def _pairs(f):
    return list(itertools.combinations(range(f), 2))


def _perturb(variables, scale=0.3, seed=1):
    """Random params of O(scale): the default 1e-4 embedding init would make every check ~0 == 0."""
    leaves, tree = jax.tree_util.tree_flatten(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return {**variables, "params": jax.tree_util.tree_unflatten(tree, leaves)}


def _batch(data: Dataset, n: int):
    return {k: jnp.asarray(v[:n]) for k, v in data.train.items()}


# ---------------------------------------------------------------------------- layers vs loops


def test_pairwise_products_and_inner_products_match_loops():
    e = _emb()
    i, j = pair_indices(5)
    assert list(zip(i.tolist(), j.tolist())) == _pairs(5)  # row-major i < j
    pp = np.asarray(pairwise_products(jnp.asarray(e)))
    ip = np.asarray(inner_products(jnp.asarray(e)))
    chex.assert_shape(pp, (3, 10, 4))
    chex.assert_shape(ip, (3, 10))
    for p, (a, b) in enumerate(_pairs(5)):
        np.testing.assert_allclose(pp[:, p], e[:, a] * e[:, b], rtol=1e-6)
        np.testing.assert_allclose(ip[:, p], np.sum(e[:, a] * e[:, b], -1), rtol=1e-5, atol=1e-6)


def test_bi_interaction_equals_explicit_pairwise_sum():
    e = _emb(f=6, d=3)
    explicit = sum(e[:, a] * e[:, b] for a, b in _pairs(6))  # [B, d], not summed over d
    out = np.asarray(bi_interaction(jnp.asarray(e)))
    chex.assert_shape(out, (3, 3))
    np.testing.assert_allclose(out, explicit, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(anova_kernel(jnp.asarray(e), 2)), explicit, rtol=1e-4, atol=1e-5)


def test_anova_recursion_equals_brute_force_order_3():
    e = _emb(b=2, f=6, d=3, seed=4).astype(np.float64)
    f = e.shape[1]
    brute = np.zeros(e.shape[0])
    for i in range(f):
        for j in range(i + 1, f):
            for k in range(j + 1, f):
                brute += np.sum(e[:, i] * e[:, j] * e[:, k], axis=-1)
    got = np.asarray(anova_kernel(jnp.asarray(e, jnp.float32), 3)).sum(-1)
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-5)
    # every order of the same scan: A^0 = 1, A^1 = Σ e, A^4 by combinations, A^t = 0 for t > F
    all_k = np.asarray(anova_kernels(jnp.asarray(e[:, :4], jnp.float32), 5))
    np.testing.assert_allclose(all_k[0], 1.0)
    np.testing.assert_allclose(all_k[1], e[:, :4].sum(1), rtol=1e-5)
    np.testing.assert_allclose(all_k[4], np.prod(e[:, :4], axis=1), rtol=1e-4)
    np.testing.assert_allclose(all_k[5], 0.0)


def test_outer_product_sum_pooling_matches_loop():
    e = _emb(f=4, d=3)
    explicit = sum(np.einsum("bk,bl->bkl", e[:, i], e[:, j]) for i in range(4) for j in range(4))
    out = np.asarray(outer_product_sum_pooling(jnp.asarray(e)))
    chex.assert_shape(out, (3, 9))
    np.testing.assert_allclose(out, explicit.reshape(3, 9), rtol=1e-4, atol=1e-5)


def test_kernel_product_matches_loop():
    e = _emb(f=4, d=3)
    layer = KernelProduct()
    params = layer.init(jax.random.PRNGKey(0), jnp.asarray(e))
    k = np.asarray(params["params"]["kernel"])
    chex.assert_shape(k, (6, 3, 3))
    out = np.asarray(layer.apply(params, jnp.asarray(e)))
    for p, (a, b) in enumerate(_pairs(4)):
        np.testing.assert_allclose(out[:, p], np.einsum("bk,kl,bl->b", e[:, a], k[p], e[:, b]),
                                   rtol=1e-4, atol=1e-5)


class TestAttentionalPooling(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_loop_over_pairs(self):
        e = _emb(b=2, f=4, d=3, seed=7)
        pairs = pairwise_products(jnp.asarray(e))
        layer = AttentionalPooling(attention_dim=5)
        params = _perturb(layer.init(jax.random.PRNGKey(0), pairs), scale=0.5)
        pooled, weights = self.variant(lambda p, x: layer.apply(p, x))(params, pairs)
        w_att = np.asarray(params["params"]["W"]["kernel"])
        b_att = np.asarray(params["params"]["W"]["bias"])
        h = np.asarray(params["params"]["h"]["kernel"])[:, 0]
        for b in range(2):
            vs = [e[b, i] * e[b, j] for i, j in _pairs(4)]
            scores = np.array([h @ np.maximum(v @ w_att + b_att, 0.0) for v in vs])
            a = np.exp(scores - scores.max())
            a /= a.sum()
            np.testing.assert_allclose(np.asarray(weights[b]), a, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(np.asarray(pooled[b]), sum(ai * v for ai, v in zip(a, vs)),
                                       rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- whole models


def _linear(variables, schema, batch) -> np.ndarray:
    return np.asarray(build_model("lr", schema).apply({"params": variables["params"]}, batch))


def _embed(variables, schema, batch, name="embedding", dim=10) -> np.ndarray:
    return np.asarray(FieldEmbedding(schema, dim).apply({"params": variables["params"][name]}, batch))


def test_afm_logits_equal_explicit_formula(tiny_synthetic: Dataset):
    s, batch = tiny_synthetic.schema, _batch(tiny_synthetic, 4)
    model = build_model("afm", s, attention_dim=6)
    v = _perturb(model.init(jax.random.PRNGKey(0), batch))
    e, f = _embed(v, s, batch), s.num_fields
    pa = v["params"]["attention"]
    w, bias, h = (np.asarray(x) for x in (pa["W"]["kernel"], pa["W"]["bias"], pa["h"]["kernel"][:, 0]))
    p = np.asarray(v["params"]["p"]["kernel"])[:, 0]
    expect = _linear(v, s, batch)
    for b in range(4):
        vs = [e[b, i] * e[b, j] for i, j in _pairs(f)]
        scores = np.array([h @ np.maximum(x @ w + bias, 0.0) for x in vs])
        a = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        expect[b] += p @ sum(ai * x for ai, x in zip(a, vs))
    np.testing.assert_allclose(np.asarray(model.apply(v, batch)), expect, rtol=1e-4, atol=1e-5)


def test_hofm_logits_use_one_table_per_order(tiny_synthetic: Dataset):
    s, batch = tiny_synthetic.schema, _batch(tiny_synthetic, 4)
    model = build_model("hofm", s, embedding_dim=3)
    v = _perturb(model.init(jax.random.PRNGKey(0), batch))
    e2, e3 = _embed(v, s, batch, "embedding", 3), _embed(v, s, batch, "embedding_3", 3)
    f = s.num_fields
    order2 = sum(np.sum(e2[:, i] * e2[:, j], -1) for i, j in _pairs(f))
    order3 = sum(np.sum(e3[:, i] * e3[:, j] * e3[:, k], -1) for i, j, k in itertools.combinations(range(f), 3))
    np.testing.assert_allclose(np.asarray(model.apply(v, batch)), _linear(v, s, batch) + order2 + order3,
                               rtol=1e-4, atol=1e-5)
    shared = build_model("hofm", s, embedding_dim=3, reuse_embedding=True)
    vs = _perturb(shared.init(jax.random.PRNGKey(0), batch))
    e = _embed(vs, s, batch, "embedding", 3)
    expect = (_linear(vs, s, batch) + sum(np.sum(e[:, i] * e[:, j], -1) for i, j in _pairs(f))
              + sum(np.sum(e[:, i] * e[:, j] * e[:, k], -1) for i, j, k in itertools.combinations(range(f), 3)))
    np.testing.assert_allclose(np.asarray(shared.apply(vs, batch)), expect, rtol=1e-4, atol=1e-5)


def test_nfm_without_hidden_layers_is_linear_plus_projected_bi_interaction(tiny_synthetic: Dataset):
    s, batch = tiny_synthetic.schema, _batch(tiny_synthetic, 4)
    model = build_model("nfm", s, hidden=())
    v = _perturb(model.init(jax.random.PRNGKey(0), batch))
    e = _embed(v, s, batch)
    h = np.asarray(v["params"]["out"]["kernel"])[:, 0]
    bi = sum(e[:, i] * e[:, j] for i, j in _pairs(s.num_fields))
    np.testing.assert_allclose(np.asarray(model.apply(v, batch)), _linear(v, s, batch) + bi @ h,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("ipnn", {}), ("opnn", {}), ("opnn", {"outer": "kernel"})])
def test_pnn_first_layer_sees_embeddings_then_products(name, kw, tiny_synthetic: Dataset):
    """With one linear hidden layer and no BN the logit is out(W [flatten(e), p]) in closed form."""
    s, batch = tiny_synthetic.schema, _batch(tiny_synthetic, 4)
    model = build_model(name, s, hidden=(3,), batch_norm=False, act="linear", **kw)
    v = _perturb(model.init(jax.random.PRNGKey(0), batch))
    e = _embed(v, s, batch)
    f = s.num_fields
    if name == "ipnn":
        prod = np.stack([np.sum(e[:, i] * e[:, j], -1) for i, j in _pairs(f)], 1)
    elif kw.get("outer") == "kernel":
        k = np.asarray(v["params"]["kernel_product"]["kernel"])
        prod = np.stack([np.einsum("bk,kl,bl->b", e[:, i], k[p], e[:, j]) for p, (i, j) in enumerate(_pairs(f))], 1)
    else:
        fs = e.sum(1)
        prod = np.stack([fs[:, a] * fs[:, b] for a in range(10) for b in range(10)], 1)
    x = np.concatenate([e.reshape(4, -1), prod], 1)
    w1 = np.asarray(v["params"]["mlp"]["Dense_0"]["kernel"])
    b1 = np.asarray(v["params"]["mlp"]["Dense_0"]["bias"])
    wo, bo = np.asarray(v["params"]["out"]["kernel"])[:, 0], float(v["params"]["out"]["bias"][0])
    np.testing.assert_allclose(np.asarray(model.apply(v, batch)), (x @ w1 + b1) @ wo + bo, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- counts, grads, errors


def _n_params(model, batch) -> int:
    v = model.init(jax.random.PRNGKey(0), batch)
    return sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))


def _mlp_count(widths_in: int, hidden: tuple[int, ...]) -> int:
    """Dense without bias + BN scale/bias per layer (the MLP with batch_norm=True)."""
    n, prev = 0, widths_in
    for h in hidden:
        n += prev * h + 2 * h
        prev = h
    return n


def test_parameter_counts_by_formula(tiny_synthetic: Dataset):
    s, batch = tiny_synthetic.schema, _batch(tiny_synthetic, 4)
    t, d, f = s.table_size, 10, s.num_fields
    assert not s.numeric_fields  # no per-field numeric vectors in the count below
    lin = t + 1
    pairs = f * (f - 1) // 2
    hid = (7, 5)
    att = 6
    expect = [
        ("afm", dict(attention_dim=att), lin + t * d + (d * att + att) + att + d),
        ("hofm", {}, lin + 2 * t * d),  # order-2 and order-3 tables
        ("hofm", dict(order=4), lin + 3 * t * d),
        ("hofm", dict(reuse_embedding=True), lin + t * d),
        ("nfm", dict(hidden=hid), lin + t * d + _mlp_count(d, hid) + hid[-1]),
        ("nfm", dict(hidden=hid, bi_batch_norm=True), lin + t * d + 2 * d + _mlp_count(d, hid) + hid[-1]),
        ("ipnn", dict(hidden=hid), t * d + _mlp_count(f * d + pairs, hid) + hid[-1] + 1),
        ("opnn", dict(hidden=hid), t * d + _mlp_count(f * d + d * d, hid) + hid[-1] + 1),
        ("opnn", dict(hidden=hid, outer="kernel"),
         t * d + pairs * d * d + _mlp_count(f * d + pairs, hid) + hid[-1] + 1),
    ]
    for name, kw, n in expect:
        assert _n_params(build_model(name, s, **kw), batch) == n, (name, kw)


@pytest.mark.parametrize("name,kw", [
    ("afm", dict(attention_dropout=0.2, dropout=0.2)),
    ("hofm", {}),
    ("nfm", dict(hidden=(16, 8), dropout=0.1, bi_batch_norm=True, bi_dropout=0.1)),
    ("ipnn", dict(hidden=(16, 8), dropout=0.1)),
    ("opnn", dict(hidden=(16, 8))),
    ("opnn", dict(hidden=(16, 8), outer="kernel")),
])
def test_finite_logits_and_grads(name, kw, tiny_synthetic: Dataset):
    model = build_model(name, tiny_synthetic.schema, **kw)
    batch = _batch(tiny_synthetic, 16)
    variables = model.init(jax.random.PRNGKey(0), batch)
    logits = model.apply(variables, batch)
    chex.assert_shape(logits, (16,))
    chex.assert_tree_all_finite(logits)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, batch, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
        chex.assert_shape(out, (16,))
        return jnp.mean(out**2) + jnp.mean(out)

    grads = jax.grad(loss)(variables["params"])
    chex.assert_tree_all_finite(grads)
    # the interaction parameters really receive gradient (not only the linear term)
    emb_grad = grads["embedding"]["table"]
    assert float(jnp.max(jnp.abs(emb_grad))) > 0


def test_registry_defaults_and_errors(tiny_synthetic: Dataset):
    assert set(MODELS) <= set(available_models())
    for name in MODELS:
        assert model_summary(name) and model_options(name)["embedding_dim"] == 10
    assert model_options("afm")["attention_dim"] == 10
    assert model_options("hofm")["order"] == 3
    for name in ("nfm", "ipnn", "opnn"):
        assert model_options(name)["hidden"] == (400, 400, 400)
    assert model_options("opnn")["outer"] == "sum_pool"
    batch = _batch(tiny_synthetic, 2)
    with pytest.raises(ConfigError, match="order must be >= 2"):
        build_model("hofm", tiny_synthetic.schema, order=1).init(jax.random.PRNGKey(0), batch)
    with pytest.raises(ConfigError, match="outer='cross'.*sum_pool"):
        build_model("opnn", tiny_synthetic.schema, outer="cross").init(jax.random.PRNGKey(0), batch)


# ---------------------------------------------------------------------------- training smoke


@pytest.fixture(scope="module")
def smoke_data():
    from dpn_jax.data.synthetic import make_synthetic

    return make_synthetic(seed=0, rows=20_000, fields=4, vocab=10)


@pytest.mark.parametrize("name", MODELS)
def test_training_smoke(name, smoke_data):
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    kw = {} if name in ("afm", "hofm") else {"hidden": (64, 64)}  # smaller MLP: CPU time
    model = build_model(name, smoke_data.schema, **kw)
    cfg = TrainConfig(batch_size=512, max_epochs=3, patience=5, bn_recalibrate_batches=4)
    res = fit(model, smoke_data, cfg, log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.6, res.test
