"""Weight-generate families of the DPO (dpn_jax.dpo.generate, decompose) against numpy formulas."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from dpn_jax import dpo
from dpn_jax.errors import ConfigError

FAMILIES = dpo.GENERATORS
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def make(name: str, m: int = 6, n: int = 4, c: int = 3, **kw) -> dpo.WeightGenerator:
    kw = {"heads": 2, **kw} if name == "multihead" else kw
    return dpo.make_generator(name, m, n, c, rank=kw.pop("rank", 3), **kw)


def perturb(params, seed: int = 7, scale: float = 0.5):
    """Random parameters: fresh init has zero biases and tiny dynamic parts, too easy to match."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [a + scale * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def inputs(b: int, m: int, c: int, seed: int = 0):
    kx, kz = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (b, m)), jax.random.normal(kz, (b, c))


def np_act(name: str):
    return {"relu": lambda a: np.maximum(a, 0.0), "tanh": np.tanh}[name]


def np_softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_kernels(name: str, p, z, act: str = "relu"):
    """Independent numpy (float64) per-instance ``W [B,n,m]``, ``b [B,n]`` from the NOTES formulas."""
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
    gen = make(name)
    p = perturb(gen.init(jax.random.key(1)))
    x, z = inputs(5, 6, 3)
    w, b = gen.generate(p, z)
    w_ref, b_ref = ref_kernels(name, p, z)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-5)
    materialised = jnp.einsum("bnm,bm->bn", w, x) + b
    np.testing.assert_allclose(gen.apply(p, x, z), materialised, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dpo.matrix_product(w, x, b), materialised, rtol=1e-6, atol=1e-6)


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
    p = gen.init(jax.random.key(0))
    x, z = inputs(bsz, m, c)
    biggest = _max_intermediate(jax.make_jaxpr(gen.apply)(p, x, z).jaxpr)
    if name == "hyperdense":  # materialising is HyperDense's documented point
        assert biggest >= bsz * n * m
    else:
        assert biggest < bsz * n * m, f"{name}.apply built an intermediate of {biggest} elements"


class ShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(name=st.sampled_from(FAMILIES), batch=st.integers(1, 4), heads=st.integers(1, 3),
           m_head=st.integers(1, 4), n_head=st.integers(1, 4), c=st.integers(1, 5),
           rank=st.integers(1, 4), kernels=st.integers(1, 4))
    def test_shapes(self, name, batch, heads, m_head, n_head, c, rank, kernels):
        heads = heads if name in ("lowrank", "multihead") else 1
        m, n = heads * m_head, heads * n_head
        gen = dpo.make_generator(name, m, n, c, rank=rank, heads=heads, num_kernels=kernels)
        p = perturb(gen.init(jax.random.key(batch)))
        x, z = inputs(batch, m, c)

        @self.variant
        def run(p, x, z):
            return gen.generate(p, z), gen.apply(p, x, z)

        (w, b), y = run(p, x, z)
        chex.assert_shape([w, b, y], [(batch, n, m), (batch, n), (batch, n)])
        chex.assert_tree_all_finite((w, b, y))
        np.testing.assert_allclose(y, jnp.einsum("bnm,bm->bn", w, x) + b, rtol=1e-4, atol=1e-5)

    def test_rejects_wrong_shapes(self):
        gen = make("lowrank")
        p = gen.init(jax.random.key(0))
        x, z = inputs(2, 6, 3)
        with pytest.raises(AssertionError):
            gen.apply(p, x[:, :5], z)
        with pytest.raises(AssertionError):
            gen.apply(p, x, z[:1])


@pytest.mark.parametrize("name", FAMILIES)
def test_vmap_over_an_extra_axis(name):
    gen = make(name)
    p = perturb(gen.init(jax.random.key(2)))
    x = jax.random.normal(jax.random.key(3), (3, 4, 6))
    z = jax.random.normal(jax.random.key(4), (3, 4, 3))
    y = jax.vmap(gen.apply, in_axes=(None, 0, 0))(p, x, z)
    chex.assert_shape(y, (3, 4, 4))
    for v in range(3):
        np.testing.assert_allclose(y[v], gen.apply(p, x[v], z[v]), rtol=1e-5, atol=1e-6)
    # an ensemble: vmap over stacked parameters too
    ps = jax.tree.map(lambda *a: jnp.stack(a), p, perturb(p, 1), perturb(p, 2))
    ye = jax.vmap(gen.apply)(ps, x, z)
    np.testing.assert_allclose(ye[2], gen.apply(jax.tree.map(lambda a: a[2], ps), x[2], z[2]),
                               rtol=1e-5, atol=1e-6)


def context_free(name: str, p, kernel, bias):
    """Zero every context path and install a Dense ``kernel [m,n]`` / ``bias [n]``."""
    if name in ("lowrank", "hyperdense"):
        return p._replace(kernel=jnp.zeros_like(p.kernel).at[:, 0].set(kernel),
                          bias=jnp.zeros_like(p.bias).at[0].set(bias))
    if name == "multihead":
        heads, mh, _, nh = p.kernel.shape
        blocks = jnp.stack([kernel[g * mh:(g + 1) * mh, g * nh:(g + 1) * nh] for g in range(heads)])
        return p._replace(kernel=jnp.zeros_like(p.kernel).at[:, :, 0].set(blocks),
                          bias=jnp.zeros_like(p.bias).at[:, 0].set(bias.reshape(heads, nh)))
    if name == "mixture":
        return p._replace(kernel=jnp.broadcast_to(kernel[:, None], p.kernel.shape),
                          bias=jnp.broadcast_to(bias, p.bias.shape))
    p = p._replace(kernel=kernel, bias=jnp.zeros_like(p.bias).at[0].set(bias))
    return p._replace(diag=0 * p.diag) if name == "diagonal" else p._replace(u=0 * p.u)


@pytest.mark.parametrize("name", FAMILIES)
def test_context_free_generator_is_a_dense_layer(name):
    m, n = 6, 4
    gen = make(name, m, n)
    x, z = inputs(5, m, 3)
    dense = nn.Dense(n)
    dp = dense.init(jax.random.key(5), x)["params"]
    kernel, bias = dp["kernel"], dp["bias"] + 0.3
    if name == "multihead":  # multi-head kernels are block-diagonal
        kernel = kernel * jnp.kron(jnp.eye(2), jnp.ones((m // 2, n // 2)))
    p = context_free(name, perturb(gen.init(jax.random.key(6))), kernel, bias)
    expected = dense.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    np.testing.assert_allclose(gen.apply(p, x, z), expected, rtol=1e-5, atol=1e-6)
    # and the context really is ignored
    np.testing.assert_allclose(gen.apply(p, x, 3.0 * z + 1.0), expected, rtol=1e-5, atol=1e-6)


def test_decomposition_adds_up_and_each_part_has_its_meaning():
    gen = make("lowrank", 6, 4, 3)
    p = perturb(gen.init(jax.random.key(0)))
    x, z = inputs(7, 6, 3)
    d = dpo.decompose(p, x, z)
    np.testing.assert_allclose(d.static + d.multiplicative + d.bias, gen.apply(p, x, z),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.static, x @ p.kernel[:, 0, :], rtol=1e-6)
    h = np.maximum(np.asarray(z @ p.hidden.kernel + p.hidden.bias), 0)
    mult = np.stack([x[b] @ np.einsum("mkn,k->mn", p.kernel[:, 1:], h[b]) for b in range(7)])
    np.testing.assert_allclose(d.multiplicative, mult, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.bias, p.bias[0] + h @ p.bias[1:], rtol=1e-5, atol=1e-5)
    # static ignores z, bias ignores x, multiplicative is bilinear in x
    d2 = dpo.decompose(p, 2 * x, z + 1)
    np.testing.assert_allclose(d2.static, 2 * d.static, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dpo.decompose(p, 2 * x, z).multiplicative, 2 * d.multiplicative,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dpo.decompose(p, 2 * x, z).bias, d.bias, rtol=1e-6)


def test_mixture_is_the_numpy_weighted_sum_of_kernels():
    m, n, c, k = 5, 3, 4, 3
    gen = dpo.mixture(m, n, c, num_kernels=k)
    p = perturb(gen.init(jax.random.key(3)), scale=1.0)
    x, z = inputs(6, m, c, seed=1)
    xn, zn = np.asarray(x, np.float64), np.asarray(z, np.float64)
    kernels = np.asarray(p.kernel, np.float64).transpose(1, 0, 2)  # [K, m, n]
    s = np_softmax(zn @ np.asarray(p.gate_kernel) + np.asarray(p.gate_bias))
    expected = np.stack([
        sum(s[b, j] * (xn[b] @ kernels[j] + np.asarray(p.bias[j])) for j in range(k))
        for b in range(6)])
    np.testing.assert_allclose(gen.apply(p, x, z), expected, rtol=1e-5, atol=1e-5)
    assert np.all(s.max(-1) < 0.999), "gate should actually mix"


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        gen = make(name, 4, 4, 3, rank=2, activation="tanh")  # tanh: FD is ill-posed at kinks
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         perturb(gen.init(jax.random.key(0)), scale=0.3))
        x, z = (jnp.asarray(a, jnp.float64) for a in inputs(3, 4, 3))
        check_grads(gen.apply, (p, x, z), order=1, modes=("rev",))
        check_grads(lambda p, z: gen.generate(p, z), (p, z), order=1, modes=("rev",))


def test_fresh_lowrank_init_is_a_dense_layer_plus_a_small_dynamic_part():
    m, n, c = 256, 128, 32
    p = dpo.init_lowrank(jax.random.key(0), m, n, c, rank=4)
    np.testing.assert_allclose(np.var(p.kernel[:, 0]), 1.0 / m, rtol=0.1)
    assert np.all(p.bias == 0)
    x, z = inputs(2048, m, c)
    d = dpo.decompose(p, x, z)
    ratio = float(jnp.std(d.multiplicative) / jnp.std(d.static))
    assert 0.1 <= ratio <= 0.3, ratio
    np.testing.assert_allclose(float(jnp.var(d.static)), 1.0, rtol=0.15)


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
