"""AFM, HOFM, NFM, IPNN and OPNN: each interaction layer against explicit loops, parameter
counts by formula, finite gradients and a short training run per model.

CPU time: on this JAX every distinct random-number kernel costs ~1 s of XLA compile, so the exact
checks build their parameters with numpy from ``jax.eval_shape`` (no init program compiles) and
compute the references in numpy; only the gradient test runs the real initialisers.
"""

from __future__ import annotations

import dataclasses
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


def _random_variables(module, *args, scale=0.5, seed=1, **kw):
    """Variables of ``module`` with every parameter ~ N(0, scale^2), built in numpy from the
    shapes alone (the default 1e-4 embedding init would make every check ~0 == 0)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kw)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes["params"])
    return {"params": params}


def _batch(data: Dataset, n: int):
    return {k: jnp.asarray(v[:n]) for k, v in data.train.items()}


def _apply(model, variables, batch) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)(variables, batch))


def _embed(params, batch, name="embedding") -> np.ndarray:
    """``[B, F, d]`` for a categorical-only schema: rows of the table at the global ids."""
    return np.asarray(params[name]["table"])[np.asarray(batch["cat"])]


def _linear(params, batch) -> np.ndarray:
    w = np.asarray(params["linear"]["weights"]["table"])[:, 0]
    return w[np.asarray(batch["cat"])].sum(1) + float(params["linear"]["bias"])


@pytest.fixture
def cat_data(tiny_synthetic: Dataset) -> Dataset:
    assert all(f.kind == "cat" for f in tiny_synthetic.schema.fields)  # what _embed assumes
    return tiny_synthetic


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
    got = np.asarray(anova_kernel(jnp.asarray(e, jnp.float32), 3))
    chex.assert_shape(got, (2, 3))
    np.testing.assert_allclose(got.sum(-1), brute, rtol=1e-4, atol=1e-5)
    # every order of one scan: A^0 = 1, A^1 = Σ e, A^F = Π e, A^t = 0 for t > F
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
    e = jnp.asarray(_emb(f=4, d=3))
    layer = KernelProduct()
    params = _random_variables(layer, e)
    k = np.asarray(params["params"]["kernel"])
    chex.assert_shape(k, (6, 3, 3))
    out = np.asarray(layer.apply(params, e))
    for p, (a, b) in enumerate(_pairs(4)):
        np.testing.assert_allclose(out[:, p], np.einsum("bk,kl,bl->b", e[:, a], k[p], e[:, b]),
                                   rtol=1e-4, atol=1e-5)


def _afm_reference(pairs: list[np.ndarray], w, bias, h) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over pairs of h^T ReLU(W v + b), then Σ a_p v_p -- one pair at a time."""
    scores = np.array([h @ np.maximum(v @ w + bias, 0.0) for v in pairs])
    a = np.exp(scores - scores.max())
    a /= a.sum()
    return a, sum(ai * v for ai, v in zip(a, pairs))


class TestAttentionalPooling(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_loop_over_pairs(self):
        e = _emb(b=2, f=4, d=3, seed=7)
        pairs = pairwise_products(jnp.asarray(e))
        layer = AttentionalPooling(attention_dim=5)
        params = _random_variables(layer, pairs)
        pooled, weights = self.variant(lambda p, x: layer.apply(p, x))(params, pairs)
        chex.assert_shape((pooled, weights), ((2, 3), (2, 6)))
        pa = params["params"]
        w, bias, h = (np.asarray(x) for x in (pa["W"]["kernel"], pa["W"]["bias"], pa["h"]["kernel"][:, 0]))
        for b in range(2):
            a, ref = _afm_reference([e[b, i] * e[b, j] for i, j in _pairs(4)], w, bias, h)
            np.testing.assert_allclose(np.asarray(weights[b]), a, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(np.asarray(pooled[b]), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- whole models


def test_afm_logits_equal_explicit_formula(cat_data: Dataset):
    s, batch = cat_data.schema, _batch(cat_data, 4)
    model = build_model("afm", s, attention_dim=6)
    v = _random_variables(model, batch)
    p = v["params"]
    e = _embed(p, batch)
    pa = p["attention"]
    w, bias, h = (np.asarray(x) for x in (pa["W"]["kernel"], pa["W"]["bias"], pa["h"]["kernel"][:, 0]))
    proj = np.asarray(p["p"]["kernel"])[:, 0]
    expect = _linear(p, batch)
    for b in range(4):
        _, pooled = _afm_reference([e[b, i] * e[b, j] for i, j in _pairs(s.num_fields)], w, bias, h)
        expect[b] += proj @ pooled
    np.testing.assert_allclose(_apply(model, v, batch), expect, rtol=1e-4, atol=1e-5)


def _order2(e):
    return sum(np.sum(e[:, i] * e[:, j], -1) for i, j in _pairs(e.shape[1]))


def _order3(e):
    return sum(np.sum(e[:, i] * e[:, j] * e[:, k], -1)
               for i, j, k in itertools.combinations(range(e.shape[1]), 3))


@pytest.mark.parametrize("reuse", [False, True])
def test_hofm_logits_equal_explicit_order_2_and_3_sums(reuse, cat_data: Dataset):
    batch = _batch(cat_data, 4)
    model = build_model("hofm", cat_data.schema, embedding_dim=3, reuse_embedding=reuse)
    v = _random_variables(model, batch)
    p = v["params"]
    assert ("embedding_3" in p) != reuse  # the paper's separate P^(3) table unless reused
    e2 = _embed(p, batch)
    e3 = e2 if reuse else _embed(p, batch, "embedding_3")
    np.testing.assert_allclose(_apply(model, v, batch), _linear(p, batch) + _order2(e2) + _order3(e3),
                               rtol=1e-4, atol=1e-5)


def test_nfm_without_hidden_layers_is_linear_plus_projected_bi_interaction(cat_data: Dataset):
    batch = _batch(cat_data, 4)
    model = build_model("nfm", cat_data.schema, hidden=())
    v = _random_variables(model, batch)
    p = v["params"]
    e = _embed(p, batch)
    h = np.asarray(p["out"]["kernel"])[:, 0]
    bi = sum(e[:, i] * e[:, j] for i, j in _pairs(e.shape[1]))
    np.testing.assert_allclose(_apply(model, v, batch), _linear(p, batch) + bi @ h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("ipnn", {}), ("opnn", {}), ("opnn", {"outer": "kernel"})])
def test_pnn_first_layer_sees_embeddings_then_products(name, kw, cat_data: Dataset):
    """With one linear hidden layer and no BN the logit is out(W [flatten(e), p] + b) in closed form."""
    batch = _batch(cat_data, 4)
    model = build_model(name, cat_data.schema, hidden=(3,), batch_norm=False, act="linear", **kw)
    v = _random_variables(model, batch)
    p = v["params"]
    e = _embed(p, batch)
    f, d = e.shape[1], e.shape[2]
    if name == "ipnn":
        prod = np.stack([np.sum(e[:, i] * e[:, j], -1) for i, j in _pairs(f)], 1)
    elif kw.get("outer") == "kernel":
        k = np.asarray(p["kernel_product"]["kernel"])
        prod = np.stack([np.einsum("bk,kl,bl->b", e[:, i], k[q], e[:, j])
                         for q, (i, j) in enumerate(_pairs(f))], 1)
    else:  # Σ_i Σ_j e_i e_j^T, flattened row-major
        prod = sum(np.einsum("bk,bl->bkl", e[:, i], e[:, j]) for i in range(f) for j in range(f)).reshape(4, d * d)
    x = np.concatenate([e.reshape(4, -1), prod], 1)
    w1, b1 = np.asarray(p["mlp"]["Dense_0"]["kernel"]), np.asarray(p["mlp"]["Dense_0"]["bias"])
    wo, bo = np.asarray(p["out"]["kernel"])[:, 0], float(p["out"]["bias"][0])
    np.testing.assert_allclose(_apply(model, v, batch), (x @ w1 + b1) @ wo + bo, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- counts, grads, errors


def _n_params(model, batch) -> int:
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)  # shapes only: nothing compiles
    return sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))


def _mlp_count(width_in: int, hidden: tuple[int, ...]) -> int:
    """The MLP with batch_norm=True: per layer a Dense without bias + BN scale and bias."""
    n, prev = 0, width_in
    for h in hidden:
        n += prev * h + 2 * h
        prev = h
    return n


def test_parameter_counts_by_formula(cat_data: Dataset):
    s, batch = cat_data.schema, _batch(cat_data, 4)
    t, d, f = s.table_size, 10, s.num_fields
    lin = t + 1  # one weight per feature + bias
    pairs = f * (f - 1) // 2
    hid, att = (7, 5), 6
    expect = [
        # embedding + linear + attention net (W, b; h) + projection p
        ("afm", dict(attention_dim=att), t * d + lin + (d * att + att) + att + d),
        ("hofm", {}, lin + 2 * t * d),  # order-2 and order-3 tables
        ("hofm", dict(order=4), lin + 3 * t * d),
        ("hofm", dict(reuse_embedding=True), lin + t * d),
        # embedding + linear + MLP on the d-vector + output without bias
        ("nfm", dict(hidden=hid), t * d + lin + _mlp_count(d, hid) + hid[-1]),
        ("nfm", dict(hidden=hid, bi_batch_norm=True), t * d + lin + 2 * d + _mlp_count(d, hid) + hid[-1]),
        # embedding + MLP on [F d flattened, products] + output with bias
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
    ("opnn", dict(hidden=(16, 8), outer="kernel")),
])
def test_finite_logits_and_grads(name, kw, tiny_synthetic: Dataset):
    """Parameters at the scales of the real initialisers (embeddings N(0, 1e-4^2), weights
    N(0, 1/fan_in), BN statistics 0/1), without compiling the initialisers; the real init is
    trained by ``test_training_smoke`` (whose ``fit`` fails on a non-finite loss)."""
    model = build_model(name, tiny_synthetic.schema, **kw)
    batch = _batch(tiny_synthetic, 16)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
    rng = np.random.default_rng(0)

    def fill(path, s):
        leaf = path[-1].key
        if leaf in ("table", "numeric"):
            scale = 1e-4
        elif leaf in ("kernel", "h"):
            scale = 1.0 / np.sqrt(s.shape[-2])
        else:
            scale = 0.1
        if leaf == "var":
            return jnp.ones(s.shape, s.dtype)
        if leaf == "mean":
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(scale * rng.normal(size=s.shape), s.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)

    @jax.jit  # one program for both forward passes and the gradient: one compile, not three
    def logits_and_grads(params):
        def loss(p):
            out, _ = model.apply({**variables, "params": p}, batch, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(1, impl="rbg")})
            return jnp.mean(out**2) + jnp.mean(out), out

        (_, train_logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return model.apply({**variables, "params": params}, batch), train_logits, grads

    logits, train_logits, grads = logits_and_grads(variables["params"])
    chex.assert_shape((logits, train_logits), ((16,), (16,)))
    chex.assert_tree_all_finite((logits, train_logits, grads))
    # the interaction's embeddings really receive gradient (not only the linear term)
    assert float(jnp.max(jnp.abs(grads["embedding"]["table"]))) > 0


def test_registry_defaults_and_errors(tiny_synthetic: Dataset):
    assert set(MODELS) <= set(available_models())
    for name in MODELS:
        assert model_summary(name) and model_options(name)["embedding_dim"] == 10
    assert model_options("afm")["attention_dim"] == 10
    assert model_options("hofm")["order"] == 3
    for name in ("nfm", "ipnn", "opnn"):
        assert model_options(name)["hidden"] == (400, 400, 400)
        assert model_options(name)["batch_norm"] is True
    assert model_options("opnn")["outer"] == "sum_pool"
    batch = _batch(tiny_synthetic, 2)
    with pytest.raises(ConfigError, match="order must be >= 2"):
        _n_params(build_model("hofm", tiny_synthetic.schema, order=1), batch)
    with pytest.raises(ConfigError, match="outer='cross'.*sum_pool"):
        _n_params(build_model("opnn", tiny_synthetic.schema, outer="cross"), batch)


# ---------------------------------------------------------------------------- training smoke


@pytest.fixture(scope="module")
def smoke_data():
    from dpn_jax.data.synthetic import make_synthetic

    data = make_synthetic(seed=0, rows=20_000, fields=4, vocab=10)
    # 16,000 train rows = 31.25 batches of 512: keep 31 full batches so the train step compiles
    # for ONE batch shape (a second shape doubles the compile time that dominates this test).
    return dataclasses.replace(data, train={k: v[: 31 * 512] for k, v in data.train.items()})


@pytest.mark.parametrize("name", MODELS)
def test_training_smoke(name, smoke_data):
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    kw = {} if name in ("afm", "hofm") else {"hidden": (32,)}  # small MLP: compile time
    model = build_model(name, smoke_data.schema, **kw)
    cfg = TrainConfig(batch_size=512, max_epochs=3, patience=5, bn_recalibrate_batches=4)
    res = fit(model, smoke_data, cfg, log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.6, res.test
