"""Feature-aggregate functions and field-based DPO (dpn_jax.dpo.aggregate, relations) vs numpy."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_grads_naming_culprit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpn_jax import dpo
from dpn_jax.errors import ConfigError

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))




def random_params(gen: dpo.WeightGenerator, seed: int = 7, scale: float = 0.5):
    """Random parameters of ``gen``'s structure, drawn with numpy (no XLA compile per shape)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(gen.init, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def fields(b: int, f: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, f, d)).astype(np.float32)


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make(name: str, d: int, n: int, c: int) -> dpo.WeightGenerator:
    return dpo.make_generator(name, d, n, c, rank=2, heads=2 if name == "multihead" else 1)


def naive_field_dpo(aggregation, gen, p, x, z, scores=None, exclude_self=False):
    """The definitions of docs/dpo_math.md, §'Field-based DPO', literally: per-field generated kernels, numpy double loops."""
    b, f, _ = x.shape
    x = np.asarray(x, np.float64)
    if aggregation == "concat":
        w, bias = (np.asarray(a, np.float64) for a in jax.jit(gen.generate)(p, z.reshape(b, -1)))
        return np.einsum("bnd,bfd->bfn", w, x) + bias[:, None]
    w, bias = jax.jit(gen.generate)(p, z.reshape(b * f, -1))
    w = np.asarray(w, np.float64).reshape(b, f, gen.out_features, gen.in_features)
    bias = np.asarray(bias, np.float64).reshape(b, f, gen.out_features)
    y = np.zeros((b, f, gen.out_features))
    for bi, i, j in itertools.product(range(b), range(f), range(f)):
        if aggregation == "self":
            a = float(i == j)
        elif aggregation == "sum":
            a = 0.0 if exclude_self and i == j else 1.0
        else:
            a = scores[bi, i, j]
        y[bi, i] += a * (w[bi, j] @ x[bi, i] + bias[bi, j])
    return y


def test_matrix_and_fieldwise_products_match_numpy():
    rng = np.random.default_rng(0)
    w, x, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 4))
    expected = np.stack([w[i] @ x[i] + b[i] for i in range(3)])
    np.testing.assert_allclose(dpo.matrix_product(w, x, b), expected, rtol=1e-5, atol=1e-5)
    wf, xf, bf = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 4))
    expected = np.stack([[wf[i, j] @ xf[i, j] + bf[i, j] for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(dpo.fieldwise_product(wf, xf, bf), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dpo.fieldwise_product(wf, xf), expected - bf, rtol=1e-5, atol=1e-5)


# the aggregation code is family-agnostic apart from the coefficient pytree: cover each coefficient
# layout ([1, h] [B,K]; rank-1's (linear, quadratic) pair; multi-head's [B,H,K]; the mixture's
# softmax without a constant term) under the aggregations.
CASES = [(agg, name) for agg in dpo.FIELD_AGGREGATIONS for name in ("lowrank", "rank1")]
CASES += [("attentive", "multihead"), ("sum", "mixture")]


@pytest.mark.parametrize("aggregation,name", CASES)
def test_field_dpo_matches_the_naive_definition(aggregation, name):
    b, f, d, c, n = 2, 3, 4, 2, 6
    x, z = fields(b, f, d), fields(b, f, c, seed=1)
    gen = make(name, d, n, f * c if aggregation == "concat" else c)
    p = random_params(gen, seed=3)
    scores = np_softmax(np.random.default_rng(2).normal(size=(b, f, f))).astype(np.float32)
    for excl in (False, True) if aggregation == "sum" else (False,):
        kw = dict(scores=scores if aggregation == "attentive" else None, exclude_self=excl)
        fused, (w, bias) = jax.jit(
            lambda p, x, z, s, excl=excl: (
                dpo.field_apply(aggregation, gen, p, x, z, scores=s, exclude_self=excl),
                dpo.field_kernels(aggregation, gen, p, z, scores=s, exclude_self=excl)),
        )(p, x, z, kw["scores"])
        expected = naive_field_dpo(aggregation, gen, p, x, z, **kw)
        chex.assert_shape(fused, (b, f, n))
        np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-4)
        # materialised per-field kernels agree with the fused path
        np.testing.assert_allclose(np.einsum("bfnd,bfd->bfn", w, x) + bias, fused,
                                   rtol=1e-4, atol=1e-4)


def test_fm_is_half_the_self_excluded_summation_dpo_with_diag_generator():
    x = fields(3, 5, 4, seed=4).astype(np.float64)
    fm = np.zeros(3)
    for bi in range(3):
        for i in range(5):
            for j in range(i + 1, 5):
                fm[bi] += x[bi, i] @ x[bi, j]
    # spelled out: g(z) = diag(z) through the generic diagonal family, z = x
    d = 4
    gen = dpo.diagonal(d, d, d, rank=d, activation="identity", use_bias=False)
    x32 = x.astype(np.float32)
    run = jax.jit(lambda x, excl: dpo.field_sum(gen, dpo.diag_generator_params(d), x,
                                                exclude_self=excl), static_argnums=1)
    y = run(x32, True)
    assert dpo.FM_CONSTANT == 0.5
    np.testing.assert_allclose(0.5 * np.asarray(y).sum(axis=(1, 2)), fm, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jit(dpo.fm_interaction)(x32), fm, rtol=1e-4, atol=1e-4)
    # without the exclusion it would include the squares Σ_i |x_i|²
    y_all = run(x32, False)
    np.testing.assert_allclose(0.5 * np.asarray(y_all).sum(axis=(1, 2)),
                               fm + 0.5 * (x ** 2).sum(axis=(1, 2)), rtol=1e-4, atol=1e-4)


def test_cross_layer_is_the_scalar_generator_dpo_plus_residual():
    rng = np.random.default_rng(5)
    x0, xl = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    w, b = rng.normal(size=6), rng.normal(size=6)
    expected = x0 * (xl @ w)[:, None] + b + xl
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(jax.jit(dpo.cross_layer)(f32(x0), f32(xl), f32(w), f32(b)),
                               expected, rtol=1e-4, atol=1e-4)
    # spelled out: g(z) = (z·w) I as a generated kernel, applied to x0 with context xl
    gen = dpo.diagonal(6, 6, 6, rank=1, activation="identity")
    p = dpo.DiagonalParams(dpo.HiddenParams(f32(w[:, None]), f32(np.zeros(1))),
                           f32(np.zeros((6, 6))), f32(np.ones((1, 6))),
                           f32(np.stack([b, np.zeros(6)])))
    kernels, bias = jax.jit(gen.generate)(p, f32(xl))
    np.testing.assert_allclose(kernels, (xl @ w)[:, None, None] * np.eye(6), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.einsum("bnm,bm->bn", kernels, x0) + bias + xl, expected,
                               rtol=1e-4, atol=1e-4)


def test_bilinear_attention_is_a_row_softmax_of_x_a_z():
    x, z = fields(2, 4, 3), fields(2, 4, 5, seed=1)
    kernel = np.random.default_rng(6).normal(size=(3, 5)).astype(np.float32)
    params = dpo.BilinearAttentionParams(jnp.asarray(kernel))
    att = jax.jit(dpo.bilinear_attention, static_argnames="exclude_self")
    a = np.asarray(att(params, x, z))
    expected = np_softmax(np.einsum("bid,de,bje->bij", x, kernel, z) / np.sqrt(5))
    np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
    a_ex = np.asarray(att(params, x, z, exclude_self=True))
    np.testing.assert_allclose(np.diagonal(a_ex, axis1=1, axis2=2), 0.0)
    np.testing.assert_allclose(a_ex.sum(-1), 1.0, rtol=1e-5)


class FieldShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(aggregation=st.sampled_from(dpo.FIELD_AGGREGATIONS),
           name=st.sampled_from(("lowrank", "multihead", "mixture", "rank1")),
           batch=st.integers(1, 3), nfields=st.integers(1, 3), d_head=st.integers(1, 2),
           out_head=st.integers(1, 3), rank=st.integers(1, 3))
    def test_shapes(self, aggregation, name, batch, nfields, d_head, out_head, rank):
        heads = 2 if name == "multihead" else 1
        d, n = heads * d_head, heads * out_head
        c = nfields * d if aggregation == "concat" else d
        gen = dpo.make_generator(name, d, n, c, rank=rank, heads=heads)
        p = random_params(gen, batch)
        x = fields(batch, nfields, d)
        scores = np.full((batch, nfields, nfields), 1.0 / nfields, np.float32)

        @self.variant
        def run(p, x, s):
            return dpo.field_apply(aggregation, gen, p, x, scores=s)

        y = run(p, x, scores if aggregation == "attentive" else None)
        chex.assert_shape(y, (batch, nfields, n))
        chex.assert_tree_all_finite(y)

    def test_vmap_over_an_extra_axis(self):
        gen = make("lowrank", 4, 3, 4)
        p = random_params(gen)
        x = np.random.default_rng(0).normal(size=(5, 2, 3, 4)).astype(np.float32)
        f = jax.jit(jax.vmap(lambda x: dpo.field_apply("sum", gen, p, x, exclude_self=True)))
        y = f(x)
        chex.assert_shape(y, (5, 2, 3, 3))
        np.testing.assert_allclose(y[3], naive_field_dpo("sum", gen, p, x[3], x[3],
                                                         exclude_self=True), rtol=1e-5, atol=1e-5)


def test_field_gradients_match_finite_differences():
    b, f, d = 2, 3, 2
    cases = [(agg, "lowrank") for agg in dpo.FIELD_AGGREGATIONS] + [("sum", "rank1")]
    with jax.enable_x64(True):
        gens = {case: dpo.make_generator(case[1], d, 3, f * d if case[0] == "concat" else d,
                                         rank=2, activation="tanh") for case in cases}
        params = {case: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     random_params(g, 0, 0.4)) for case, g in gens.items()}
        att = dpo.BilinearAttentionParams(jnp.asarray(fields(1, d, d, seed=2)[0], jnp.float64))
        x, z = (jnp.asarray(fields(b, f, d, seed=s), jnp.float64) for s in (3, 4))

        def make_fn(keys):
            def fn(ps, att, x, z):
                out = {}
                for agg, name in keys:
                    s = dpo.bilinear_attention(att, x, z) if agg == "attentive" else None
                    out[agg, name] = dpo.field_apply(agg, gens[agg, name], ps[agg, name], x, z,
                                                     scores=s, exclude_self=True)
                return out

            return fn

        check_grads_naming_culprit(make_fn, params, att, x, z)


def test_unknown_aggregation_and_missing_scores_raise_config_error():
    gen = make("lowrank", 2, 2, 2)
    p = random_params(gen)
    x = fields(1, 2, 2)
    with pytest.raises(ConfigError, match="attentive"):
        dpo.field_apply("mean", gen, p, x)
    with pytest.raises(ConfigError, match="scores"):
        dpo.field_apply("attentive", gen, p, x)
