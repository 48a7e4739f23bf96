"""MKL bfloat16 products (dpn_jax/nn/mkl_matmul.py): the FFI kernel against numpy, its VJP
against the XLA bfloat16 product, and the errors when MKL or a compiler is missing."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bf16_reference import bf16

from dpn_jax import native
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.nn import mkl_matmul
from dpn_jax.nn.precision import bf16_matmul, dense_dot_general, mkl_bf16_matmul

REASON = mkl_matmul.unavailable_reason()
needs_mkl = pytest.mark.skipif(REASON is not None, reason=f"MKL kernel unavailable: {REASON}")


@needs_mkl
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("m,k,n", [(37, 11, 5), (1, 300, 2), (4, 0, 3), (0, 6, 3)])
def test_mkl_dot_is_the_bf16_product(trans_a, trans_b, m, k, n):
    rng = np.random.default_rng(m * 100 + k)
    a = rng.normal(size=(m, k)).astype(np.float32)
    b = rng.normal(size=(k, n)).astype(np.float32)
    a_in, b_in = (a.T if trans_a else a), (b.T if trans_b else b)
    out = jax.jit(mkl_matmul.mkl_dot, static_argnums=(2, 3))(
        jnp.asarray(np.ascontiguousarray(a_in)).astype(jnp.bfloat16),
        jnp.asarray(np.ascontiguousarray(b_in)).astype(jnp.bfloat16), trans_a, trans_b)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, bf16(a) @ bf16(b), rtol=1e-5, atol=1e-4)


@needs_mkl
class TestMklMatmul(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_gradients_equal_the_xla_bf16_product(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 24)).astype(np.float32)
        w = rng.normal(size=(24, 16)).astype(np.float32)
        ct = rng.normal(size=(64, 16)).astype(np.float32)
        out, vjp = jax.vjp(self.variant(mkl_bf16_matmul), x, w)
        ref, ref_vjp = jax.vjp(bf16_matmul, x, w)
        chex.assert_trees_all_equal_dtypes((out, *vjp(ct)), (ref, x, w))
        chex.assert_trees_all_close((out, *vjp(ct)), (ref, *ref_vjp(ct)), rtol=1e-5, atol=1e-4)

    def test_vmap_maps_each_replica(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(3, 8, 5)).astype(np.float32)
        w = rng.normal(size=(3, 5, 4)).astype(np.float32)
        out = jax.jit(jax.vmap(mkl_bf16_matmul))(x, w)
        np.testing.assert_allclose(out, np.einsum("rnm,rmk->rnk", bf16(x), bf16(w)), rtol=1e-5, atol=1e-4)


@needs_mkl
@pytest.mark.parametrize("name", ["dnn", "dcnv2", "dpn"])
def test_model_with_mkl_products_equals_xla_bf16(tiny_synthetic, name):
    batch = {k: jnp.asarray(v[:64]) for k, v in tiny_synthetic.train.items()}
    xla = build_model(name, tiny_synthetic.schema, embedding_dim=4, hidden=(16, 8), matmul_dtype="bfloat16")
    mkl = build_model(name, tiny_synthetic.schema, embedding_dim=4, hidden=(16, 8), matmul_dtype="bfloat16_mkl")
    v = xla.init(jax.random.PRNGKey(0), batch)

    def loss(model, params):
        logits, _ = model.apply({**v, "params": params}, batch, train=True, mutable=["batch_stats"])
        return jnp.mean(logits**2), logits

    (l_x, logits_x), g_x = jax.value_and_grad(lambda p: loss(xla, p), has_aux=True)(v["params"])
    (l_m, logits_m), g_m = jax.jit(jax.value_and_grad(lambda p: loss(mkl, p), has_aux=True))(v["params"])
    chex.assert_trees_all_close((logits_m, g_m), (logits_x, g_x), rtol=1e-4, atol=1e-5)


def test_missing_mkl_and_compiler_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("DPN_JAX_MKL", str(tmp_path / "libmkl_rt.so.3"))
    with pytest.raises(ConfigError, match=r"bfloat16_mkl.*no MKL library.*\.\[mkl\]"):
        mkl_matmul._load_mkl()
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="matmul_dtype=bfloat16_mkl: no C\\+\\+ compiler.*g\\+\\+"):
        native.compiler(mkl_matmul.OPTION)


def test_unknown_dtype_lists_the_mkl_choice():
    with pytest.raises(ConfigError, match="bfloat16_mkl"):
        dense_dot_general("float16")


@needs_mkl
def test_export_replaces_the_mkl_call_by_xla_bf16_products(tiny_synthetic):
    from dpn_jax.serving.export import export_program
    from dpn_jax.serving.predictor import Predictor

    schema = tiny_synthetic.schema
    batch = {k: jnp.asarray(v[:32]) for k, v in tiny_synthetic.train.items()}
    model = build_model("dnn", schema, embedding_dim=4, hidden=(16, 8), matmul_dtype="bfloat16_mkl")
    predictor = Predictor("dnn", model, model.init(jax.random.PRNGKey(0), batch), schema)
    exported = export_program(predictor, ["cpu"])  # a custom call would not serialise
    assert "dpn_jax_bf16_gemm" not in exported.mlir_module()
    arrays = [batch[name] for name, _, _ in predictor.inputs]
    expected = jax.nn.sigmoid(model.apply(predictor.variables, batch))
    np.testing.assert_allclose(exported.call(*arrays), expected, rtol=1e-5, atol=1e-6)


def test_native_build_falls_back_to_tmp_when_the_cache_is_read_only(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache directory should be: mkdir fails
    monkeypatch.setenv("DPN_CACHE_DIR", str(blocker))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    if native.shutil.which("g++") is None and native.shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    out = native.build("sparse_adam.cc", "test")
    assert out.parent == tmp_path / "tmp" / f"dpn_jax_ffi-{os.getuid()}" and out.exists()  # per user
