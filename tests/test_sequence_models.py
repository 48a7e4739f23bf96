"""Sequence DPO (dpn_jax.dpo.sequence), behaviour layers (dpn_jax.nn.sequence_layers) and the DIN
models (dpn_jax.models.sequence_family): numpy references, padding invariance, length-1
histories, finite gradients, parameter counts and a tiny training run."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seq_fixtures import (  # noqa: F401
    CATE_OF,
    MAX_LEN,
    N_CATES,
    N_ITEMS,
    append_padding,
    garbage_at_padding,
    jbatch,
    make_split,
    pad_more,
    random_variables,
    seq_schema,
    sequences,
    tiny_dataset,
)

from dpn_jax import dpo
from dpn_jax.data.schema import FieldInfo, Schema
from dpn_jax.dpo import sequence as sq
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.models.sequence_family import attention_groups, behaviour_pairs
from dpn_jax.nn.activations import Dice
from dpn_jax.nn.sequence_layers import DINAttention, DynamicConv, QueryBehaviourDPO

# ---------------------------------------------------------------------------------------------
# homogeneous DPO: dynamic depthwise convolution


def dynamic_conv_reference(p: sq.DynamicConvParams, x, mask, combine="add", normalize=True):
    """Direct loops over instances, steps and window offsets."""
    a, pl, pg, beta = (np.asarray(t, np.float64) for t in p)
    k, d = a.shape
    heads = beta.shape[0] // k
    r = k // 2
    b, length, _ = x.shape
    y = np.zeros((b, length, d))
    for n in range(b):
        valid = [j for j in range(length) if mask[n, j]]
        g = sum((x[n, j] for j in valid), np.zeros(d)) / max(len(valid), 1)
        for i in valid:
            u = np.zeros(d)
            for o in range(k):
                j = i + o - r
                if 0 <= j < length and mask[n, j]:
                    u += a[o] * x[n, j]
            s = (u @ pl + g @ pg) if combine == "add" else (u @ pl) * (g @ pg)
            s = (s + beta).reshape(heads, k)
            ok = np.array([0 <= i + o - r < length and mask[n, i + o - r] for o in range(k)])
            if normalize:
                e = np.where(ok, np.exp(s - s[:, ok].max(1, keepdims=True)), 0.0)
                w = e / e.sum(1, keepdims=True)
            else:
                w = np.where(ok, s, 0.0)
            for c in range(d):
                h = c // (d // heads)
                y[n, i, c] = sum(w[h, o] * x[n, i + o - r, c] for o in range(k) if ok[o])
    return y


def random_conv_params(d: int, k: int, heads: int, seed: int = 3) -> sq.DynamicConvParams:
    shapes = jax.eval_shape(lambda key: sq.init_dynamic_conv(key, d, k, heads),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.7 * rng.normal(size=s.shape), s.dtype), shapes)


@pytest.mark.parametrize("k,heads,combine,normalize", [
    (3, 0, "add", True), (5, 2, "mul", True), (3, 1, "add", False), (1, 4, "add", True)])
def test_dynamic_conv_matches_numpy_windowed_sum(k, heads, combine, normalize):
    x, mask = sequences(b=4, length=6, d=4)
    mask[0, 2] = False  # a hole in the middle of a history
    p = random_conv_params(4, k, heads)
    fn = jax.jit(sq.dynamic_conv, static_argnames=("combine", "normalize"))
    y = np.asarray(fn(p, garbage_at_padding(x, mask), mask, combine=combine, normalize=normalize))
    expect = dynamic_conv_reference(p, x, mask, combine, normalize)
    np.testing.assert_allclose(y, expect, rtol=2e-4, atol=2e-5)
    w = np.asarray(sq.dynamic_conv_weights(p, x, mask, combine=combine, normalize=normalize))
    chex.assert_shape(w, (4, 6, 4 if heads == 0 else heads, k))
    if normalize:  # softmax over the valid window slots: each valid step's kernel sums to 1
        np.testing.assert_allclose(w.sum(-1)[mask], 1.0, rtol=1e-5)
        assert (w[~mask] == 0).all()


def test_dynamic_conv_never_mixes_across_the_mask():
    x, mask = sequences(b=3, length=6, d=4)
    p = random_conv_params(4, 3, 0)
    conv = jax.jit(sq.dynamic_conv)
    y = np.asarray(conv(p, x, mask))
    # padded values (even huge) and appended padded steps change nothing; padded outputs are 0
    np.testing.assert_array_equal(np.asarray(conv(p, garbage_at_padding(x, mask), mask)), y)
    xx, mm = append_padding(x, mask)
    yy = np.asarray(conv(p, xx, mm))
    np.testing.assert_allclose(yy[:, :6], y, rtol=1e-6, atol=1e-7)
    assert (yy[:, 6:] == 0).all() and (y[~mask] == 0).all()
    # the last valid step of a history sees only valid neighbours: its window weights on the
    # padded slot are exactly zero
    w = np.asarray(jax.jit(sq.dynamic_conv_weights)(p, x, mask))
    assert (w[2, 2, :, 2] == 0).all() and (w[2, 2, :, :2] > 0).all()
    # a length-1 history maps to itself (softmax over a single valid slot)
    np.testing.assert_allclose(y[1, 0], x[1, 0], rtol=1e-6)
    # an empty history: zeros, and finite gradients through every padded configuration
    assert (y[~mask.any(1)] == 0).all()
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(sq.dynamic_conv(p, x, mask) ** 2),
                         argnums=(0, 1)))(p, x)
    chex.assert_tree_all_finite(g)
    assert (np.asarray(g[1])[~mask] == 0).all()  # no gradient reaches a padded value


def test_dynamic_conv_errors():
    with pytest.raises(ConfigError, match="odd"):
        sq.windows(jnp.zeros((1, 3, 2)), 4)
    with pytest.raises(ConfigError, match="divide"):
        sq.init_dynamic_conv(jax.random.key(0), 6, 3, 4)
    p = random_conv_params(4, 3, 0)
    with pytest.raises(ConfigError, match="combine"):
        sq.dynamic_conv(p, jnp.zeros((1, 3, 4)), jnp.ones((1, 3), bool), combine="concat")


# ---------------------------------------------------------------------------------------------
# heterogeneous DPO: query-generated kernel applied to every behaviour


def random_generator_params(gen, seed: int = 2):
    shapes = jax.eval_shape(gen.init, jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("family", ["lowrank", "mixture", "hyperdense", "rank1"])
def test_query_behaviour_dpo_equals_materialised_kernel(family, materialize):
    """Both evaluations (per-instance kernel, fused coefficients) equal ``W(q) x_i + b(q)``."""
    x, mask = sequences(b=3, length=5, d=4)
    q = np.random.default_rng(4).normal(size=(3, 3)).astype(np.float32)
    gen = dpo.make_generator(family, 4, 6, 3, rank=2)
    params = random_generator_params(gen)
    y = np.asarray(jax.jit(lambda p, x, q, m: sq.query_behaviour_apply(
        gen, p, x, q, m, materialize=materialize))(params, garbage_at_padding(x, mask), q, mask))
    w, b = (np.asarray(t) for t in sq.query_behaviour_kernels(gen, params, jnp.asarray(q)))
    expect = np.einsum("bnm,blm->bln", w, x) + b[:, None]
    expect = np.where(mask[..., None], expect, 0)
    np.testing.assert_allclose(y, expect, rtol=1e-4, atol=1e-5)
    # without a mask every step is valid
    y_all = np.asarray(sq.query_behaviour_apply(gen, params, x, q, materialize=materialize))
    np.testing.assert_allclose(y_all, np.einsum("bnm,blm->bln", w, x) + b[:, None],
                               rtol=1e-4, atol=1e-5)


def din_features_reference(q, keys):
    qb = np.broadcast_to(q[:, None], keys.shape)
    return np.concatenate([qb, keys, qb - keys, qb * keys], -1)


class TestDINFeaturesDense(chex.TestCase):
    """``[q, k, q−k, q⊙k] W + b`` computed as ``c(q) + k M(q)`` equals the concatenated form."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_static_and_per_instance_kernels(self):
        rng = np.random.default_rng(11)
        b, length, d, n = 3, 5, 4, 6
        q = rng.normal(size=(b, d)).astype(np.float32)
        keys = rng.normal(size=(b, length, d)).astype(np.float32)
        feats = din_features_reference(q, keys)
        np.testing.assert_allclose(np.asarray(sq.din_features(q, keys)), feats, rtol=1e-6)
        w = rng.normal(size=(4 * d, n)).astype(np.float32)
        bias = rng.normal(size=(n,)).astype(np.float32)
        y = self.variant(sq.din_features_dense)(q, keys, w, bias)
        np.testing.assert_allclose(np.asarray(y), feats @ w + bias, rtol=1e-5, atol=1e-5)
        wb = rng.normal(size=(b, 4 * d, n)).astype(np.float32)
        bb = rng.normal(size=(b, n)).astype(np.float32)
        y = self.variant(sq.din_features_dense)(q, keys, wb, bb)
        np.testing.assert_allclose(np.asarray(y), np.einsum("blm,bmn->bln", feats, wb) + bb[:, None],
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="4 x the behaviour size"):
            sq.din_features_dense(q, keys, w[:-1], bias)


@pytest.mark.parametrize("family", ["lowrank", "hyperdense", "mixture"])
def test_query_behaviour_din_apply_equals_the_dpo_on_din_features(family):
    keys, mask = sequences(b=3, length=5, d=4)
    q = np.random.default_rng(4).normal(size=(3, 4)).astype(np.float32)
    z = np.random.default_rng(5).normal(size=(3, 2)).astype(np.float32)
    gen = dpo.make_generator(family, 16, 6, 2, rank=2)
    params = random_generator_params(gen)
    y = jax.jit(lambda p, z, q, k, m: sq.query_behaviour_din_apply(gen, p, z, q, k, m))(
        params, z, q, garbage_at_padding(keys, mask), mask)
    w, b = (np.asarray(t) for t in sq.query_behaviour_kernels(gen, params, jnp.asarray(z)))
    feats = din_features_reference(q, np.where(mask[..., None], keys, 0))
    expect = np.where(mask[..., None], np.einsum("bnm,blm->bln", w, feats) + b[:, None], 0)
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-4, atol=1e-5)


def test_din_first_layer_initialises_like_dense():
    """The decomposed first layer keeps ``nn.Dense``'s names and initial values (checkpoints and
    seeds written before it load and reproduce)."""
    import flax.linen as nn

    from dpn_jax.nn.sequence_layers import DINFeaturesDense

    q, keys = jnp.ones((2, 3)), jnp.ones((2, 4, 3))
    mine = DINFeaturesDense(5).init(jax.random.key(1), q, keys)
    dense = nn.Dense(5).init(jax.random.key(1), jnp.ones((2, 12)))
    chex.assert_trees_all_equal(mine, dense)


# ---------------------------------------------------------------------------------------------
# Linen layers: DIN attention against numpy, padding invariance of every layer


def din_attention_reference(p, q, keys, mask, norm="none", scale=True):
    sig = lambda t: 1.0 / (1.0 + np.exp(-t))  # noqa: E731
    qb = np.broadcast_to(q[:, None], keys.shape)
    h = np.concatenate([qb, keys, qb - keys, qb * keys], -1)
    h = sig(h @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    h = sig(h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"])
    s = (h @ p["score"]["kernel"] + p["score"]["bias"])[..., 0]
    if norm == "sigmoid":
        s = sig(s)
    if norm == "softmax":
        s = np.where(mask, s / np.sqrt(keys.shape[-1]) if scale else s, -np.inf)
        top = np.where(mask.any(1), s.max(1), 0.0)[:, None]  # empty history: all weights 0
        e = np.where(mask, np.exp(s - top), 0.0)
        s = e / np.maximum(e.sum(1, keepdims=True), 1e-30)
    a = np.where(mask, s, 0.0)
    return np.einsum("bl,bld->bd", a, np.where(mask[..., None], keys, 0.0)), a


class TestDINAttention(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        keys, mask = sequences(b=4, length=6, d=4)
        q = np.random.default_rng(7).normal(size=(4, 4)).astype(np.float32)
        for norm, scale in (("none", True), ("softmax", True), ("softmax", False),
                            ("sigmoid", True)):
            layer = DINAttention(hidden=(5, 3), weight_norm=norm, scale=scale)
            v = random_variables(layer.init, q, keys, mask)
            apply = self.variant(functools.partial(layer.apply, return_weights=True))
            out, a = apply(v, q, garbage_at_padding(keys, mask), mask)
            p = jax.tree.map(np.asarray, v["params"])
            exp_out, exp_a = din_attention_reference(p, q, keys, mask, norm, scale)
            np.testing.assert_allclose(np.asarray(out), exp_out, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(a), exp_a, rtol=1e-4, atol=1e-5)
            assert (np.asarray(out)[3] == 0).all()  # empty history pools to zeros


def _layer_cases():
    q = np.random.default_rng(7).normal(size=(4, 4)).astype(np.float32)
    return [
        ("din_sigmoid", DINAttention(hidden=(5, 3)), lambda x, m: (q, x, m)),
        ("din_dice", DINAttention(hidden=(5,), act="dice"), lambda x, m: (q, x, m)),
        ("din_dpo", DINAttention(hidden=(5, 3), act="prelu", dpo=True),
         lambda x, m: (q, x, m)),
        ("din_dpo_behaviour", DINAttention(hidden=(5,), dpo=True, dpo_input="behaviour",
                                           weight_norm="softmax"), lambda x, m: (q, x, m)),
        ("query_behaviour_dpo", QueryBehaviourDPO(3, rank=2), lambda x, m: (x, q, m)),
        ("dynamic_conv", DynamicConv(kernel_size=3), lambda x, m: (x, m)),
        ("dynamic_conv_mul", DynamicConv(kernel_size=5, heads=2, combine="mul"),
         lambda x, m: (x, m)),
    ]


@pytest.mark.parametrize("name,layer,args", _layer_cases(), ids=[c[0] for c in _layer_cases()])
def test_every_layer_is_padding_invariant(name, layer, args):
    x, mask = sequences(b=4, length=6, d=4)
    v = random_variables(layer.init, *args(x, mask))
    train = isinstance(layer, DINAttention)

    @jax.jit
    def run(x, m):
        if train:  # train mode: Dice's batch statistics must ignore padded steps too
            return layer.apply(v, *args(x, m), train=True, mutable=["batch_stats"])
        return layer.apply(v, *args(x, m)), {}

    ref, stats = run(x, mask)
    chex.assert_tree_all_finite(ref)
    for xx, mm in ((garbage_at_padding(x, mask), mask), append_padding(x, mask)):
        out, st = run(xx, mm)
        out = np.asarray(out)
        if out.ndim == 3:  # per-step outputs: the appended steps are zero
            assert (out[:, 6:] == 0).all() and (out[:, :6][~mask] == 0).all()
            out = out[:, :6]
        np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(st, stats, rtol=1e-5, atol=1e-7)


def test_dice_matches_formula_and_prelu_alpha():
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    dice = Dice()
    v = random_variables(dice.init, x)
    y, upd = dice.apply(v, x, train=True, mutable=["batch_stats"])
    alpha = np.asarray(v["params"]["alpha"])
    z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-8)
    p = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(np.asarray(y), p * x + (1 - p) * alpha * x, rtol=1e-4, atol=1e-5)
    mean = np.asarray(upd["batch_stats"]["bn"]["mean"])
    np.testing.assert_allclose(mean, 0.9 * np.asarray(v["batch_stats"]["bn"]["mean"])
                               + 0.1 * x.mean(0), rtol=1e-4, atol=1e-6)
    # inference uses the running statistics
    rm, rv = np.asarray(v["batch_stats"]["bn"]["mean"]), np.asarray(v["batch_stats"]["bn"]["var"])
    p = 1 / (1 + np.exp(-(x - rm) / np.sqrt(rv + 1e-8)))
    np.testing.assert_allclose(np.asarray(dice.apply(v, x)), p * x + (1 - p) * alpha * x,
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# models


SMALL = dict(embedding_dim=4, hidden=(8, 4), attention_hidden=(6, 3))
MODEL_CASES = [
    ("din", {}),
    ("din", dict(attention_act="dice", attention_groups="pair", attention_norm="softmax")),
    ("din", dict(act="relu", batch_norm=True, dropout=0.1)),
    ("din_dpo", dict(dpo_input="behaviour", generator="mixture", attention_act="prelu")),
]


def test_schema_pairs_and_groups():
    s = seq_schema()
    assert behaviour_pairs(s) == (("item", "hist"), ("cate", "hist_cate"))
    assert attention_groups(s, "joint") == [(("item", "hist"), ("cate", "hist_cate"))]
    assert attention_groups(s, "pair") == [(("item", "hist"),), (("cate", "hist_cate"),)]
    with pytest.raises(ConfigError, match="attention_groups"):
        attention_groups(s, "both")
    opts = model_options("din")  # the DIN defaults documented in the docstring
    assert (opts["hidden"], opts["act"], opts["batch_norm"], opts["attention_hidden"],
            opts["attention_act"], opts["attention_norm"]) == (
        (200, 80), "dice", False, (80, 40), "sigmoid", "none")
    assert model_options("din_dpo")["generator"] == "lowrank"


class TestModels(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_finite_gradients(self):
        batch = jbatch(make_split(16, 3))
        # without jit this costs ~25 s on a busy CPU: op-by-op compiles of the first model
        for name in ("din", "din_dpo"):
            model = build_model(name, seq_schema(), **SMALL)
            v = random_variables(model.init, batch)

            def loss(params, batch, model=model, v=v):
                out, _ = model.apply({**v, "params": params}, batch, train=True,
                                     mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.PRNGKey(1)})
                return jnp.mean(out ** 2)

            logits = self.variant(model.apply)(v, batch)
            chex.assert_shape(logits, (16,))
            chex.assert_tree_all_finite(logits)
            g = self.variant(jax.grad(loss))(v["params"], batch)
            chex.assert_tree_all_finite(g)
            # the attention unit is used: its parameters receive gradient
            assert np.abs(np.asarray(g["attention_0"]["score"]["kernel"])).sum() > 0


@pytest.mark.parametrize("name,kw", MODEL_CASES)
def test_models_are_padding_invariant(name, kw):
    schema = seq_schema()
    model = build_model(name, schema, **SMALL, **kw)
    split = make_split(12, 4)
    v = random_variables(model.init, jbatch(split))
    # move the pad rows: their values must not matter (the target never uses local id 0)
    table = np.asarray(v["params"]["embedding"]["table"]).copy()
    table[[0, N_ITEMS + 6]] += 100.0
    v_pad = {**v, "params": {**v["params"], "embedding": {"table": jnp.asarray(table)}}}
    longer = build_model(name, seq_schema(MAX_LEN + 3), **SMALL, **kw)
    rngs = {"dropout": jax.random.PRNGKey(2)}

    def run(m, v, b):  # inference logits, and train-mode logits with the new batch statistics
        return m.apply(v, b), m.apply(v, b, train=True, mutable=["batch_stats"], rngs=rngs)

    short = jax.jit(functools.partial(run, model))
    ref = short(v, jbatch(split))
    chex.assert_trees_all_close(short(v_pad, jbatch(split)), ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(functools.partial(run, longer))(
        v, jbatch(pad_more(split, 3))), ref, rtol=1e-5, atol=1e-6)


def test_length_one_and_empty_histories():
    schema = seq_schema()
    split = make_split(6, 5)
    for key, pad in (("hist", 0), ("hist_cate", N_ITEMS + 6)):
        split[f"seq/{key}"][:, 1:] = pad
        split[f"seq/{key}"][3:, 0] = pad  # rows 3.. have an empty history
    split["seq/hist"][:3, 0] = [2, 5, 7]
    split["seq/hist_cate"][:3, 0] = N_ITEMS + 6 + CATE_OF[[2, 5, 7]]
    for name in ("din", "din_dpo"):
        model = build_model(name, schema, **SMALL)
        v = random_variables(model.init, jbatch(split))
        apply = jax.jit(model.apply)
        out = np.asarray(apply(v, jbatch(split)))
        chex.assert_tree_all_finite(out)
        # a one-step history matters; an empty one pools to zeros (all empty rows alike up to
        # their other fields)
        other = {**split, "seq/hist": split["seq/hist"].copy()}
        other["seq/hist"][:3, 0] = [3, 6, 8]
        out_other = np.asarray(apply(v, jbatch(other)))
        assert not np.allclose(out_other[:3], out[:3])
        np.testing.assert_allclose(out_other[3:], out[3:])
    # the dynamic convolution on a length-1 history is the identity
    conv = DynamicConv()
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    m = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], bool)
    y = np.asarray(jax.jit(conv.apply)(random_variables(conv.init, x, m), x, m))
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)


@pytest.mark.parametrize("name", ["din", "din_dpo", "dien", "dien_dpo", "kfatt", "bst", "bst_dpo",
                                  "dyjoint"])
def test_embedding_init_std_sets_the_table_init(name):
    """1e-4 by default (FuxiCTR's); experiments/dien_probe.py shows what it does to attention."""
    assert model_options(name)["embedding_init_std"] == 1e-4
    batch = jbatch(make_split(4, 0))
    for std in (1e-4, 0.05):
        model = build_model(name, seq_schema(), embedding_dim=4, embedding_init_std=std)
        table = model.init(jax.random.PRNGKey(0), batch)["params"]["embedding"]["table"]
        np.testing.assert_allclose(np.std(np.asarray(table)), std, rtol=0.15)


def test_din_parameter_count():
    d, h1, h2, a1, a2 = 4, 8, 4, 6, 3
    schema = seq_schema()
    model = build_model("din", schema, **SMALL)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jbatch(make_split(4, 0)))
    n = sum(x.size for x in jax.tree_util.tree_leaves(v["params"]))
    q = 2 * d  # joint unit over [item, cate]
    attention = (4 * q * a1 + a1) + (a1 * a2 + a2) + (a2 + 1)
    fields = 5
    tower = (fields * d * h1 + h1 + h1) + (h1 * h2 + h2 + h2)  # dense + Dice alpha per layer
    assert n == schema.table_size * d + attention + tower + (h2 + 1)
    stats = jax.tree_util.tree_leaves(v["batch_stats"])  # Dice: running mean/var per layer
    assert sum(x.size for x in stats) == 2 * (h1 + h2)


def test_din_dpo_contains_din():
    """With its dynamic part zero and its static kernel DIN's first layer, din_dpo IS din."""
    schema = seq_schema()
    batch = jbatch(make_split(10, 6))
    din = build_model("din", schema, **SMALL)
    armed = build_model("din_dpo", schema, **SMALL)
    v = random_variables(din.init, batch)
    va = random_variables(armed.init, batch, seed=3)
    p = jax.tree.map(np.asarray, va["params"])
    dense0 = v["params"]["attention_0"]["dense_0"]
    dp = dict(p["attention_0"]["dpo_0"])
    kernel = np.zeros_like(dp["kernel"])
    kernel[:, 0] = dense0["kernel"]
    bias = np.zeros_like(dp["bias"])
    bias[0] = dense0["bias"]
    dp.update(kernel=kernel, bias=bias)
    att = {k: w for k, w in v["params"]["attention_0"].items() if k != "dense_0"}
    params = {**v["params"], "attention_0": {**att, "dpo_0": dp}}
    out_armed = jax.jit(armed.apply)({**v, "params": params}, batch)
    np.testing.assert_allclose(np.asarray(out_armed), np.asarray(jax.jit(din.apply)(v, batch)),
                               rtol=1e-5, atol=1e-6)


def test_din_without_behaviours_is_a_tower():
    schema = Schema(fields=(FieldInfo("a", "cat", column=0, offset=0, vocab_size=4),), table_size=4)
    model = build_model("din", schema, **SMALL)
    batch = {"cat": jnp.array([[2], [3]], jnp.int32), "num": jnp.zeros((2, 0)),
             "label": jnp.zeros(2)}
    v = random_variables(model.init, batch)
    assert "attention_0" not in v["params"]
    chex.assert_shape(jax.jit(model.apply)(v, batch), (2,))
    with pytest.raises(ConfigError, match="activation"):
        jax.eval_shape(build_model("din", schema, act="swish").init, jax.random.PRNGKey(0), batch)
    for name in ("din", "din_dpo"):  # the error names the model option, not DINAttention's field
        with pytest.raises(ConfigError, match=r"din/din_dpo: attention_norm='l1'.*softmax"):
            jax.eval_shape(build_model(name, schema, attention_norm="l1").init, jax.random.PRNGKey(0), batch)


def test_training_reduces_the_loss():
    from dpn_jax.metrics import logloss_from_logits
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    data = tiny_dataset()
    model = build_model("din", data.schema, embedding_dim=8, hidden=(32, 16),
                        attention_hidden=(16, 8))
    cfg = TrainConfig(batch_size=150, max_epochs=4, patience=4, lr=3e-3, eval_batch_size=1000,
                      bn_recalibrate=False)
    res = fit(model, data, cfg, log=lambda s: None, progress=False)
    rate = float(data.train["label"].mean())  # the best constant predictor
    prior = logloss_from_logits(data.valid["label"],
                                np.full(1000, np.log(rate / (1 - rate)), np.float32))
    assert res.valid["logloss"] < prior - 0.02, (prior, res.history)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.03, res.history
    assert res.test["auc"] > 0.6, res.history
