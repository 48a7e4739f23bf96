"""AutoInt, AFN, FinalMLP and APG: layers against explicit numpy loops, parameter counts by
formula, finite logits/gradients and a tiny training smoke per model."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpn_jax.models.deep_family  # noqa: F401  (registers the models)
from dpn_jax.data.schema import Dataset
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.nn.afn_layers import LogarithmicTransform, safe_log_abs
from dpn_jax.nn.attention_layers import (
    APGDense,
    BilinearFusion,
    FeatureGate,
    InteractingLayer,
    apg_dense,
    bilinear_fusion,
)

MODELS = ("autoint", "autoint_plus", "afn", "afn_plus", "finalmlp", "apg")

# Small hyper-parameters for the count formulas and the training smoke (keeps CPU time low).
SMALL = {
    "autoint": dict(attention_layers=2, num_heads=2, attention_dim=8),
    "autoint_plus": dict(attention_layers=2, num_heads=2, attention_dim=8, hidden=(16, 8)),
    "afn": dict(log_neurons=6, hidden=(16, 8)),
    "afn_plus": dict(log_neurons=6, hidden=(16, 8), dnn_hidden=(12, 8)),
    "finalmlp": dict(mlp1_hidden=(16,), mlp2_hidden=(8,), fs_hidden=(12,), num_heads=2, dropout=0.1),
    "apg": dict(hidden=(16, 8), rank=4, overparam=6, hypernet_hidden=(12,)),
}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _batch(data: Dataset, n: int):
    return {k: jnp.asarray(v[:n]) for k, v in data.train.items()}


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def _numpy_variables(init, *args, seed=0, scale=0.5):
    """Variables of ``init``'s structure filled with numpy normals: no init compilation needed."""
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), *args)
    r = _rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * r.normal(size=x.shape), x.dtype), shapes)


def _relu(x):
    return np.maximum(x, 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# AutoInt
# ---------------------------------------------------------------------------------------------


def autoint_reference(e, wq, wk, wv, wres, heads, scale):
    """Per instance, per head: softmax(Q K^T [/ sqrt d']) V; concat heads; + e W_res; ReLU."""
    b, f, _ = e.shape
    a = wq.shape[1]
    dh = a // heads
    out = np.zeros((b, f, a))
    for i in range(b):
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            q, k, v = e[i] @ wq[:, cols], e[i] @ wk[:, cols], e[i] @ wv[:, cols]
            s = q @ k.T
            if scale:
                s = s / np.sqrt(dh)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p = p / p.sum(axis=1, keepdims=True)
            out[i, :, cols] = p @ v
        if wres is not None:
            out[i] += e[i] @ wres
    return _relu(out)


class TestInteractingLayer(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_matches_numpy_multi_head_attention(self):
        e = _rng(1).normal(size=(3, 5, 4)).astype(np.float32)
        for scale, residual in ((False, True), (True, True), (False, False)):
            layer = InteractingLayer(attention_dim=6, num_heads=3, use_residual=residual, use_scale=scale)
            params = _numpy_variables(layer.init, e)
            out = self.variant(layer.apply)(params, e)
            p = {k: np.asarray(v) for k, v in params["params"].items()}
            expect = autoint_reference(e, p["query"], p["key"], p["value"], p.get("residual"), 3, scale)
            chex.assert_shape(out, (3, 5, 6))
            np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-4, atol=1e-5)
            assert ("residual" in p) == residual


def test_attention_heads_must_divide():
    with pytest.raises(ConfigError, match="not divisible"):
        InteractingLayer(attention_dim=7, num_heads=2).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 4)))


# ---------------------------------------------------------------------------------------------
# AFN
# ---------------------------------------------------------------------------------------------


def test_log_neurons_keep_inputs_positive_and_match_numpy():
    eps = 1e-3
    e = _rng(2).normal(size=(4, 3, 5)).astype(np.float32)
    e[0, 0, 0] = 0.0          # exactly zero
    e[1, 2, 3] = -2e-4        # negative, below eps
    pos = np.maximum(np.abs(e), eps)
    assert (pos > 0).all()
    np.testing.assert_allclose(np.asarray(safe_log_abs(jnp.asarray(e), eps)), np.log(pos), rtol=1e-6)

    layer = LogarithmicTransform(num_neurons=7, eps=eps, batch_norm=False)
    params = _numpy_variables(layer.init, e)
    w = np.asarray(params["params"]["weights"])
    out = np.asarray(layer.apply(params, e))
    expect = np.exp(np.einsum("bfd,fn->bnd", np.log(pos), w))   # exp(W^T log|e|), per dimension
    chex.assert_shape(out, (4, 7, 5))
    np.testing.assert_allclose(out, expect, rtol=1e-4)
    # the same thing as a product of powers: y_j = prod_i |e_i| ** w_ij
    np.testing.assert_allclose(out[2, 4, 1], np.prod(pos[2, :, 1] ** w[:, 4]), rtol=1e-4)


def test_log_neurons_batchnorm_is_per_field_then_per_neuron():
    e = _rng(3).normal(size=(6, 3, 4)).astype(np.float32)
    layer = LogarithmicTransform(num_neurons=5, eps=1e-5, batch_norm=True)
    v = layer.init(jax.random.PRNGKey(0), e)
    out, _ = layer.apply(v, e, train=True, mutable=["batch_stats"])
    w = np.asarray(v["params"]["weights"])

    def bn(x):  # statistics over batch and embedding dim, one per channel of axis 1
        mu = x.mean(axis=(0, 2), keepdims=True)
        var = x.var(axis=(0, 2), keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5)

    z = bn(np.log(np.maximum(np.abs(e), 1e-5)))
    expect = bn(np.exp(np.einsum("bfd,fn->bnd", z, w)))
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-3, atol=1e-4)


def test_afn_log_has_finite_gradients_at_zero_embeddings():
    # layer level: d/de of the log-neuron output at e == 0 is finite (zero: clipped region)
    layer = LogarithmicTransform(num_neurons=4, batch_norm=False)
    zeros = jnp.zeros((2, 3, 5))
    p = layer.init(jax.random.PRNGKey(0), zeros)
    g = jax.grad(lambda x: jnp.sum(layer.apply(p, x)))(zeros)
    chex.assert_tree_all_finite(g)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    # model level: see test_model_finite_logits_and_grads (every embedding table zeroed)


# ---------------------------------------------------------------------------------------------
# FinalMLP
# ---------------------------------------------------------------------------------------------


def test_bilinear_fusion_matches_explicit_formula():
    r = _rng(4)
    b, m, n, k = 3, 6, 4, 2
    o1, o2 = r.normal(size=(b, m)), r.normal(size=(b, n))
    w1, w2, w12, bias = r.normal(size=m), r.normal(size=n), r.normal(size=(k, m // k, n // k)), 0.7
    expect = np.zeros(b)
    for i in range(b):
        for j in range(k):   # BF(o1_j, o2_j) = b_j + w1_j^T o1_j + w2_j^T o2_j + o1_j^T W3_j o2_j
            a, c = o1[i, j * 3:(j + 1) * 3], o2[i, j * 2:(j + 1) * 2]
            expect[i] += w1[j * 3:(j + 1) * 3] @ a + w2[j * 2:(j + 1) * 2] @ c + a @ w12[j] @ c
        expect[i] += bias
    f = jnp.float32
    got = bilinear_fusion(*(jnp.asarray(x, f) for x in (o1, o2, w1, w2, w12)), jnp.asarray(bias, f))
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4, atol=1e-5)

    mod = BilinearFusion(num_heads=2)
    v = mod.init(jax.random.PRNGKey(0), o1, o2)
    assert v["params"]["w12"].shape == (2, 3, 2)
    p = {k_: np.asarray(x) for k_, x in v["params"].items()}
    np.testing.assert_allclose(
        np.asarray(mod.apply(v, o1, o2)),
        np.asarray(bilinear_fusion(o1, o2, p["w1"][:, 0], p["w2"][:, 0], p["w12"], p["bias"])), rtol=1e-5)
    with pytest.raises(ConfigError, match="must divide"):
        BilinearFusion(num_heads=4).init(jax.random.PRNGKey(0), o1, o2)


def test_feature_gate_is_two_sigmoid_of_its_mlp():
    ctx = _rng(5).normal(size=(4, 3)).astype(np.float32)
    gate = FeatureGate(features=6, hidden=(5,))
    v = _numpy_variables(gate.init, ctx)
    p = jax.tree_util.tree_map(np.asarray, v["params"])
    logits = _relu(ctx @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"]) @ p["logits"]["kernel"] + p["logits"]["bias"]
    g = np.asarray(gate.apply(v, ctx))
    np.testing.assert_allclose(g, 2.0 * _sigmoid(logits), rtol=1e-5)
    assert ((g > 0) & (g < 2)).all()
    # zero logits -> gate exactly 1 (the identity), the gate's neutral point
    zero = jax.tree_util.tree_map(jnp.zeros_like, v)
    np.testing.assert_array_equal(np.asarray(gate.apply(zero, ctx)), 1.0)


def test_finalmlp_gates_multiply_the_embeddings(tiny_synthetic):
    """With the fusion reduced to w1^T o1 and identity-like streams, the model output equals the
    explicit formula: the gate input is the context field's embedding and h1 = 2 sigmoid(.) * e."""
    s = tiny_synthetic.schema
    model = build_model("finalmlp", s, mlp1_hidden=(), mlp2_hidden=(), fs_hidden=(),
                        fs1_context=s.fields[1].name, num_heads=1, dropout=0.0)
    batch = _batch(tiny_synthetic, 5)
    v = _numpy_variables(model.init, batch, scale=0.3)
    p = jax.tree_util.tree_map(np.asarray, v["params"])
    table = p["embedding"]["table"]
    e = table[np.asarray(batch["cat"])]                        # [B, F, d]
    flat = e.reshape(5, -1)
    g1 = 2 * _sigmoid(e[:, 1] @ p["gate1"]["logits"]["kernel"] + p["gate1"]["logits"]["bias"])
    g2 = 2 * _sigmoid(p["fs2_context_vector"] @ p["gate2"]["logits"]["kernel"] + p["gate2"]["logits"]["bias"])
    h1, h2 = g1 * flat, g2 * flat
    fu = p["fusion"]
    expect = fu["bias"] + h1 @ fu["w1"][:, 0] + h2 @ fu["w2"][:, 0] + np.einsum("bi,ij,bj->b", h1, fu["w12"][0], h2)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(v, batch)), expect, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown field"):
        jax.eval_shape(build_model("finalmlp", s, fs1_context="nope").init, jax.random.PRNGKey(0), batch)


# ---------------------------------------------------------------------------------------------
# APG
# ---------------------------------------------------------------------------------------------


def test_apg_dense_equals_explicit_per_instance_weights():
    r = _rng(6)
    b, n, m, k = 4, 5, 3, 2
    x, u, v = r.normal(size=(b, n)), r.normal(size=(n, k)), r.normal(size=(k, m))
    s, bias = r.normal(size=(b, k, k)), r.normal(size=(b, m))
    expect = np.stack([x[i] @ (u @ s[i] @ v) + bias[i] for i in range(b)])  # W_i = U S_i V
    f = jnp.float32
    got = apg_dense(*(jnp.asarray(a, f) for a in (x, u, s, v, bias)))
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overparam,generate_bias", [(6, True), (0, False)])
def test_apg_layer_generates_s_from_the_condition(overparam, generate_bias):
    r = _rng(7)
    x, z = r.normal(size=(3, 5)).astype(np.float32), r.normal(size=(3, 4)).astype(np.float32)
    layer = APGDense(features=3, rank=2, overparam=overparam, hypernet_hidden=(6,), generate_bias=generate_bias)
    v = _numpy_variables(layer.init, x, z)
    p = jax.tree_util.tree_map(np.asarray, v["params"])
    if overparam:
        u, vv = p["u_left"] @ p["u_right"], p["v_left"] @ p["v_right"]
        assert p["u_left"].shape == (5, 6) and p["v_right"].shape == (6, 3)
    else:
        u, vv = p["u"], p["v"]
    hid = _relu(z @ p["hypernet_0"]["kernel"] + p["hypernet_0"]["bias"])
    g = hid @ p["hypernet_out"]["kernel"] + p["hypernet_out"]["bias"]
    s = g[:, :4].reshape(3, 2, 2)
    bias = g[:, 4:] if generate_bias else np.broadcast_to(p["bias"], (3, 3))
    expect = np.stack([x[i] @ (u @ s[i] @ vv) + bias[i] for i in range(3)])
    np.testing.assert_allclose(np.asarray(layer.apply(v, x, z)), expect, rtol=1e-4, atol=1e-5)
    # a different condition gives a different layer for the same input
    assert not np.allclose(np.asarray(layer.apply(v, x, z[::-1])), np.asarray(layer.apply(v, x, z)))


def test_apg_rank_is_capped_by_layer_width():
    layer = APGDense(features=3, rank=32, overparam=0, hypernet_hidden=())
    v = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.ones((2, 5)), jnp.ones((2, 4)))
    assert v["params"]["u"].shape == (5, 3) and v["params"]["v"].shape == (3, 3)


# ---------------------------------------------------------------------------------------------
# Every model: finite logits and gradients, parameter counts
# ---------------------------------------------------------------------------------------------


def _zero_tables(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if getattr(path[-1], "key", "") == "table" else x, params)


@pytest.mark.parametrize("name", MODELS)
def test_model_finite_logits_and_grads(name, tiny_synthetic: Dataset):
    """Default hyper-parameters, train mode (BatchNorm statistics, dropout). For AFN/AFN+ the
    gradients are also taken with every embedding table at exactly zero: the log of |0| must
    give finite (not NaN/inf) gradients."""
    model = build_model(name, tiny_synthetic.schema)
    batch = _batch(tiny_synthetic, 16)

    def loss(params, variables):
        out, _ = model.apply({**variables, "params": params}, batch, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(out ** 2), out

    @jax.jit
    def run(key):   # one compilation instead of op-by-op dispatch
        v = model.init(key, batch)
        (_, train_logits), grads = jax.value_and_grad(loss, has_aux=True)(v["params"], v)
        out = {"logits": model.apply(v, batch), "train_logits": train_logits, "grads": grads}
        if name.startswith("afn"):
            (out["zero_loss"], _), out["zero_grads"] = jax.value_and_grad(loss, has_aux=True)(
                _zero_tables(v["params"]), v)
        return out

    out = run(jax.random.PRNGKey(0))
    chex.assert_shape((out["logits"], out["train_logits"]), (16,))
    chex.assert_tree_all_finite(out)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree_util.tree_leaves(out["grads"]))) > 0


def _expected_count(name: str, kw: dict, t: int, f: int, d: int = 10) -> int:
    def mlp(n_in, hidden):   # Dense without bias + BN scale/bias per layer, then Dense(1)
        total, prev = 0, n_in
        for h in hidden:
            total, prev = total + prev * h + 2 * h, h
        return total + prev + 1

    if name in ("autoint", "autoint_plus"):
        a, n = kw["attention_dim"], t * d
        for i in range(kw["attention_layers"]):
            n += 4 * (d if i == 0 else a) * a          # W_Q, W_K, W_V, W_Res
        n += f * a + 1
        return n + (mlp(f * d, kw["hidden"]) if name == "autoint_plus" else 0)
    if name in ("afn", "afn_plus"):
        nn_ = kw["log_neurons"]
        n = t * d + 2 * f + f * nn_ + 2 * nn_ + mlp(nn_ * d, kw["hidden"])
        return n + (t * d + mlp(f * d, kw["dnn_hidden"]) + 3 if name == "afn_plus" else 0)
    if name == "finalmlp":
        fd, (s,), (a,), (b,), k = f * d, kw["fs_hidden"], kw["mlp1_hidden"], kw["mlp2_hidden"], kw["num_heads"]
        gate = d + (d * s + s) + (s * fd + fd)        # context vector + gate MLP
        streams = (fd * a + 2 * a) + (fd * b + 2 * b)
        return t * d + 2 * gate + streams + a + b + k * (a // k) * (b // k) + 1
    if name == "apg":
        (g,), r, p, c = kw["hypernet_hidden"], kw["rank"], kw["overparam"], f * d
        n, prev = t * d, f * d
        for m in kw["hidden"]:
            k = min(r, prev, m)
            pp = max(p, k)
            n += prev * pp + pp * k + k * pp + pp * m          # U_l U_r, V_l V_r
            n += (c * g + g) + (g * (k * k + m) + k * k + m)   # hyper-network -> S (K x K) and b
            n += 2 * m                                          # BatchNorm
            prev = m
        return n + prev + 1
    raise AssertionError(name)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_formula(name, tiny_synthetic: Dataset):
    s = tiny_synthetic.schema
    v = jax.eval_shape(build_model(name, s, **SMALL[name]).init, jax.random.PRNGKey(0), _batch(tiny_synthetic, 4))
    assert _count(v["params"]) == _expected_count(name, SMALL[name], s.table_size, s.num_fields)


def test_option_errors(tiny_synthetic):
    batch = _batch(tiny_synthetic, 4)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ConfigError, match="condition_mode"):
        jax.eval_shape(build_model("apg", tiny_synthetic.schema, condition_mode="mix").init, key, batch)
    with pytest.raises(ConfigError, match="unknown field"):
        jax.eval_shape(build_model("apg", tiny_synthetic.schema, condition_fields="zz").init, key, batch)
    # condition on one field: the hyper-networks see d inputs
    one = tiny_synthetic.schema.fields[0].name
    v = jax.eval_shape(build_model("apg", tiny_synthetic.schema, condition_fields=one, **SMALL["apg"]).init,
                       key, batch)
    assert v["params"]["apg_0"]["hypernet_0"]["kernel"].shape == (10, 12)
    # self-wise condition: each layer's hyper-network reads that layer's input
    v = jax.eval_shape(build_model("apg", tiny_synthetic.schema, condition_mode="self", **SMALL["apg"]).init,
                       key, batch)
    assert v["params"]["apg_0"]["hypernet_0"]["kernel"].shape == (40, 12)
    assert v["params"]["apg_1"]["hypernet_0"]["kernel"].shape == (16, 12)
    assert isinstance(build_model("autoint", tiny_synthetic.schema), nn.Module)


# ---------------------------------------------------------------------------------------------
# Training smoke
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_data():
    from dpn_jax.data.synthetic import make_synthetic

    return make_synthetic(seed=0, rows=20_000, fields=4, vocab=10)


@pytest.mark.parametrize("name", MODELS)
def test_training_smoke(name, smoke_data):
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    model = build_model(name, smoke_data.schema, **SMALL[name])
    # bn_recalibrate off: one compilation and 96 forward passes fewer per model (CPU budget)
    cfg = TrainConfig(batch_size=512, max_epochs=3, patience=5, eval_batch_size=2000, bn_recalibrate=False)
    res = fit(model, smoke_data, cfg, log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.6, res.history
