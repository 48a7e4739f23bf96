"""Weight-generate families of the DPO (dpn_jax.dpo.generate, decompose) against numpy formulas."""

from __future__ import annotations

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_grads_naming_culprit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpn_jax import dpo
from dpn_jax.errors import ConfigError

FAMILIES = dpo.GENERATORS
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))




def make(name: str, m: int = 6, n: int = 4, c: int = 3, **kw) -> dpo.WeightGenerator:
    kw = {"heads": 2, **kw} if name == "multihead" else kw
    return dpo.make_generator(name, m, n, c, rank=kw.pop("rank", 3), **kw)


@functools.cache
def family(name: str):
    """The generator at the shared test shapes (m=6, n=4, c=3; batch 5) and its jitted entry
    points, compiled once for all the tests below (XLA compiles dominate this file's time)."""
    gen = make(name)
    return gen, jax.jit(gen.apply), jax.jit(gen.generate)


def random_params(gen: dpo.WeightGenerator, seed: int = 7, scale: float = 0.5):
    """Random parameters of ``gen``'s structure (numpy RNG: no XLA compile per shape).

    Fresh init has zero biases and tiny dynamic parts: too easy to match by accident.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(gen.init, jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def perturb(params, seed: int = 7, scale: float = 0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(a + scale * rng.normal(size=a.shape), a.dtype),
                        params)


def inputs(b: int, m: int, c: int, seed: int = 0):
    rng = np.random.default_rng(100 + seed)
    return (jnp.asarray(rng.normal(size=(b, m)), jnp.float32),
            jnp.asarray(rng.normal(size=(b, c)), jnp.float32))


def np_act(name: str):
    return {"relu": lambda a: np.maximum(a, 0.0), "tanh": np.tanh}[name]


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_kernels(name: str, p, z, act: str = "relu"):
    """Independent numpy (float64) per-instance ``W [B,n,m]``, ``b [B,n]`` from the formulas of docs/dpo_math.md, §'Weight generators'."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    s = np_act(act)
    ws, bs = [], []
    for zb in np.asarray(z, np.float64):
        if name in ("lowrank", "hyperdense"):
            h = s(zb @ p.hidden.kernel + p.hidden.bias) if name == "lowrank" else zb
            w = p.kernel[:, 0, :].T + sum(h[k] * p.kernel[:, k + 1, :].T for k in range(len(h)))
            b = p.bias[0] + h @ p.bias[1:]
        elif name == "multihead":
            heads, mh, l1, nh = p.kernel.shape
            h = s(zb @ p.hidden.kernel + p.hidden.bias).reshape(heads, l1 - 1)
            w = np.zeros((heads * nh, heads * mh))
            b = np.zeros(heads * nh)
            for g in range(heads):
                blk = p.kernel[g][:, 0, :].T + sum(h[g, k] * p.kernel[g][:, k + 1, :].T
                                                   for k in range(l1 - 1))
                w[g * nh:(g + 1) * nh, g * mh:(g + 1) * mh] = blk
                b[g * nh:(g + 1) * nh] = p.bias[g, 0] + h[g] @ p.bias[g, 1:]
        elif name == "mixture":
            g = np_softmax(zb @ p.gate_kernel + p.gate_bias)
            w = sum(g[k] * p.kernel[:, k, :].T for k in range(len(g)))
            b = g @ p.bias
        elif name == "diagonal":
            h = s(zb @ p.hidden.kernel + p.hidden.bias)
            w = p.kernel.T.copy()
            for i, di in enumerate(h @ p.diag):
                w[i, i] += di
            b = p.bias[0] + h @ p.bias[1:]
        else:  # rank1
            h = s(zb @ p.hidden.kernel + p.hidden.bias)
            w = p.kernel.T + np.outer(h @ p.u, h @ p.v)
            b = p.bias[0] + h @ p.bias[1:]
        ws.append(w)
        bs.append(b)
    return np.stack(ws), np.stack(bs)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_matches_numpy_and_fused_matches_materialised(name):
    gen, apply, generate = family(name)
    p = random_params(gen, 1)
    x, z = inputs(5, 6, 3)
    w, b = generate(p, z)
    w_ref, b_ref = ref_kernels(name, p, z)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-5)
    materialised = np.einsum("bnm,bm->bn", w, x) + b
    np.testing.assert_allclose(apply(p, x, z), materialised, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dpo.matrix_product(w, x, b), materialised, rtol=1e-5, atol=1e-5)


def _max_intermediate(jaxpr) -> int:
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, math.prod(getattr(v.aval, "shape", ())))
        for val in eqn.params.values():
            for sub in val if isinstance(val, (tuple, list)) else (val,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    best = max(best, _max_intermediate(sub))
    return best


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_apply_never_builds_per_instance_kernel(name):
    bsz, m, n, c = 8, 16, 12, 3
    gen = make(name, m, n, c, rank=2)
    p = jax.eval_shape(gen.init, jax.random.key(0))  # shapes suffice to trace
    x, z = jax.ShapeDtypeStruct((bsz, m), jnp.float32), jax.ShapeDtypeStruct((bsz, c), jnp.float32)
    biggest = _max_intermediate(jax.make_jaxpr(gen.apply)(p, x, z).jaxpr)
    if name == "hyperdense":  # materialising is HyperDense's documented point
        assert biggest >= bsz * n * m
    else:
        assert biggest < bsz * n * m, f"{name}.apply built an intermediate of {biggest} elements"


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(name=st.sampled_from(FAMILIES), batch=st.integers(1, 3), heads=st.integers(1, 3),
           m_head=st.integers(1, 2), n_head=st.integers(1, 3), c=st.integers(1, 3),
           rank=st.integers(1, 3), kernels=st.integers(1, 3))
    def test_shapes(self, name, batch, heads, m_head, n_head, c, rank, kernels):
        heads = heads if name in ("lowrank", "multihead") else 1
        m, n = heads * m_head, heads * n_head
        gen = dpo.make_generator(name, m, n, c, rank=rank, heads=heads, num_kernels=kernels)
        p = random_params(gen, batch)
        x, z = inputs(batch, m, c)

        @self.variant
        def run(p, x, z):
            return gen.generate(p, z), gen.apply(p, x, z)

        (w, b), y = run(p, x, z)
        chex.assert_shape([w, b, y], [(batch, n, m), (batch, n), (batch, n)])
        chex.assert_tree_all_finite((w, b, y))
        np.testing.assert_allclose(y, np.einsum("bnm,bm->bn", w, x) + b, rtol=1e-4, atol=1e-5)

    def test_rejects_wrong_shapes(self):
        gen = make("lowrank")
        p = random_params(gen)
        x, z = inputs(2, 6, 3)
        with pytest.raises(AssertionError):
            gen.apply(p, x[:, :5], z)
        with pytest.raises(AssertionError):
            gen.apply(p, x, z[:1])


@pytest.mark.parametrize("name", FAMILIES)
def test_vmap_over_an_extra_axis(name):
    gen, apply, _ = family(name)
    p = random_params(gen, 2)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, 6)).astype(np.float32)
    z = rng.normal(size=(3, 5, 3)).astype(np.float32)
    y = jax.jit(jax.vmap(gen.apply, in_axes=(None, 0, 0)))(p, x, z)
    chex.assert_shape(y, (3, 5, 4))
    for v in range(3):
        np.testing.assert_allclose(y[v], apply(p, x[v], z[v]), rtol=1e-5, atol=1e-6)
    if name == "lowrank":  # an ensemble: vmap over stacked parameters too
        ps = jax.tree.map(lambda *a: np.stack(a), p, perturb(p, 1), perturb(p, 2))
        ye = jax.jit(jax.vmap(gen.apply))(ps, x, z)
        np.testing.assert_allclose(ye[2], apply(jax.tree.map(lambda a: a[2], ps), x[2], z[2]),
                                   rtol=1e-5, atol=1e-6)


def context_free(name: str, p, kernel, bias):
    """Zero every context path and install a Dense ``kernel [m,n]`` / ``bias [n]`` (numpy)."""
    p = jax.tree.map(np.array, p)
    if name in ("lowrank", "hyperdense"):
        p.kernel[:], p.bias[:] = 0.0, 0.0
        p.kernel[:, 0], p.bias[0] = kernel, bias
    elif name == "multihead":
        heads, mh, _, nh = p.kernel.shape
        p.kernel[:], p.bias[:] = 0.0, 0.0
        for g in range(heads):
            p.kernel[g, :, 0] = kernel[g * mh:(g + 1) * mh, g * nh:(g + 1) * nh]
        p.bias[:, 0] = bias.reshape(heads, nh)
    elif name == "mixture":
        p.kernel[:], p.bias[:] = kernel[:, None], bias
    else:
        p.kernel[:], p.bias[:] = kernel, 0.0
        p.bias[0] = bias
        (p.diag if name == "diagonal" else p.u)[:] = 0.0
    return p


@pytest.mark.parametrize("name", FAMILIES)
def test_context_free_generator_is_a_dense_layer(name):
    gen, apply, _ = family(name)
    m, n = gen.in_features, gen.out_features
    x, z = inputs(5, m, 3)
    rng = np.random.default_rng(5)
    kernel = (rng.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    if name == "multihead":  # multi-head kernels are block-diagonal
        kernel = kernel * np.kron(np.eye(2), np.ones((m // 2, n // 2)))
    p = context_free(name, random_params(gen, 6), kernel, bias)
    expected = nn.Dense(n).apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_allclose(apply(p, x, z), expected, rtol=1e-5, atol=1e-6)
    # and the context really is ignored
    np.testing.assert_allclose(apply(p, x, 3.0 * z + 1.0), expected, rtol=1e-5, atol=1e-6)


def test_decomposition_adds_up_and_each_part_has_its_meaning():
    gen, apply, _ = family("lowrank")
    p = random_params(gen, 0)
    x, z = inputs(5, 6, 3)
    dec = jax.jit(dpo.decompose)
    d = dec(p, x, z)
    np.testing.assert_allclose(d.static + d.multiplicative + d.bias, apply(p, x, z),
                               rtol=1e-5, atol=1e-5)
    pn, xn, zn = jax.tree.map(np.asarray, (p, x, z))
    np.testing.assert_allclose(d.static, xn @ pn.kernel[:, 0, :], rtol=1e-5, atol=1e-6)
    h = np.maximum(zn @ pn.hidden.kernel + pn.hidden.bias, 0)
    mult = np.stack([xn[b] @ np.einsum("mkn,k->mn", pn.kernel[:, 1:], h[b]) for b in range(5)])
    np.testing.assert_allclose(d.multiplicative, mult, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.bias, pn.bias[0] + h @ pn.bias[1:], rtol=1e-5, atol=1e-5)
    # static ignores z, bias ignores x, multiplicative is linear in x
    d2 = dec(p, 2 * xn, zn + 1)
    np.testing.assert_allclose(d2.static, 2 * d.static, rtol=1e-5, atol=1e-6)
    d3 = dec(p, 2 * xn, zn)
    np.testing.assert_allclose(d3.multiplicative, 2 * d.multiplicative, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d3.bias, d.bias, rtol=1e-6)


def test_mixture_is_the_numpy_weighted_sum_of_kernels():
    m, n, c, k = 5, 3, 4, 3
    gen = dpo.mixture(m, n, c, num_kernels=k)
    p = random_params(gen, 3)
    x, z = inputs(6, m, c, seed=1)
    xn, zn = np.asarray(x, np.float64), np.asarray(z, np.float64)
    kernels = np.asarray(p.kernel, np.float64).transpose(1, 0, 2)  # [K, m, n]
    s = np_softmax(zn @ np.asarray(p.gate_kernel) + np.asarray(p.gate_bias))
    expected = np.stack([
        sum(s[b, j] * (xn[b] @ kernels[j] + np.asarray(p.bias[j])) for j in range(k))
        for b in range(6)])
    np.testing.assert_allclose(gen.apply(p, x, z), expected, rtol=1e-5, atol=1e-5)
    assert np.all(s.max(-1) < 0.999), "gate should actually mix"


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        # tanh: finite differences are ill-posed at ReLU kinks
        gens = {name: make(name, 4, 4, 3, rank=2, activation="tanh") for name in FAMILIES}
        params = {name: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                     random_params(g, 0, 0.3)) for name, g in gens.items()}
        x, z = (jnp.asarray(a, jnp.float64) for a in inputs(3, 4, 3))

        def make_fn(names):
            return lambda ps, x, z: {n: (gens[n].apply(ps[n], x, z), gens[n].generate(ps[n], z))
                                     for n in names}

        check_grads_naming_culprit(make_fn, params, x, z)


def test_fresh_lowrank_init_is_a_dense_layer_plus_a_small_dynamic_part():
    m, n, c = 128, 64, 32
    p = jax.tree.map(np.asarray, dpo.init_lowrank(jax.random.key(0), m, n, c, rank=4))
    np.testing.assert_allclose(np.var(p.kernel[:, 0]), 1.0 / m, rtol=0.1)
    assert np.all(p.bias == 0)
    x, z = inputs(1024, m, c)
    d = jax.jit(dpo.decompose)(p, x, z)
    ratio = float(np.std(d.multiplicative) / np.std(d.static))
    assert 0.1 <= ratio <= 0.3, ratio  # documented: dynamic ≈ dynamic_scale·sqrt(E[h²]) of static
    np.testing.assert_allclose(float(np.var(d.static)), 1.0, rtol=0.15)


def test_unknown_names_and_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="lowrank"):
        dpo.make_generator("hyper", 4, 4, 4)
    with pytest.raises(ConfigError, match="relu"):
        dpo.make_generator("lowrank", 4, 4, 4, activation="relux")
    with pytest.raises(ConfigError, match="divide"):
        dpo.make_generator("multihead", 5, 4, 4, heads=2)
    with pytest.raises(ConfigError, match="heads"):
        dpo.make_generator("mixture", 4, 4, 4, heads=2)
    with pytest.raises(ConfigError, match="rank"):
        dpo.make_generator("lowrank", 4, 4, 4, rank=0)
    # lowrank with heads > 1 is the multi-head family
    assert dpo.make_generator("lowrank", 4, 4, 4, heads=2).name == "multihead"
