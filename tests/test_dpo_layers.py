"""Flax DPO layers (dpn_jax.nn.dpo_layers): wiring, Dense equivalence, init scale, errors."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from dpn_jax import dpo
from dpn_jax.errors import ConfigError
from dpn_jax.nn.dpo_layers import FeatureDPO, FieldDPO

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))






def normal(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_variables(model: nn.Module, *args, seed: int = 1, scale: float = 0.5):
    """Variables with the structure ``model.init`` declares (traced, not run: no XLA compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


class LayerShapeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @SETTINGS
    @given(generator=st.sampled_from(dpo.GENERATORS),
           aggregation=st.sampled_from(dpo.FIELD_AGGREGATIONS), batch=st.integers(1, 3),
           nfields=st.integers(1, 3), heads=st.integers(1, 2), d_head=st.integers(1, 3),
           out_head=st.one_of(st.none(), st.integers(1, 3)),
           c=st.one_of(st.none(), st.integers(1, 3)), rank=st.integers(1, 3))
    def test_layer_shapes(self, generator, aggregation, batch, nfields, heads, d_head, out_head,
                          c, rank):
        heads = heads if generator in ("lowrank", "multihead") else 1
        d = heads * d_head
        features = None if out_head is None else heads * out_head
        n = features or d
        kw = dict(generator=generator, rank=rank, heads=heads, num_kernels=rank)
        feature, field = FeatureDPO(n, **kw), FieldDPO(aggregation, features=features, **kw)
        x = normal(batch, nfields, d)
        z = None if c is None else normal(batch, nfields, c, seed=1)
        xf = x.reshape(batch, -1)  # the flattened fields; context: z's, or x's when z is None
        zf = xf if z is None else z.reshape(batch, -1)
        v_feature, v_field = random_variables(feature, xf, zf), random_variables(field, x, z)

        @self.variant
        def run(v_feature, v_field, x, z):
            return feature.apply(v_feature, xf, zf), field.apply(v_field, x, z)

        y_feature, y_field = run(v_feature, v_field, x, z)
        chex.assert_shape([y_feature, y_field], [(batch, n), (batch, nfields, n)])
        chex.assert_tree_all_finite((y_feature, y_field))

    def test_vmap_over_an_extra_axis(self):
        model = FeatureDPO(3)
        x, z = normal(4, 2, 5), normal(4, 2, 2, seed=1)
        variables = random_variables(model, x[0], z[0])
        y = jax.jit(jax.vmap(model.apply, in_axes=(None, 0, 0)))(variables, x, z)
        chex.assert_shape(y, (4, 2, 3))
        np.testing.assert_allclose(y[1], jax.jit(model.apply)(variables, x[1], z[1]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("generator", ["lowrank", "mixture"])
def test_feature_dpo_with_its_context_paths_zeroed_is_flax_dense(generator):
    m, n, c = 5, 4, 3
    x, z = normal(6, m), normal(6, c, seed=1)
    model = FeatureDPO(n, generator=generator, num_kernels=3)
    params = jax.tree.map(np.array, random_variables(model, x, z)["params"])
    dense_kernel, dense_bias = normal(m, n, seed=2), normal(n, seed=3)
    params["kernel"][:], params["bias"][:] = 0.0, 0.0
    if generator == "lowrank":  # Ẇ = 0, W̃ = 0: vec(W) = ḃ, b = b̃ whatever z is
        params["kernel"][:, 0], params["bias"][0] = dense_kernel, dense_bias
    else:  # every mixed kernel the same: the gate no longer matters
        params["kernel"][:], params["bias"][:] = dense_kernel[:, None], dense_bias
    expected = nn.Dense(n).apply({"params": {"kernel": dense_kernel, "bias": dense_bias}}, x)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply({"params": params}, x, z), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply({"params": params}, x, 2 * z - 1), expected,
                               rtol=1e-5, atol=1e-5)


def test_feature_dpo_params_are_the_pure_functions_params():
    x, z = normal(4, 6), normal(4, 3, seed=1)
    model = FeatureDPO(4, rank=2)
    v = random_variables(model, x, z)
    p = v["params"]
    assert set(p) == {"hidden_kernel", "hidden_bias", "kernel", "bias"}
    chex.assert_shape([p["hidden_kernel"], p["kernel"], p["bias"]], [(3, 2), (6, 3, 4), (3, 4)])
    pure = dpo.LowRankParams(dpo.HiddenParams(p["hidden_kernel"], p["hidden_bias"]), p["kernel"],
                             p["bias"])
    np.testing.assert_allclose(jax.jit(model.apply)(v, x, z),
                               jax.jit(dpo.lowrank(6, 4, 3, 2).apply)(pure, x, z),
                               rtol=1e-6, atol=1e-6)


def layer_norm(z: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * scale + bias


def test_context_norm_feeds_the_generator_the_layer_normalised_context():
    x, z = normal(4, 6), normal(4, 3, seed=1)
    model = FeatureDPO(4, rank=2, context_norm=True)
    v = random_variables(model, x, z)
    p = v["params"]
    pure = dpo.LowRankParams(dpo.HiddenParams(p["hidden_kernel"], p["hidden_bias"]), p["kernel"],
                             p["bias"])
    zn = layer_norm(z, p["context_norm"]["scale"], p["context_norm"]["bias"]).astype(np.float32)
    np.testing.assert_allclose(jax.jit(model.apply)(v, x, z),
                               dpo.lowrank(6, 4, 3, 2).apply(pure, x, zn), rtol=1e-5, atol=1e-5)
    xf = normal(2, 3, 4)  # field DPO: each field's context normalised on its own
    field = FieldDPO("sum", rank=2, context_norm=True)
    vf = random_variables(field, xf)
    pf = vf["params"]
    pure = dpo.LowRankParams(dpo.HiddenParams(pf["hidden_kernel"], pf["hidden_bias"]),
                             pf["kernel"], pf["bias"])
    zf = layer_norm(xf, pf["context_norm"]["scale"], pf["context_norm"]["bias"]).astype(np.float32)
    np.testing.assert_allclose(jax.jit(field.apply)(vf, xf),
                               dpo.field_apply("sum", dpo.lowrank(4, 4, 4, 2), pure, xf, zf),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", ["feature", "field"])
def test_context_norm_wakes_the_generated_part_of_a_tiny_context(layer):
    """Why the option exists: a small context (std 1e-2 here) generates ~1e-3 of the static
    output; normalised, about ``dynamic_scale`` of it (0.25 x sqrt(1/2) for ReLU).  (At std 1e-4,
    fresh CTR embeddings, LayerNorm's epsilon 1e-6 caps the normalised context at std ~0.1.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3, 8)).astype(np.float32)
    z1, z2 = ((1e-2 * rng.normal(size=(256, 3, 8))).astype(np.float32) for _ in range(2))

    def dynamic_ratio(norm: bool) -> float:
        if layer == "feature":
            m = FeatureDPO(16, context_norm=norm)
            args = lambda z: (x.reshape(256, -1), z.reshape(256, -1))  # noqa: E731
        else:
            m = FieldDPO("sum", features=16, dynamic_scale=0.25, context_norm=norm)
            args = lambda z: (x, z)  # noqa: E731
        v = m.init(jax.random.key(0), *args(z1))
        y1, y2 = m.apply(v, *args(z1)), m.apply(v, *args(z2))
        return float(jnp.std(y1 - y2) / jnp.std(y1))  # only the generated part differs

    assert dynamic_ratio(False) < 1e-2
    assert 0.1 < dynamic_ratio(True) < 1.0


@pytest.mark.parametrize("aggregation", dpo.FIELD_AGGREGATIONS)
def test_field_dpo_wires_the_pure_field_functions(aggregation):
    x = normal(2, 3, 4)
    model = FieldDPO(aggregation, rank=2, features=5, exclude_self=True)
    v = random_variables(model, x)
    p = v["params"]
    pure = dpo.LowRankParams(dpo.HiddenParams(p["hidden_kernel"], p["hidden_bias"]), p["kernel"],
                             p["bias"])
    gen = dpo.lowrank(4, 5, 12 if aggregation == "concat" else 4, 2)

    @jax.jit
    def expected_fn(pure, attention, x, scores):
        if aggregation == "attentive" and scores is None:  # the learned bilinear attention
            scores = dpo.bilinear_attention(dpo.BilinearAttentionParams(attention), x, x,
                                            exclude_self=True)
        return dpo.field_apply(aggregation, gen, pure, x, x, scores=scores, exclude_self=True)

    if aggregation != "attentive":
        assert "attention_kernel" not in p
    expected = expected_fn(pure, p.get("attention_kernel"), x, None)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(v, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(v, x, x), expected, rtol=1e-5, atol=1e-5)  # z defaults to x
    if aggregation == "attentive":  # given scores take precedence over the learned attention
        uniform = np.full((2, 3, 3), 1 / 3, np.float32)
        np.testing.assert_allclose(apply(v, x, None, uniform),
                                   expected_fn(pure, p["attention_kernel"], x, uniform),
                                   rtol=1e-5, atol=1e-5)


def test_unknown_names_raise_config_error_listing_the_choices():
    x, z = normal(2, 4), normal(2, 3)
    with pytest.raises(ConfigError, match="lowrank.*mixture"):
        FeatureDPO(4, generator="hypernet").init(jax.random.key(0), x, z)
    with pytest.raises(ConfigError, match="self.*sum.*attentive.*concat"):
        FieldDPO("mean").init(jax.random.key(0), normal(2, 3, 4))
    with pytest.raises(ConfigError, match="relu"):
        FeatureDPO(4, hidden_activation="relu6").init(jax.random.key(0), x, z)


def test_fresh_init_output_variance_is_that_of_a_dense_layer():
    """Unit-variance x and z: Var(DPO) / Var(Dense) at the same fan-in stays within ~2x (it is
    1 + O(dynamic_scale²) ≈ 1.01-1.09, see dpn_jax.dpo.generate)."""
    m, n, c = 64, 256, 32
    x, z = normal(512, m, seed=4), normal(512, c, seed=5)

    @jax.jit  # one compile for all the inits
    def variances(key):
        dense = nn.Dense(n)
        out = {"dense": jnp.var(dense.apply(dense.init(key, x), x))}
        for generator in dpo.GENERATORS:
            model = FeatureDPO(n, generator=generator, heads=4 if generator == "multihead" else 1)
            out[generator] = jnp.var(model.apply(model.init(key, x, z), x, z))
        return out

    var = variances(jax.random.key(1))
    for generator in dpo.GENERATORS:
        ratio = float(var[generator] / var["dense"])
        assert 0.5 < ratio < 2.0, (generator, ratio)
        assert 0.85 < ratio < 1.3, (generator, ratio)  # the documented 1 + O(dynamic_scale²)


def test_feature_dpo_gradients_match_finite_differences():
    x, z = normal(3, 4), normal(3, 2, seed=1)
    model = FeatureDPO(3, rank=2, hidden_activation="tanh")
    with jax.enable_x64(True):
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), random_variables(model, x, z))
        x64, z64 = jnp.asarray(x, jnp.float64), jnp.asarray(z, jnp.float64)
        check_grads(jax.jit(model.apply), (v, x64, z64), order=1, modes=("rev",))


def test_feature_dpo_learns_a_multiplicative_target_a_dense_layer_cannot(optimized):
    """y = x_0 z_0 is second order: reachable by the DPO's Ẇh(z)x term, not by a Dense layer."""
    x, z = normal(512, 4, seed=6), normal(512, 4, seed=7)
    target = x[:, :1] * z[:, :1]

    def fit(model, args):
        params = model.init(jax.random.key(0), *args)
        opt = optax.adam(3e-2)

        def loss(p):
            return jnp.mean((model.apply(p, *args) - target) ** 2)

        @jax.jit
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=200)
        return float(loss(params))

    dpo_loss = fit(FeatureDPO(1, rank=4, hidden_activation="linear"), (x, z))
    # the best affine model of [x, z] (what a Dense layer can reach), by least squares
    design = np.concatenate([x, z, np.ones((512, 1), np.float32)], axis=1)
    residual = target - design @ np.linalg.lstsq(design, target, rcond=None)[0]
    assert np.mean(residual ** 2) > 0.8  # Var(x0 z0) ≈ 1: a linear model explains ~nothing
    assert dpo_loss < 0.05, dpo_loss
