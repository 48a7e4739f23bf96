"""The DPO knock-out (dpn_jax.analysis.knockout, ``dpn-jax evaluate BUNDLE --knockout dpo``):
every DPO kind reduces EXACTLY to its static formula (numpy), a dead generator changes nothing, a
planted context makes the knock-out cost AUC, and the CLI on a trained bundle."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seq_fixtures import DIEN_SMALL, make_split, seq_schema
from test_cli import run_cli
from test_serving_data import trained_bundle

from dpn_jax.analysis.knockout import dpo_layers, dynamic_share, knockout_params
from dpn_jax.data.synthetic import make_synthetic
from dpn_jax.metrics import auc
from dpn_jax.models import build_model
from dpn_jax.nn.dpo_context import FieldContextDPO
from dpn_jax.nn.dpo_layers import FeatureDPO, FieldDPO
from dpn_jax.nn.sequence_layers import DynamicConv, QueryBehaviourDPO

TOL = dict(rtol=2e-5, atol=2e-5)


class Wrap(nn.Module):
    """A one-layer "model" (the knock-out finds DPO layers by tracing ``init(key, batch)``)."""

    layer: nn.Module

    @nn.compact
    def __call__(self, batch, train: bool = False):
        return self.layer(*batch["args"])


def knocked_out(layer: nn.Module, *args):
    """(the layer's perturbed params, its output, its output after the knock-out)."""
    model, batch = Wrap(layer), {"args": args}
    params = model.init(jax.random.key(0), batch)["params"]
    # Every parameter away from its init: dynamic biases, D, U, V, β, ... all non-zero.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                       for a, k in zip(leaves, keys)])
    layers = dpo_layers(model, batch)
    assert [x.path for x in layers] == [("layer",)]
    ko = knockout_params(model, params, layers=layers)
    y = np.asarray(model.apply({"params": params}, batch))
    y_ko = np.asarray(model.apply({"params": ko}, batch))
    assert not np.allclose(y, y_ko, **TOL)  # the generated part mattered before the knock-out
    return jax.tree.map(np.asarray, params["layer"]), y, y_ko


def static_dense(p: dict, family: str) -> tuple[np.ndarray, np.ndarray]:
    """The static kernel ``[m, n]`` and bias ``[n]`` of a generator's params, from their layout."""
    if family in ("lowrank", "hyperdense"):
        k, b = p["kernel"][:, 0, :], p["bias"][0] if "bias" in p else 0
    elif family == "multihead":  # block diagonal of the heads' static kernels
        heads, mh, _, nh = p["kernel"].shape
        k = np.zeros((heads * mh, heads * nh), np.float32)
        for h in range(heads):
            k[h * mh:(h + 1) * mh, h * nh:(h + 1) * nh] = p["kernel"][h, :, 0, :]
        b = p["bias"][:, 0, :].reshape(-1) if "bias" in p else 0
    elif family == "mixture":  # the uniform mixture
        k, b = p["kernel"].mean(axis=1), p["bias"].mean(axis=0) if "bias" in p else 0
    else:  # diagonal, rank1: an explicit static kernel
        k, b = p["kernel"], p["bias"][0] if "bias" in p else 0
    return k, np.broadcast_to(b, (k.shape[1],))


FAMILIES = [("lowrank", 1), ("lowrank", 2), ("multihead", 2), ("hyperdense", 1), ("mixture", 1),
            ("diagonal", 1), ("rank1", 1)]


def family_of(generator: str, heads: int) -> str:
    return "multihead" if heads > 1 else generator


@pytest.mark.parametrize("generator,heads", FAMILIES)
@pytest.mark.parametrize("use_bias,context_norm", [(True, False), (False, True)])
def test_feature_dpo_knocked_out_is_its_static_dense_layer(generator, heads, use_bias,
                                                           context_norm):
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    layer = FeatureDPO(4, generator=generator, heads=heads, use_bias=use_bias,
                       context_norm=context_norm)
    p, _, y_ko = knocked_out(layer, x, z)
    k, b = static_dense(p, family_of(generator, heads))
    np.testing.assert_allclose(y_ko, x @ k + b, **TOL)


@pytest.mark.parametrize("generator", ["lowrank", "rank1"])  # the basis path and the other one
def test_other_field_context_dpo_knocked_out_is_a_dense_layer_on_the_flat_input(generator):
    e = np.random.default_rng(1).normal(size=(5, 3, 2)).astype(np.float32)
    p, _, y_ko = knocked_out(FieldContextDPO(4, generator=generator), e)
    k, b = static_dense(p, generator)
    np.testing.assert_allclose(y_ko, e.reshape(5, 6) @ k + b, **TOL)


@pytest.mark.parametrize("generator", ["lowrank", "mixture", "rank1", "diagonal"])
@pytest.mark.parametrize("aggregation,exclude_self", [("self", False), ("sum", False),
                                                      ("sum", True), ("attentive", False),
                                                      ("attentive", True), ("concat", False)])
def test_field_dpo_knocked_out_is_the_static_kernel_times_the_aggregated_constant(
        generator, aggregation, exclude_self):
    fields = 3
    x = np.random.default_rng(2).normal(size=(5, fields, 4)).astype(np.float32)
    layer = FieldDPO(aggregation, generator, features=3, exclude_self=exclude_self)
    p, _, y_ko = knocked_out(layer, x)
    k, b = static_dense(p, generator)
    # Σ_j g(z_j) x_i sums the constant coefficient F (F − 1) times; attention weights sum to 1.
    times = {"sum": fields - exclude_self}.get(aggregation, 1)
    np.testing.assert_allclose(y_ko, times * (x @ k + b), **TOL)


def _mask(bsz: int, length: int) -> np.ndarray:
    lengths = np.array([0, 1, length, 2, length - 1])[:bsz]
    return np.arange(length)[None] < lengths[:, None]


@pytest.mark.parametrize("generator,heads", [("lowrank", 1), ("multihead", 2), ("mixture", 1)])
@pytest.mark.parametrize("din_features", [False, True])
def test_query_behaviour_dpo_knocked_out_applies_the_static_kernel_to_every_valid_step(
        generator, heads, din_features):
    rng = np.random.default_rng(3)
    x, q = rng.normal(size=(5, 4, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    mask = _mask(5, 4)
    layer = QueryBehaviourDPO(6, generator, heads=heads, din_features=din_features)
    p, _, y_ko = knocked_out(layer, x, q, jnp.asarray(mask))
    k, b = static_dense(p, family_of(generator, heads))
    keys = np.where(mask[..., None], x, 0)
    if din_features:  # DIN's [q, k_i, q − k_i, q ⊙ k_i]
        qb = np.broadcast_to(q[:, None], keys.shape)
        keys = np.concatenate([qb, keys, qb - keys, qb * keys], axis=-1)
    np.testing.assert_allclose(y_ko, np.where(mask[..., None], keys @ k + b, 0), **TOL)


def static_conv(beta: np.ndarray, x: np.ndarray, mask: np.ndarray, heads: int,
                normalize: bool) -> np.ndarray:
    """The dynamic convolution with the fixed kernel logits β ``[H, k]`` (loops, numpy)."""
    bsz, length, d = x.shape
    k = beta.shape[1]
    r = k // 2
    y = np.zeros_like(x)
    for b in range(bsz):
        for i in range(length):
            if not mask[b, i]:
                continue
            slots = [o for o in range(k) if 0 <= i + o - r < length and mask[b, i + o - r]]
            w = beta[:, slots]
            if normalize:
                w = np.exp(w - w.max(axis=1, keepdims=True))
                w = w / w.sum(axis=1, keepdims=True)
            for c in range(d):
                h = c // (d // heads)
                y[b, i, c] = sum(w[h, j] * x[b, i + o - r, c] for j, o in enumerate(slots))
    return y


@pytest.mark.parametrize("heads,combine,normalize", [(0, "add", True), (1, "mul", True),
                                                     (2, "add", False)])
def test_dynamic_conv_knocked_out_is_the_fixed_kernel_of_its_bias(heads, combine, normalize):
    rng = np.random.default_rng(4)
    x, mask = rng.normal(size=(5, 5, 4)).astype(np.float32), _mask(5, 5)
    layer = DynamicConv(3, heads, combine, normalize)
    p, _, y_ko = knocked_out(layer, x, jnp.asarray(mask))
    n_heads = heads or 4
    want = static_conv(p["bias"].reshape(n_heads, 3), x, mask, n_heads, normalize)
    np.testing.assert_allclose(y_ko, want, **TOL)


# ----------------------------------------------------------------------------- whole models


def test_every_dpo_layer_of_the_dpo_models_is_found():
    syn = make_synthetic(seed=3, rows=200, fields=4, vocab=10).schema
    seq = seq_schema()
    cases = {
        ("dnn", syn): [], ("din", seq): [], ("bst", seq): [],
        ("dpn", syn): [("dpo_0", "feature", "lowrank")],
        ("dpn_field", syn): [("interaction/field_dpo_0", "field (sum)", "lowrank")],
        ("din_dpo", seq): [("attention_0/dpo_0", "query-behaviour (DIN features)", "lowrank")],
        ("dien_dpo", seq): [("attention_0/dpo_0", "query-behaviour (DIN features)", "lowrank")],
        ("bst_dpo", seq): [
            ("transformer_0/encoder/block_0/dynamic_conv", "behaviour-behaviour (dynamic conv)",
             "dynamic_conv"),
            ("transformer_0/decoder/value_dpo", "query-behaviour", "lowrank")],
    }
    for (name, schema), want in cases.items():
        opts = DIEN_SMALL if name.startswith("dien") else {}
        got = [(x.name, x.kind, x.family) for x in dpo_layers(build_model(name, schema, **opts))]
        assert got == want, name
    dyjoint = build_model("dyjoint", seq, hidden=(8, 8), dpo_layers="all", generator="mixture")
    assert [(x.name, x.family) for x in dpo_layers(dyjoint)] == [
        ("transformer_0/encoder/block_0/dynamic_conv", "dynamic_conv"),
        ("transformer_0/decoder/value_dpo", "mixture"), ("dpo_0", "mixture"), ("dpo_1", "mixture")]
    other = build_model("dpn", syn, hidden=(8,), context="other_fields", heads=2)
    assert [(x.kind, x.family) for x in dpo_layers(other)] == [
        ("feature (other-field contexts)", "multihead")]


def _dpn(generator: str = "lowrank"):
    data = make_synthetic(seed=3, rows=600, fields=4, vocab=10)
    model = build_model("dpn", data.schema, hidden=(16, 8), generator=generator)
    batch = {k: v for k, v in data.test.items() if k != "label"}
    variables = model.init(jax.random.key(0), batch)
    return data, model, batch, variables


def test_knockout_changes_only_the_dpo_layers_generated_part():
    _, model, _, variables = _dpn()
    params = variables["params"]
    ko = knockout_params(model, params)
    flat, flat_ko = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (params, ko))
    changed = {"/".join(k.key for k in path) for path in flat
               if not np.array_equal(flat[path], flat_ko[path])}
    assert changed == {"dpo_0/kernel"}  # dpn's DPO has no bias under BatchNorm
    np.testing.assert_array_equal(ko["dpo_0"]["kernel"][:, 0], params["dpo_0"]["kernel"][:, 0])
    assert not np.any(ko["dpo_0"]["kernel"][:, 1:])


def test_knockout_of_a_sequence_model_changes_its_nested_dpo_layers_only():
    seq = seq_schema()
    model = build_model("bst_dpo", seq, embedding_dim=4, hidden=(8,))
    batch = {k: v[:4] for k, v in make_split(8, 0).items() if k != "label"}
    variables = model.init(jax.random.key(0), batch)
    params = variables["params"]
    ko = knockout_params(model, params)
    flat, flat_ko = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (params, ko))
    changed = {"/".join(k.key for k in path) for path in flat
               if not np.array_equal(flat[path], flat_ko[path])}
    conv, value = "transformer_0/encoder/block_0/dynamic_conv", "transformer_0/decoder/value_dpo"
    # value_dpo's bias rows 1: start at zero: unchanged by zeroing them
    assert changed == {f"{conv}/local_proj", f"{conv}/global_proj", f"{value}/kernel"}
    assert not np.any(ko["transformer_0"]["encoder"]["block_0"]["dynamic_conv"]["global_proj"])
    assert np.all(np.isfinite(model.apply({**variables, "params": ko}, batch)))


@pytest.mark.parametrize("generator", ["lowrank", "mixture"])
def test_a_dead_generator_makes_the_knockout_change_nothing(generator):
    data, model, batch, variables = _dpn(generator)
    p = dict(variables["params"])
    kernel = p["dpo_0"]["kernel"]
    before = model.apply(variables, batch)
    # The trained-looking model first: at init the generated part is ~1e-5 of the static one,
    # still enough to move the logits.
    assert not np.array_equal(before, model.apply(
        {**variables, "params": knockout_params(model, p)}, batch))
    if generator == "lowrank":  # the generated kernels Ẇ_k zero
        dead = kernel.at[:, 1:].set(0)
    else:  # every mixture kernel the same: the gate selects nothing
        dead = jnp.broadcast_to(kernel[:, :1], kernel.shape)
    variables = {**variables, "params": {**p, "dpo_0": {**p["dpo_0"], "kernel": dead}}}
    logits = model.apply(variables, batch)
    ko = knockout_params(model, variables["params"])
    ko_logits = model.apply({**variables, "params": ko}, batch)
    np.testing.assert_array_equal(logits, ko_logits)
    share = dynamic_share(model, variables, data.test, batch_size=256)
    assert share[0]["layer"] == "dpo_0" and share[0]["share"] == 0 and share[0]["rows"] == 60


@pytest.mark.slow
def test_knockout_costs_auc_where_a_context_is_planted():
    """A DPN trained where a third of the logit is a context-modulated interaction (measured:
    test AUC 0.722 -> 0.690 knocked out, dynamic share 0.32; the same run at 60k rows and 8
    epochs: 0.802 -> 0.743, share 0.39)."""
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    data = make_synthetic(seed=2021, rows=30_000, vocab=10, contextual=3.0)
    model = build_model("dpn", data.schema, hidden=(64, 32))
    res = fit(model, data, TrainConfig(batch_size=512, lr=3e-3, max_epochs=4, seed=2021),
              log=lambda s: None, progress=False)
    variables = {"params": res.params, "batch_stats": res.batch_stats}
    batch = {k: v for k, v in data.test.items() if k != "label"}
    logits = np.asarray(model.apply(variables, batch))
    ko = knockout_params(model, res.params)
    ko_logits = np.asarray(model.apply({**variables, "params": ko}, batch))
    labels = data.test["label"]
    with_, without = auc(labels, logits), auc(labels, ko_logits)
    assert with_ - without > 0.01, (with_, without)
    [share] = dynamic_share(model, variables, data.test)
    assert share["share"] > 0.1, share


# ----------------------------------------------------------------------------- the CLI


def test_cli_evaluate_knockout_on_a_trained_bundle(tmp_path_factory, tmp_path: Path, capsys):
    from dpn_jax.analysis.evaluate import score_split
    from dpn_jax.serving.predictor import load

    bundle = trained_bundle(tmp_path_factory, "dpn")
    capsys.readouterr()
    out = tmp_path / "ko"
    code, stdout, err = run_cli(["evaluate", str(bundle), "--knockout", "dpo", "--out", str(out)],
                                capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"knockout.md", "knockout.json"}
    report = json.loads((out / "knockout.json").read_text())
    assert stdout.strip() == (out / "knockout.md").read_text().strip()
    assert "| `dpo_0` | feature | lowrank |" in stdout and "Mean |Δ logit|" in stdout
    recorded = json.loads((bundle / "results.json").read_text())["test_auc"]
    assert report["with"]["auc"] == recorded  # scored exactly as training evaluated
    # The knock-out by hand: the generated kernels of the one DPO layer zeroed.
    predictor = load(bundle)
    p = predictor.variables["params"]
    kernel = np.asarray(p["dpo_0"]["kernel"]).copy()
    kernel[:, 1:] = 0
    predictor.variables = {**predictor.variables,
                           "params": {**p, "dpo_0": {**p["dpo_0"], "kernel": jnp.asarray(kernel)}}}
    from dpn_jax.data import load_dataset

    test = load_dataset(str(bundle.parent / "spec.yaml")).test
    by_hand = score_split(predictor, test, 64)
    assert report["without"]["auc"] == pytest.approx(auc(test["label"], by_hand), abs=1e-6)
    [layer] = report["layers"]
    assert layer["layer"] == "dpo_0" and layer["share"] > 0 and layer["rows"] == report["rows"]
    assert report["mean_abs_delta_logit"] > 0 and report["logit_std"] > 0


def test_cli_evaluate_knockout_refusals_are_one_line(tmp_path_factory, capsys):
    dnn = trained_bundle(tmp_path_factory, "dnn")
    dpn = trained_bundle(tmp_path_factory, "dpn")
    capsys.readouterr()
    for args, fragments in (
            ([str(dnn), "--knockout", "dpo"], ("'dnn'", "no DPO layer")),
            ([str(dpn), "--knockout", "dpo", "--buckets", "0,1+"], ("--buckets", "--by-frequency"))):
        code, _, err = run_cli(["evaluate", *args], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("dpn-jax: error:"), err
        assert all(f in lines[0] for f in fragments), lines[0]
