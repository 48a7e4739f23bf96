"""Cross-network baselines (crossnet, dcn, dcnv2, cin, xdeepfm): each interaction layer against an
explicit numpy loop, parameter counts by formula, finite gradients and a training smoke test."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpn_jax.models.cross_family  # noqa: F401  (importing registers the models)
from dpn_jax.data.schema import Dataset, Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.nn.cross_layers import (
    CIN,
    CINLayer,
    CrossLayer,
    CrossLayerV2,
    CrossLayerV2Mix,
    CrossNet,
)
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit

MODELS = ("crossnet", "dcn", "dcnv2", "cin", "xdeepfm")




def normal(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def random_params(module, *args, seed: int = 1, scale: float = 0.5):
    """Variables with the structure ``module.init`` declares, all drawn N(0, scale^2) so biases
    are not zero; BatchNorm running variances are 1 (traced with eval_shape: no XLA compile,
    which for the initialisers costs as much as the model's gradient)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)

    def draw(path, s):
        if any(getattr(k, "key", None) == "var" for k in path):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(scale * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def num_params(model, batch) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
    return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))


def mlp_params(d_in: int, hidden) -> int:
    """The shared MLP with BatchNorm: bias-free Dense + BN scale and bias per layer."""
    n, prev = 0, d_in
    for w in hidden:
        n += prev * w + 2 * w
        prev = w
    return n


# ----------------------------------------------------------------------------- reference loops

def np_cross_layer(x0, xl, w, b):
    """DCN Eqn. 3, one sample at a time: x0 (xl . w) + b + xl."""
    out = np.empty_like(x0)
    for n in range(x0.shape[0]):
        out[n] = x0[n] * float(np.dot(xl[n], w)) + b + xl[n]
    return out


def np_cross_layer_v2(x0, xl, W, b):
    """DCN-V2 Eqn. 1 with W as a [D_out, D_in] matrix: x0 ⊙ (W xl + b) + xl."""
    return np.stack([x0[n] * (W @ xl[n] + b) + xl[n] for n in range(x0.shape[0])])


def np_cross_layer_mix(x0, xl, U, V, C, b, G):
    """DCN-V2 Eqns. 3-4, sample by sample and expert by expert:
    Σ_i softmax(xl G)_i · x0 ⊙ (U_i tanh(C_i tanh(V_i^T xl)) + b) + xl."""
    out = np.empty_like(x0)
    for n in range(x0.shape[0]):
        logits = np.array([xl[n] @ G[:, i] for i in range(U.shape[0])])
        gate = np.exp(logits - logits.max())
        gate /= gate.sum()
        acc = np.zeros_like(x0[n])
        for i in range(U.shape[0]):
            expert = x0[n] * (U[i] @ np.tanh(C[i] @ np.tanh(V[i].T @ xl[n])) + b)
            acc += gate[i] * expert
        out[n] = acc + xl[n]
    return out


def np_cin_layer(x0, xk, W, bias):
    """xDeepFM Eqn. 6 as a plain triple loop over (h, i, j); W[i, j, h] = W^{k,h}_{ij}."""
    B, H_prev, d = xk.shape
    m, H = x0.shape[1], W.shape[2]
    out = np.zeros((B, H, d), np.float64)
    for h in range(H):
        for i in range(H_prev):
            for j in range(m):
                out[:, h, :] += W[i, j, h] * (xk[:, i, :] * x0[:, j, :])
        out[:, h, :] += bias[h]
    return out


# ----------------------------------------------------------------------------- layer math

class CrossLayerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_layer_equals_numpy_loop(self):
        x0, xl = normal(5, 7), normal(5, 7, seed=1)
        layer = CrossLayer()
        p = random_params(layer, x0, xl)
        out = self.variant(layer.apply)(p, x0, xl)
        w = np.asarray(p["params"]["kernel"])[:, 0]
        b = np.asarray(p["params"]["bias"])
        np.testing.assert_allclose(out, np_cross_layer(x0, xl, w, b), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cin_layer_equals_triple_loop(self):
        x0, xk = normal(3, 4, 5), normal(3, 6, 5, seed=1)  # [B, fields m, d], [B, H, d]
        layer = CINLayer(7)
        # the layer works embedding-major: ([B, d, m], [B, d, H]) -> [B, d, H_k]
        x0t, xkt = x0.transpose(0, 2, 1), xk.transpose(0, 2, 1)
        p = random_params(layer, x0t, xkt)
        out = self.variant(layer.apply)(p, x0t, xkt)
        chex.assert_shape(out, (3, 5, 7))
        W, bias = np.asarray(p["params"]["kernel"]), np.asarray(p["params"]["bias"])
        np.testing.assert_allclose(np.asarray(out).transpose(0, 2, 1), np_cin_layer(x0, xk, W, bias),
                                   rtol=1e-4, atol=1e-4)


def test_crossnet_stacks_layers_on_the_same_x0():
    x0 = normal(4, 6)
    net = CrossNet(3)
    p = random_params(net, x0)
    x = x0
    for i in range(3):
        q = p["params"][f"layer_{i}"]
        x = np_cross_layer(x0, x, np.asarray(q["kernel"])[:, 0], np.asarray(q["bias"]))
    np.testing.assert_allclose(net.apply(p, x0), x, rtol=1e-4, atol=1e-4)
    # zero layers is the identity (the logit is then a linear model of the embeddings)
    np.testing.assert_array_equal(CrossNet(0).apply({}, x0), x0)


def test_dcnv2_cross_layer_equals_numpy():
    x0, xl = normal(5, 6), normal(5, 6, seed=1)
    layer = CrossLayerV2()
    p = random_params(layer, x0, xl)
    kernel = np.asarray(p["params"]["dense"]["kernel"])  # Flax: [in, out], so W = kernel^T
    b = np.asarray(p["params"]["dense"]["bias"])
    expect = np_cross_layer_v2(x0, xl, kernel.T, b)
    np.testing.assert_allclose(layer.apply(p, x0, xl), expect, rtol=1e-5, atol=1e-5)


def test_dcnv2_low_rank_mixture_equals_explicit_formula():
    x0, xl = normal(4, 6), normal(4, 6, seed=1)
    layer = CrossLayerV2Mix(low_rank=3, num_experts=2)
    p = random_params(layer, x0, xl)["params"]
    chex.assert_shape([p["U"], p["V"], p["C"], p["bias"], p["gate"]],
                      [(2, 6, 3), (2, 6, 3), (2, 3, 3), (6,), (6, 2)])
    expect = np_cross_layer_mix(x0, xl, *(np.asarray(p[k]) for k in ("U", "V", "C", "bias", "gate")))
    np.testing.assert_allclose(layer.apply({"params": p}, x0, xl), expect, rtol=1e-5, atol=1e-5)


def test_cin_pools_every_layer_over_the_embedding_dimension():
    x0 = normal(3, 4, 5)
    cin = CIN((3, 2))
    p = random_params(cin, x0)["params"]
    x1 = np_cin_layer(x0, x0, np.asarray(p["layer_0"]["kernel"]), np.asarray(p["layer_0"]["bias"]))
    x2 = np_cin_layer(x0, x1, np.asarray(p["layer_1"]["kernel"]), np.asarray(p["layer_1"]["bias"]))
    expect = np.concatenate([x1.sum(-1), x2.sum(-1)], axis=-1)  # Eqn. 7: p+ = [p^1, p^2]
    np.testing.assert_allclose(cin.apply({"params": p}, x0), expect, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- models

def small_batch(data: Dataset, n: int = 16) -> dict:
    return {k: jnp.asarray(v[:n]) for k, v in data.train.items()}


def test_parameter_counts_by_formula(tiny_synthetic: Dataset):
    s: Schema = tiny_synthetic.schema
    batch = small_batch(tiny_synthetic, 4)
    T, F, d = s.table_size, s.num_fields, 10
    D = F * d
    emb, lin = T * d, T + 1  # embedding table; LinearTerm: one weight per row + global bias
    L, hid = 2, (7, 5)

    def count(name, **kw):
        return num_params(build_model(name, s, **kw), batch)

    # crossnet: L x (w, b in R^D) + Dense(D -> 1)
    assert count("crossnet", num_layers=L) == emb + L * 2 * D + (D + 1)
    assert count("crossnet") == emb + 3 * 2 * D + (D + 1)
    # dcn: cross + MLP(D) + Dense(D + h_last -> 1)
    assert count("dcn", num_layers=L, hidden=hid) == emb + L * 2 * D + mlp_params(D, hid) + (D + 5 + 1)
    # dcnv2 full rank: L x (W in R^{DxD}, b in R^D)
    full = L * (D * D + D)
    assert count("dcnv2", num_layers=L, hidden=hid) == emb + full + mlp_params(D, hid) + (D + 5 + 1)
    assert count("dcnv2", num_layers=L, hidden=hid, structure="stacked") == \
        emb + full + mlp_params(D, hid) + (5 + 1)
    # low-rank mixture: per layer K x (U, V in R^{Dxr}, C in R^{rxr}) + shared b + gate [D, K]
    r, K = 3, 2
    mix = L * (K * (2 * D * r + r * r) + D + D * K)
    assert count("dcnv2", num_layers=L, hidden=hid, low_rank=r, num_experts=K) == \
        emb + mix + mlp_params(D, hid) + (D + 5 + 1)
    # cin: layer k has H_{k-1} * m * H_k weights + H_k biases (H_0 = m = F), Dense(ΣH -> 1)
    sizes = (6, 4)
    cin = (F * F * 6 + 6) + (6 * F * 4 + 4)
    assert count("cin", cin_layer_sizes=sizes) == emb + lin + cin + (10 + 1)
    default_cin = (F * F * 200 + 200) + 2 * (200 * F * 200 + 200)
    assert count("cin") == emb + lin + default_cin + (600 + 1)
    # xdeepfm: linear + cin + MLP(F d) + Dense(ΣH + h_last -> 1)
    assert count("xdeepfm", cin_layer_sizes=sizes, hidden=hid) == \
        emb + lin + cin + mlp_params(D, hid) + (10 + 5 + 1)
    assert count("xdeepfm") == emb + lin + default_cin + mlp_params(D, (400,) * 3) + (600 + 400 + 1)


def test_empty_dnn_reduces_to_the_interaction_network(tiny_synthetic: Dataset):
    s, batch = tiny_synthetic.schema, small_batch(tiny_synthetic, 4)
    assert num_params(build_model("dcn", s, hidden=()), batch) == num_params(build_model("crossnet", s), batch)
    assert num_params(build_model("xdeepfm", s, hidden=()), batch) == num_params(build_model("cin", s), batch)


@pytest.mark.parametrize("name, options", [
    ("crossnet", {}),
    ("dcn", {"dropout": 0.1}),
    ("dcnv2", {}),
    ("dcnv2", {"structure": "stacked", "low_rank": 4, "num_experts": 3, "dropout": 0.1}),
    ("cin", {}),
    ("xdeepfm", {"dropout": 0.1}),
])
def test_finite_logits_and_grads(name, options, tiny_synthetic: Dataset):
    model = build_model(name, tiny_synthetic.schema, **options)
    batch = small_batch(tiny_synthetic)
    variables = random_params(model, batch, scale=0.1)

    @jax.jit
    def logits_and_grads(variables):
        def loss(params):
            out, _ = model.apply({**variables, "params": params}, batch, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
            return jnp.mean(out**2)

        return model.apply(variables, batch), jax.grad(loss)(variables["params"])

    logits, grads = logits_and_grads(variables)
    chex.assert_shape(logits, (16,))
    chex.assert_tree_all_finite(logits)
    chex.assert_tree_all_finite(grads)
    # every cross / CIN weight receives gradient (the interaction path is wired in)
    inter = grads.get("cross", grads.get("cin"))
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(inter))


@pytest.mark.parametrize("name, options, match", [
    ("dcnv2", {"structure": "serial"}, "structure='serial'.*parallel"),
    ("dcnv2", {"low_rank": -1}, "low_rank=-1"),
    ("dcnv2", {"low_rank": 4, "num_experts": 0}, "num_experts=0"),
    ("crossnet", {"num_layers": -2}, "num_layers=-2"),
    ("cin", {"cin_layer_sizes": ()}, "cin_layer_sizes is empty"),
])
def test_bad_options_raise_config_error(name, options, match, tiny_synthetic: Dataset):
    with pytest.raises(ConfigError, match=match):  # out-of-range values fail in build_model
        model = build_model(name, tiny_synthetic.schema, **options)
        jax.eval_shape(model.init, jax.random.key(0), small_batch(tiny_synthetic, 2))


@pytest.fixture(scope="module")
def smoke_data():
    from dpn_jax.data.synthetic import make_synthetic

    data = make_synthetic(seed=0, rows=20_000, fields=4, vocab=10)
    # Train on whole batches of 512 only (15,872 of the 16,000 rows): a ragged last batch
    # would compile every model's train step a second time, a third of this test's cost.
    data.train = {k: v[: len(v) - len(v) % 512] for k, v in data.train.items()}
    return data


# Narrower towers than the defaults: the smoke test checks that each model learns, not its
# capacity, and must stay fast on two shared CPU cores.
SMOKE = {
    "crossnet": {},
    "dcn": {"hidden": (64, 64)},
    "dcnv2": {"hidden": (64, 64)},
    "cin": {"cin_layer_sizes": (16, 16)},
    "xdeepfm": {"cin_layer_sizes": (16, 16), "hidden": (64, 64)},
}


@pytest.mark.parametrize("name", MODELS)
def test_training_smoke(name, smoke_data: Dataset):
    model = build_model(name, smoke_data.schema, **SMOKE[name])
    cfg = TrainConfig(batch_size=512, eval_batch_size=2000, max_epochs=3, patience=5,
                      bn_recalibrate_batches=4)
    res = fit(model, smoke_data, cfg, log=lambda s: None, progress=False)
    assert res.test["auc"] > 0.6, res.history
