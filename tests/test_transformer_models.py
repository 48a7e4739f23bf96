"""Transformer-style behaviour layers (dpn_jax.nn.transformer_layers) and models (kfatt, bst,
bst_dpo, dyjoint in dpn_jax.models.transformer_family): numpy references of the attentions and of
the Kalman posterior mean, padding invariance, short/empty histories, gradients, parameter counts
and a short training run."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seq_fixtures import (
    CATE_OF,
    MAX_LEN,
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

from dpn_jax.dpo import sequence as sq
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.nn.sequence_layers import QueryBehaviourDPO
from dpn_jax.nn.transformer_layers import (
    DECODERS,
    ENCODERS,
    BehaviourTransformer,
    EncoderBlock,
    KalmanAttention,
    MultiHeadSelfAttention,
    TargetAttention,
    TransformerEncoder,
    duplicate_counts,
    masked_softmax,
)

PAD_CATE = N_ITEMS + 6  # the category history's pad id (local 0 of "cate")

# ---------------------------------------------------------------------------------------------
# numpy references (float64)


def np64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def softmax_valid(s, mask):
    """Softmax over the last axis restricted to ``mask``; rows without a valid entry give 0."""
    mask = np.broadcast_to(mask, s.shape)
    top = np.where(mask, s, -np.inf).max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(mask, np.exp(np.where(mask, s, 0.0) - top), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def mhsa_reference(p, x, mask, heads):
    b, length, d = x.shape
    dh = d // heads
    x = np.where(mask[..., None], x, 0.0)
    q, k, v = (dense(p[n], x).reshape(b, length, heads, dh) for n in ("query", "key", "value"))
    s = np.einsum("bihc,bjhc->bhij", q, k) / np.sqrt(dh)
    a = softmax_valid(s, mask[:, None, None, :])
    o = np.einsum("bhij,bjhc->bihc", a, v).reshape(b, length, d)
    return np.where(mask[..., None], dense(p["out"], o), 0.0)


def target_attention_reference(p, q, x, mask, heads, values=None):
    b, length, d = x.shape
    dh = d // heads
    x = np.where(mask[..., None], x, 0.0)
    qh = dense(p["query"], q).reshape(b, heads, dh)
    k = dense(p["key"], x).reshape(b, length, heads, dh)
    v = (dense(p["value"], x) if values is None else values).reshape(b, length, heads, dh)
    a = softmax_valid(np.einsum("bhc,blhc->bhl", qh, k) / np.sqrt(dh), mask[:, None, :])
    return dense(p["out"], np.einsum("bhl,blhc->bhc", a, v).reshape(b, d)), a


def layer_norm(p, x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def kalman_reference(p, q, x, mask, heads, counts=None):
    """The posterior mean in its ratio form (paper): Σ of precision-weighted means."""
    b, length, d = x.shape
    dh = d // heads
    x = np.where(mask[..., None], x, 0.0)
    qh = dense(p["query"], q).reshape(b, heads, dh)
    k = dense(p["key"], x).reshape(b, length, heads, dh)
    v = dense(p["value"], x).reshape(b, length, heads, dh)
    mu = dense(p["prior_mean"], q).reshape(b, heads, dh)
    var_q = np.exp(dense(p["prior_logvar"], q))  # [B,H]
    var = np.exp(dense(p["measurement_logvar"], x))  # [B,L,H] σ_i²
    if counts is not None:  # KFAtt-freq: n_i σ̃_i² + σ_i²
        var = counts[..., None] * np.exp(dense(p["system_logvar"], x)) + var
    phi = np.exp(np.einsum("bhc,blhc->bhl", qh, k) / np.sqrt(dh))
    w = np.where(mask[:, None, :], phi / var.transpose(0, 2, 1), 0.0)  # [B,H,L]
    num = mu / var_q[..., None] + np.einsum("bhl,blhc->bhc", w, v)
    den = 1.0 / var_q + w.sum(-1)
    return dense(p["out"], (num / den[..., None]).reshape(b, d))


def counts_reference(ids, mask):
    ids = ids if ids.ndim == 3 else ids[..., None]
    n = np.ones(mask.shape)
    for r, i in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
        if mask[r, i]:
            n[r, i] = sum(mask[r, j] and (ids[r, j] == ids[r, i]).all()
                          for j in range(mask.shape[1]))
    return n


def holed(mask):
    mask = mask.copy()
    mask[0, 2] = False  # a hole in the middle of the full history
    return mask


# ---------------------------------------------------------------------------------------------
# layers against numpy


def test_masked_softmax_rows_and_gradients():
    s = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], bool)
    softmax = jax.jit(masked_softmax)
    p = np.asarray(softmax(s, mask))
    np.testing.assert_allclose(p, softmax_valid(s.astype(np.float64), mask), rtol=1e-6, atol=1e-7)
    assert (p[1] == 0).all() and p[2, 2] == 1.0
    # padded logits (even inf / nan) change nothing, and every gradient stays finite
    bad = np.where(mask, s, np.array([np.inf, -np.inf, np.nan, 1e30, -1e30])[None])
    np.testing.assert_array_equal(np.asarray(softmax(bad, mask)), p)
    g = jax.jit(jax.grad(lambda s: jnp.sum(masked_softmax(s, mask) * jnp.arange(5.0))))(s)
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[~mask] == 0).all()
    assert (np.asarray(g)[2] == 0).all()  # one valid entry: its weight is constant 1


def test_self_and_target_attention_match_numpy():
    x, mask = sequences(b=4, length=6, d=8)
    q = np.random.default_rng(7).normal(size=(4, 5)).astype(np.float32)
    mhsa, att = MultiHeadSelfAttention(heads=2), TargetAttention(heads=4)
    run_mhsa = jax.jit(mhsa.apply)
    run_att = jax.jit(functools.partial(att.apply, return_weights=True))
    for m in (mask, holed(mask)):
        xg = garbage_at_padding(x, m)
        v = random_variables(mhsa.init, x, m)
        y = np.asarray(run_mhsa(v, xg, m))
        np.testing.assert_allclose(y, mhsa_reference(np64(v["params"]), x, m, 2),
                                   rtol=2e-4, atol=2e-5)
        v = random_variables(att.init, q, x, m, seed=2)
        out, a = run_att(v, q, xg, m)
        exp_out, exp_a = target_attention_reference(np64(v["params"]), q, x, m, 4)
        np.testing.assert_allclose(np.asarray(out), exp_out, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(a), exp_a, rtol=2e-4, atol=2e-6)
        # the empty history (row 3) attends to nothing: out = b_o
        np.testing.assert_allclose(np.asarray(out)[3], v["params"]["out"]["bias"], rtol=1e-6)
    # heterogeneous-DPO values (sDPN decoder): V_i = W(q) x_i + b(q) from the DPO layer
    att = TargetAttention(heads=2, value_dpo=True, rank=2)
    v = random_variables(att.init, q, x, mask, seed=3)
    out = np.asarray(jax.jit(att.apply)(v, q, garbage_at_padding(x, mask), mask))
    p = v["params"]
    values = QueryBehaviourDPO(8, rank=2).apply({"params": p["value_dpo"]}, x, q, mask)
    exp_out, _ = target_attention_reference(np64(p), q, x, mask, 2, np.asarray(values, np.float64))
    np.testing.assert_allclose(out, exp_out, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_block_of_summed_branches(norm_first):
    """``mhsa+dpo``, zero at padding, the same parameters in both layouts.  Post-LN:
    u = LN_1(x + MHSA(x) + DynamicConv(x)), y = LN_2(u + FFN(u)).  Pre-LN (``norm_first``):
    u = x + MHSA(LN_1(x)) + DynamicConv(LN_1(x)), y = u + FFN(LN_2(u))."""
    x, mask = sequences(b=4, length=6, d=8)
    mask = holed(mask)
    block = EncoderBlock(heads=2, ffn_dim=5, encoder="mhsa+dpo", kernel_size=3,
                         norm_first=norm_first)
    v = random_variables(block.init, x, mask)
    y = np.asarray(jax.jit(block.apply)(v, garbage_at_padding(x, mask), mask))
    p = np64(v["params"])
    conv = sq.DynamicConvParams(*(v["params"]["dynamic_conv"][f]
                                  for f in sq.DynamicConvParams._fields))
    valid = mask[..., None]
    xm = np.where(valid, x, 0.0)
    a = np.where(valid, layer_norm(p["ln_1"], xm), 0.0) if norm_first else x
    u = xm + mhsa_reference(p["self_attention"], a, mask, 2) + np.asarray(
        jax.jit(sq.dynamic_conv)(conv, np.asarray(a, np.float32), mask), np.float64)
    u = np.where(valid, u if norm_first else layer_norm(p["ln_1"], u), 0.0)
    a = np.where(valid, layer_norm(p["ln_2"], u), 0.0) if norm_first else u
    f = dense(p["ffn_1"], np.maximum(dense(p["ffn_0"], a), 0.0))
    expect = np.where(valid, u + f if norm_first else layer_norm(p["ln_2"], u + f), 0.0)
    np.testing.assert_allclose(y, expect, rtol=2e-4, atol=2e-5)
    assert set(p) == {"self_attention", "dynamic_conv", "ln_1", "ln_2", "ffn_0", "ffn_1"}


def test_encoder_positions():
    """Learned positions are added at the valid steps (index in the history; steps beyond
    ``max_positions`` share the last row); padded steps stay zero."""
    x, mask = sequences(b=4, length=6, d=8)
    mask = holed(mask)
    enc = TransformerEncoder(blocks=0, max_positions=4)
    v = random_variables(enc.init, x, mask)
    y = np.asarray(jax.jit(enc.apply)(v, garbage_at_padding(x, mask), mask))
    pos = np.asarray(v["params"]["position"])
    assert pos.shape == (4, 8)
    expect = np.where(mask[..., None], x + pos[[0, 1, 2, 3, 3, 3]][None], 0.0)
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Kalman filtering attention


def _kalman_case():
    """Histories with duplicated items: row 0 full, row 1 length 3, row 2 with a hole hiding a
    duplicate (it must not count), row 3 empty.  Equal ids carry equal embeddings."""
    rng = np.random.default_rng(11)
    table = rng.normal(size=(12, 8)).astype(np.float32)
    ids = np.array([[3, 5, 3, 7, 3, 5], [4, 4, 9, 0, 0, 0], [6, 6, 6, 8, 0, 0],
                    [0, 0, 0, 0, 0, 0]])
    mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0] * 6], bool)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    return q, table[ids], mask, ids


def test_duplicate_counts():
    _, _, mask, ids = _kalman_case()
    n = np.asarray(duplicate_counts(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(n, counts_reference(ids, mask))
    assert n[0].tolist() == [3, 2, 3, 1, 3, 2] and n[2, 0] == 2  # the hidden 6 does not count
    # a group: steps are duplicates when every history's id is equal
    ids2 = np.stack([ids, np.where(np.arange(6) == 4, 1, ids)], -1)
    n2 = np.asarray(duplicate_counts(jnp.asarray(ids2), jnp.asarray(mask)))
    np.testing.assert_array_equal(n2, counts_reference(ids2, mask))
    assert n2[0].tolist() == [2, 2, 2, 1, 1, 2]


def _with(params, name, kernel=0.0, bias=None):
    """``params`` with layer ``name`` set to a constant kernel and bias."""
    layer = params[name]
    new = {"kernel": jnp.full_like(layer["kernel"], kernel),
           "bias": jnp.full_like(layer["bias"], 0.0 if bias is None else bias)}
    return {**params, name: new}


def test_kalman_attention_matches_the_posterior_mean():
    q, x, mask, ids = _kalman_case()
    xg = garbage_at_padding(x, mask)
    counts = np.asarray(duplicate_counts(jnp.asarray(ids), jnp.asarray(mask)))
    base = KalmanAttention(heads=2, frequency_capping=False)
    freq = KalmanAttention(heads=2, frequency_capping=True)
    vf = random_variables(freq.init, q, x, mask, counts, seed=4)
    pf = vf["params"]
    pb = {k: w for k, w in pf.items() if k != "system_logvar"}
    assert set(pb) == set(random_variables(base.init, q, x, mask)["params"])
    run_b = jax.jit(functools.partial(base.apply, return_weights=True))
    run_f = jax.jit(functools.partial(freq.apply, return_weights=True))

    # KFAtt-base: the ratio formula; the weights [prior, behaviours] sum to one per head
    out_b, (wp, w) = run_b({"params": pb}, q, xg, mask)
    np.testing.assert_allclose(np.asarray(out_b), kalman_reference(np64(pb), q, x, mask, 2),
                               rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(wp) + np.asarray(w).sum(-1), 1.0, rtol=1e-5)
    assert (np.asarray(w)[np.broadcast_to(~mask[:, None], w.shape)] == 0).all()

    # KFAtt-freq with duplicated items: the formula with n_i σ̃_i² + σ_i²
    out_f, _ = run_f(vf, q, xg, mask, counts)
    expect_f = kalman_reference(np64(pf), q, x, mask, 2, counts)
    np.testing.assert_allclose(np.asarray(out_f), expect_f, rtol=2e-4, atol=2e-5)
    # ... and the counts matter (row 3 is empty: no behaviour, no difference)
    out_1, _ = run_f(vf, q, xg, mask, np.ones_like(counts))
    assert np.abs(np.asarray(out_1) - np.asarray(out_f))[:3].min(-1).max() > 1e-4

    # No duplicates (n_i = 1): freq = base with σ_i² replaced by σ̃_i² + σ_i².  It differs from
    # base only through σ̃: with σ̃² = exp(-1e4) = 0 it IS base, otherwise it differs.
    np.testing.assert_allclose(
        np.asarray(out_1), kalman_reference(np64(pf), q, x, mask, 2, np.ones_like(counts)),
        rtol=2e-4, atol=2e-5)
    assert np.abs(np.asarray(out_1) - np.asarray(out_b))[:3].max() > 1e-3
    p0 = _with(pf, "system_logvar", 0.0, -1e4)
    out_0, _ = run_f({"params": p0}, q, xg, mask, np.ones_like(counts))
    np.testing.assert_allclose(np.asarray(out_0), np.asarray(out_b), rtol=1e-6, atol=1e-6)

    # An empty history (row 3) is the prior mean μ_q (through the output projection)
    p = np64(pf)
    mu_out = dense(p["out"], dense(p["prior_mean"], q.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(out_b)[3], mu_out[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_f)[3], mu_out[3], rtol=1e-5, atol=1e-6)
    assert (np.asarray(wp)[3] == 1).all()


def test_kalman_attention_without_prior_is_softmax_attention():
    """σ_q² → ∞ (prior log-variance 1e4: prior logit −1e4) and equal σ_i (constant measurement
    log-variance): KFAtt-base is the plain multi-head target attention with its q/k/v/out
    projections (on every non-empty history); so is KFAtt-freq without duplicates and σ̃ = 0."""
    q, x, mask, ids = _kalman_case()
    kf = KalmanAttention(heads=2, frequency_capping=False)
    v = random_variables(kf.init, q, x, mask, seed=5)
    p = _with(_with(v["params"], "prior_logvar", 0.0, 1e4), "measurement_logvar", 0.0, 0.7)
    att = TargetAttention(heads=2)
    pa = {k: p[k] for k in ("query", "key", "value", "out")}
    expect = np.asarray(jax.jit(att.apply)({"params": pa}, q, x, mask))
    got = np.asarray(jax.jit(kf.apply)({"params": p}, q, garbage_at_padding(x, mask), mask))
    np.testing.assert_allclose(got[:3], expect[:3], rtol=1e-5, atol=1e-6)
    # an empty history is still the (now weightless-looking) prior: the only slot
    assert np.isfinite(got).all()
    freq = KalmanAttention(heads=2, frequency_capping=True)
    pf = _with({**p, "system_logvar": p["measurement_logvar"]}, "system_logvar", 0.0, -1e4)
    got_f = np.asarray(jax.jit(freq.apply)({"params": pf}, q, x, mask, np.ones((4, 6))))
    np.testing.assert_allclose(got_f[:3], expect[:3], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# padding invariance of every layer


def _layer_cases():
    q = np.random.default_rng(7).normal(size=(4, 4)).astype(np.float32)
    ids = np.array([[3, 5, 3, 7, 3, 5], [4, 4, 9, 0, 0, 0], [6, 6, 6, 8, 0, 0], [0] * 6])

    def counts(m):
        full = np.concatenate([ids, np.zeros((4, m.shape[1] - 6), int)], 1)
        return duplicate_counts(jnp.asarray(full), jnp.asarray(m))

    return [
        ("mhsa", MultiHeadSelfAttention(heads=2), lambda x, m: (x, m)),
        ("block_mhsa_dpo", EncoderBlock(heads=2, ffn_dim=6, encoder="mhsa+dpo"),
         lambda x, m: (x, m)),
        ("block_pre_ln", EncoderBlock(heads=2, ffn_dim=6, encoder="mhsa+dpo", norm_first=True),
         lambda x, m: (x, m)),
        ("target_attention_dpo", TargetAttention(heads=2, value_dpo=True, rank=2),
         lambda x, m: (q, x, m)),
        ("kalman_freq", KalmanAttention(heads=2), lambda x, m: (q, x, m, counts(m))),
    ]


@pytest.mark.parametrize("name,layer,args", _layer_cases(), ids=[c[0] for c in _layer_cases()])
def test_every_layer_is_padding_invariant(name, layer, args):
    x, mask = sequences(b=4, length=6, d=4)  # lengths 6, 1, 3, 0
    mask = holed(mask)
    v = random_variables(layer.init, *args(x, mask))
    run = jax.jit(lambda x, m: layer.apply(v, *args(x, m)))
    ref = np.asarray(run(x, mask))
    assert np.isfinite(ref).all()
    for xx, mm in ((garbage_at_padding(x, mask), mask), append_padding(x, mask)):
        out = np.asarray(run(xx, mm))
        if out.ndim == 3:  # per-step outputs: zero at every padded step
            assert (out[~mm] == 0).all()
            out = out[:, :6]
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# models


SMALL = dict(embedding_dim=4, hidden=(8, 4))
N_ROWS = 12
# One configuration per model, shared by the model tests so that each compiles once.
# max_positions: the position table must not grow with appended padding (invariance test).
MODEL_CASES = {
    "kfatt": dict(attention_groups="pair"),
    "bst": dict(max_positions=MAX_LEN, ffn_dim=6, heads=4),
    "bst_dpo": dict(max_positions=MAX_LEN, dropout=0.1, norm_first=True),  # pre-LN blocks
    "dyjoint": dict(max_positions=MAX_LEN, encoder="dpo", decoder="dpo", norm_first=True),
}


def _small(name, max_len=MAX_LEN, **kw):
    return build_model(name, seq_schema(max_len), **SMALL, **kw)


@functools.cache
def _program(name, max_len=MAX_LEN, full=True, **kw):
    """``(model, jitted run)``: ``run(v, batch)`` = (inference logits,) and with ``full`` also
    train-mode (logits, batch statistics) and the gradient of ``mean(train logits²)``."""
    model = _small(name, max_len, **kw)
    rngs = {"dropout": jax.random.PRNGKey(2)}

    def run(v, b):
        if not full:
            return (model.apply(v, b),)

        def loss(params):
            out, _ = model.apply({**v, "params": params}, b, train=True,
                                 mutable=["batch_stats"], rngs=rngs)
            return jnp.mean(out ** 2)

        train = model.apply(v, b, train=True, mutable=["batch_stats"], rngs=rngs)
        return model.apply(v, b), train, jax.grad(loss)(v["params"])

    return model, jax.jit(run)


def _units(tree, name):
    return [w for k, w in tree.items() if k.startswith("attention_" if name == "kfatt"
                                                       else "transformer_")]


def test_model_options_and_errors():
    opts = model_options("bst_dpo")
    assert (opts["encoder"], opts["decoder"], opts["blocks"], opts["heads"], opts["ffn_dim"],
            opts["kernel_size"], opts["generator"], opts["rank"]) == (
        "mhsa+dpo", "attention+dpo", 1, 2, 0, 3, "lowrank", 4)
    assert "encoder" not in model_options("bst") and model_options("bst")["blocks"] == 1
    assert model_options("kfatt")["frequency_capping"] is True
    assert model_options("kfatt")["heads"] == 2
    dj = model_options("dyjoint")
    assert (dj["hidden"], dj["batch_norm"], dj["dpo_layers"], dj["encoder"], dj["decoder"]) == (
        (400, 400, 400), True, "first", "mhsa+dpo", "attention+dpo")
    batch = jbatch(make_split(4, 0))
    key = jax.random.PRNGKey(0)
    for name, kw, what in [("bst_dpo", dict(encoder="conv"), "encoder"),
                           ("dyjoint", dict(decoder="pool"), "decoder"),
                           ("bst", dict(heads=3), "heads"),  # 3 does not divide 2 x 4
                           ("kfatt", dict(heads=3), "heads"),
                           ("bst", dict(blocks=-1), "blocks"),
                           ("bst_dpo", dict(kernel_size=2), "odd"),
                           ("bst_dpo", dict(generator="magic"), "generator")]:
        with pytest.raises(ConfigError, match=what):
            jax.eval_shape(_small(name, **kw).init, key, batch)


class TestUnitGradients(chex.TestCase):
    """Shapes and finite gradients with and without jit, on the attention units of kfatt and bst
    (op-by-op execution of whole models costs 20-50 s on a busy 2-core CPU; the models' jitted
    gradients are checked, padding invariant, in ``test_models_are_padding_invariant``)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_finite_gradients(self):
        x, mask = sequences(b=4, length=6, d=8)  # lengths 6, 1, 3, 0
        q = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
        counts = np.where(mask, 2.0, 1.0).astype(np.float32)
        for layer, extra in ((KalmanAttention(heads=2), (counts,)), (BehaviourTransformer(), ())):
            v = random_variables(layer.init, q, x, mask, *extra)

            def out_and_grads(params, x, layer=layer, extra=extra):
                def loss(params, x):
                    return jnp.sum(jnp.tanh(layer.apply({"params": params}, q, x, mask, *extra)))

                return (layer.apply({"params": params}, q, x, mask, *extra),
                        jax.grad(loss, argnums=(0, 1))(params, x))

            out, (gp, gx) = self.variant(out_and_grads)(v["params"], x)
            chex.assert_shape(out, (4, 8))
            chex.assert_tree_all_finite((out, gp, gx))
            assert all(np.abs(np.asarray(t)).sum() > 0 for t in jax.tree.leaves(gp))
            assert (np.asarray(gx)[~mask] == 0).all()


def test_every_encoder_decoder_combination_has_the_right_shapes():
    batch = jbatch(make_split(5, 3))
    for enc, dec in itertools.product(ENCODERS, DECODERS):
        model = _small("bst_dpo", encoder=enc, decoder=dec)
        v = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
        chex.assert_shape(jax.eval_shape(model.apply, v, batch), (5,))
        unit = v["params"]["transformer_0"]
        block = unit["encoder"]["block_0"]
        assert ("self_attention" in block) == ("mhsa" in enc)
        assert ("dynamic_conv" in block) == ("dpo" in enc)
        assert ("decoder_dpo" in unit) == (dec == "dpo")
        assert ("value_dpo" in unit.get("decoder", {})) == (dec == "attention+dpo")
        assert ("value" in unit.get("decoder", {})) == (dec == "attention")


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_models_are_padding_invariant(name):
    """Shapes; logits (inference and train mode, with the new batch statistics) and jitted
    gradients of every parameter finite and unchanged by moved pad-row embeddings; inference
    logits unchanged by appended padded steps; the pad rows receive no gradient."""
    kw = MODEL_CASES[name]
    model, short = _program(name, **kw)
    split = make_split(N_ROWS, 4)
    v = random_variables(model.init, jbatch(split))
    # move the pad rows: their values must not matter (the target never uses local id 0)
    table = np.asarray(v["params"]["embedding"]["table"]).copy()
    table[[0, PAD_CATE]] += 100.0
    v_pad = {**v, "params": {**v["params"], "embedding": {"table": jnp.asarray(table)}}}
    ref = short(v, jbatch(split))
    chex.assert_shape(ref[0], (N_ROWS,))
    chex.assert_tree_all_finite(ref)
    grads = ref[2]
    chex.assert_trees_all_equal_shapes(grads, v["params"])
    assert (np.asarray(grads["embedding"]["table"])[[0, PAD_CATE]] == 0).all()
    for unit in _units(grads, name):  # every parameter of the behaviour units is trained
        assert all(np.abs(np.asarray(t)).sum() > 0 for t in jax.tree.leaves(unit)), name
    chex.assert_trees_all_close(short(v_pad, jbatch(split)), ref, rtol=1e-5, atol=1e-6)
    _, longer = _program(name, MAX_LEN + 3, False, **kw)
    chex.assert_trees_all_close(longer(v, jbatch(pad_more(split, 3))), ref[:1],
                                rtol=1e-5, atol=1e-6)


def _short_histories():
    """Rows 0-2: one-step histories (items 2, 5, 7); the other rows: empty."""
    split = make_split(N_ROWS, 5)
    for key, pad in (("hist", 0), ("hist_cate", PAD_CATE)):
        split[f"seq/{key}"][:, 1:] = pad
        split[f"seq/{key}"][3:, 0] = pad
    split["seq/hist"][:3, 0] = [2, 5, 7]
    split["seq/hist_cate"][:3, 0] = PAD_CATE + CATE_OF[[2, 5, 7]]
    return split


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_length_one_and_empty_histories(name):
    split = _short_histories()
    model, run = _program(name, **MODEL_CASES[name])
    v = random_variables(model.init, jbatch(split))
    out = run(v, jbatch(split))
    chex.assert_tree_all_finite(out)
    # a one-step history matters; empty ones are unaffected by it
    other = {**split, "seq/hist": split["seq/hist"].copy()}
    other["seq/hist"][:3, 0] = [3, 6, 8]
    out_other = np.asarray(run(v, jbatch(other))[0])
    assert np.abs(out_other[:3] - np.asarray(out[0])[:3]).max() > 1e-4
    np.testing.assert_allclose(out_other[3:], np.asarray(out[0])[3:])


def test_kfatt_frequency_capping_in_the_model():
    """With zero measurement variance (log σ_i² = −1e4) every distinct behaviour weighs
    ``e^s/σ̃²`` however often it was clicked: the pooled interest, hence the logit, depends only
    on the SET of behaviours ([a, a, a, b] = [a, b]); without capping the repeats count."""
    split = make_split(N_ROWS, 7)
    hist = split["seq/hist"]
    hist[:2] = 0
    hist[0, :4] = [4, 4, 4, 9]
    hist[1, :2] = [4, 9]
    split["cat"][1] = split["cat"][0]  # the same target and user in both rows
    split["seq/hist_cate"] = np.where(hist > 0, PAD_CATE + CATE_OF[hist],
                                      PAD_CATE).astype(np.int32)
    batch = jbatch(split)
    outs = {}
    for capping in (True, False):
        kw = dict(MODEL_CASES["kfatt"], **({} if capping else dict(frequency_capping=False)))
        model, run = _program("kfatt", **kw) if capping else _program("kfatt", MAX_LEN, False,
                                                                       **kw)
        v = random_variables(model.init, batch)
        params = dict(v["params"])
        for g in (0, 1):  # the item and the category units (pair grouping)
            params[f"attention_{g}"] = _with(params[f"attention_{g}"], "measurement_logvar",
                                             0.0, -1e4)
        outs[capping] = np.asarray(run({**v, "params": params}, batch)[0])
    np.testing.assert_allclose(outs[True][0], outs[True][1], rtol=1e-5, atol=1e-6)
    assert abs(outs[False][0] - outs[False][1]) > 1e-4


def _count(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("blocks,ffn_dim", [(1, 0), (2, 5)])
def test_bst_parameter_count(blocks, ffn_dim):
    d, h1, h2 = 4, 8, 4
    schema = seq_schema()
    model = _small("bst", blocks=blocks, ffn_dim=ffn_dim)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jbatch(make_split(4, 0)))
    dd = 2 * d  # joint unit over [item, cate]
    ffn = ffn_dim or 4 * dd
    dense_ = dd * dd + dd
    block = 4 * dense_ + 2 * (2 * dd) + (dd * ffn + ffn) + (ffn * dd + dd)
    transformer = MAX_LEN * dd + blocks * block + 4 * dense_  # positions, blocks, decoder
    assert _count(v["params"]["transformer_0"]) == transformer
    tower = (5 * d * h1 + h1 + h1) + (h1 * h2 + h2 + h2)  # dense + Dice alpha per layer
    assert _count(v["params"]) == schema.table_size * d + transformer + tower + (h2 + 1)


def test_bst_is_bst_dpo_without_dpo():
    """``bst_dpo`` with encoder=mhsa, decoder=attention: the same parameters, logits and
    gradients as ``bst``; its defaults (sDPN) only add the DPO branches."""
    kw = MODEL_CASES["bst"]
    bst, run_bst = _program("bst", **kw)
    plain, run_plain = _program("bst_dpo", encoder="mhsa", decoder="attention", **kw)
    batch = jbatch(make_split(N_ROWS, 6))
    v = random_variables(bst.init, batch)
    shapes = jax.eval_shape(plain.init, jax.random.PRNGKey(0), batch)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, v)
    chex.assert_trees_all_close(run_plain(v, batch), run_bst(v, batch), rtol=1e-6, atol=1e-7)
    sdpn = jax.eval_shape(_small("bst_dpo", **kw).init, jax.random.PRNGKey(0), batch)
    unit, base = sdpn["params"]["transformer_0"], v["params"]["transformer_0"]
    assert set(unit["encoder"]["block_0"]) - set(base["encoder"]["block_0"]) == {"dynamic_conv"}
    assert set(unit["decoder"]) ^ set(base["decoder"]) == {"value", "value_dpo"}


def test_training_reduces_the_loss():
    from dpn_jax.metrics import logloss_from_logits
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    data = tiny_dataset()
    model = build_model("kfatt", data.schema, embedding_dim=8, hidden=(32, 16))
    cfg = TrainConfig(batch_size=150, max_epochs=4, patience=4, lr=3e-3, eval_batch_size=1000,
                      bn_recalibrate=False)
    res = fit(model, data, cfg, log=lambda s: None, progress=False)
    rate = float(data.train["label"].mean())  # the best constant predictor
    prior = logloss_from_logits(data.valid["label"],
                                np.full(1000, np.log(rate / (1 - rate)), np.float32))
    assert res.valid["logloss"] < prior - 0.02, (prior, res.history)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.03, res.history
    assert res.test["auc"] > 0.6, res.history
