"""bfloat16 Dense products (dpn_jax/nn/precision.py): values and gradients against direct formulas."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bf16_reference import bf16

from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.nn.precision import bf16_matmul, dense_dot_general, row_major_transpose


class TestBF16Matmul(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_gradients_are_the_bf16_products(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(37, 11)).astype(np.float32)
        w = rng.normal(size=(11, 5)).astype(np.float32)
        ct = rng.normal(size=(37, 5)).astype(np.float32)
        out, vjp = jax.vjp(self.variant(bf16_matmul), x, w)
        dx, dw = vjp(ct)
        chex.assert_trees_all_equal_dtypes((out, dx, dw), (x[:, :5], x, w))
        # each product on bf16-rounded operands, accumulated in float32 (numpy float64 here)
        np.testing.assert_allclose(out, bf16(x) @ bf16(w), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, bf16(ct) @ bf16(w).T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dw, bf16(x).T @ bf16(ct), rtol=1e-5, atol=1e-5)
        # and near the float32 product (bf16 keeps 8 bits of mantissa)
        np.testing.assert_allclose(out, x @ w, rtol=0.05, atol=0.05)

    def test_row_major_transpose_is_the_transpose(self):
        x = jnp.arange(12.0).reshape(3, 4)
        np.testing.assert_array_equal(jax.jit(row_major_transpose)(x), x.T)


def test_dense_dot_general_in_flax_dense():
    x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
    plain = nn.Dense(4)
    mixed = nn.Dense(4, dot_general=dense_dot_general("bfloat16"))
    v = plain.init(jax.random.PRNGKey(0), x)
    k, b = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(mixed.apply(v, x), bf16(x) @ bf16(k) + b, rtol=1e-5, atol=1e-5)
    assert dense_dot_general("float32") is None  # flax's own product
    with pytest.raises(ConfigError, match="matmul_dtype='float16'.*float32.*bfloat16"):
        dense_dot_general("float16")
    with pytest.raises(ValueError, match="Dense product"):
        dense_dot_general("bfloat16")(x, k, (((0,), (0,)), ((), ())))


@pytest.mark.parametrize("name", ["dnn", "dcnv2", "dpn"])
def test_model_with_bf16_products_matches_float32_closely(tiny_synthetic, name):
    schema = tiny_synthetic.schema
    batch = {k: jnp.asarray(v[:64]) for k, v in tiny_synthetic.train.items()}
    f32 = build_model(name, schema, embedding_dim=4, hidden=(16, 8))
    bf16 = build_model(name, schema, embedding_dim=4, hidden=(16, 8), matmul_dtype="bfloat16")
    v = f32.init(jax.random.PRNGKey(0), batch)
    # larger embeddings than the 1e-4 init, so the products are not ~0
    v = {**v, "params": {**v["params"], "embedding": jax.tree.map(
        lambda t: t * 1e4, v["params"]["embedding"])}}
    a = np.asarray(f32.apply(v, batch))
    b = np.asarray(bf16.apply(v, batch))
    assert not np.array_equal(a, b)  # the products did run in bfloat16
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * np.abs(a).max())

    def loss(p, model):
        out, _ = model.apply({**v, "params": p}, batch, train=True, mutable=["batch_stats"])
        return jnp.mean(out ** 2)

    g32 = jax.jit(jax.grad(loss), static_argnums=1)(v["params"], f32)
    g16 = jax.jit(jax.grad(loss), static_argnums=1)(v["params"], bf16)
    chex.assert_tree_all_finite(g16)
    for x, y in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        np.testing.assert_allclose(x, y, rtol=0.1, atol=0.1 * float(np.abs(y).max()) + 1e-12)


def test_dcnv2_cross_layer_products_in_bf16():
    from dpn_jax.nn.cross_layers import CrossLayerV2

    rng = np.random.default_rng(3)
    x0, xl = rng.normal(size=(2, 9, 6)).astype(np.float32)
    layer = CrossLayerV2(matmul_dtype="bfloat16")
    v = layer.init(jax.random.PRNGKey(0), x0, xl)
    k, b = np.asarray(v["params"]["dense"]["kernel"]), np.asarray(v["params"]["dense"]["bias"])
    np.testing.assert_allclose(layer.apply(v, x0, xl), x0 * (bf16(xl) @ bf16(k) + b) + xl,
                               rtol=1e-5, atol=1e-5)


def test_lowrank_generator_product_in_bf16():
    """dpo.lowrank(matmul=bf16_matmul): W(z)x + b(z) with the fused product on bf16-rounded x
    and [ḃ | Ẇ_1..Ẇ_r]; coefficients and bias stay float32."""
    from dpn_jax import dpo

    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 7)).astype(np.float32)
    z = rng.normal(size=(6, 3)).astype(np.float32)
    gen = dpo.make_generator("lowrank", 7, 4, 3, rank=2, matmul=bf16_matmul)
    p = gen.init(jax.random.PRNGKey(0))
    c = np.asarray(gen.coefficients(p, z), np.float64)  # [B, r+1]
    want = np.einsum("bm,mkn,bk->bn", bf16(x), bf16(p.kernel), c) + c @ np.asarray(p.bias, np.float64)
    np.testing.assert_allclose(gen.apply(p, x, z), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="'mixture'.*float32 products only"):
        dpo.make_generator("mixture", 7, 4, 3, matmul=bf16_matmul)
    with pytest.raises(ConfigError, match="heads=2"):
        dpo.make_generator("lowrank", 8, 4, 3, heads=2, matmul=bf16_matmul)
