"""DIEN (dpn_jax.models.dien) and its recurrent layers (dpn_jax.nn.recurrent_layers): Python-loop
references of GRU/AUGRU/AGRU/AIGRU and of the auxiliary loss, padding invariance, the auxiliary
loss in the train step, finite gradients and a tiny training run."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seq_fixtures import (
    CATE_OF,
    DIEN_SMALL,
    MAX_LEN,
    N_ITEMS,
    append_padding,
    jbatch,
    make_split,
    pad_more,
    random_variables,
    seq_schema,
    sequences,
    tiny_dataset,
)

from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.models.dien import auxiliary_loss, negative_rows
from dpn_jax.nn.recurrent_layers import GRU, KINDS, recurrence
from dpn_jax.nn.sequence_layers import DINAttention
from dpn_jax.train.state import aux_loss

SMALL = DIEN_SMALL
PAD_CATE = N_ITEMS + 6  # the category history's pad id


def sig(t):
    return 1.0 / (1.0 + np.exp(-t))


def recurrence_reference(p, x, mask, att, kind):
    """Loops over rows and steps, gate blocks read from the documented layout (r, u, c)."""
    w, u_, b = (np.asarray(p[k], np.float64) for k in ("input_kernel", "hidden_kernel", "bias"))
    hsz = u_.shape[0]
    names = ("r", "c") if kind == "agru" else ("r", "u", "c")

    def blk(m, g):
        i = names.index(g)
        return m[..., i * hsz:(i + 1) * hsz]

    bsz, length, _ = x.shape
    outs, finals = np.zeros((bsz, length, hsz)), np.zeros((bsz, hsz))
    for n in range(bsz):
        h = np.zeros(hsz)
        for t in range(length):
            if not mask[n, t]:
                continue
            xt = x[n, t] * (att[n, t] if kind == "aigru" else 1.0)
            r = sig(xt @ blk(w, "r") + h @ blk(u_, "r") + blk(b, "r"))
            cand = np.tanh(xt @ blk(w, "c") + r * (h @ blk(u_, "c")) + blk(b, "c"))
            if kind == "agru":
                g = att[n, t]
            else:
                g = sig(xt @ blk(w, "u") + h @ blk(u_, "u") + blk(b, "u"))
                g = g * att[n, t] if kind == "augru" else g
            h = (1 - g) * h + g * cand
            outs[n, t] = h
        finals[n] = h
    return outs, finals


# ---------------------------------------------------------------------------------------------
# recurrent layers


@pytest.mark.parametrize("kind", KINDS)
def test_recurrence_matches_python_loop_and_ignores_padding(kind):
    x, mask = sequences(b=4, length=6, d=3)  # lengths 6, 1, 3, 0
    mask[0, 2] = False  # a hole
    att = np.random.default_rng(1).random(mask.shape).astype(np.float32)
    a = None if kind == "gru" else att
    layer = GRU(5, kind)
    v = random_variables(layer.init, x, mask, a, scale=0.7)
    p = jax.tree.map(np.asarray, v["params"])
    assert p["input_kernel"].shape == (3, (2 if kind == "agru" else 3) * 5)

    @jax.jit
    def run(v, x, m, a):
        return layer.apply(v, x, m, a)

    # NaN at every padded input and score: `where`, never products
    nan_x = np.where(mask[..., None], x, np.nan).astype(np.float32)
    nan_a = None if a is None else np.where(mask, att, np.nan).astype(np.float32)
    out, final = (np.asarray(t) for t in run(v, nan_x, mask, nan_a))
    exp_out, exp_final = recurrence_reference(p, x, mask, att, kind)
    np.testing.assert_allclose(out, exp_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(final, exp_final, rtol=1e-4, atol=1e-5)
    assert (out[~mask] == 0).all() and (final[3] == 0).all()  # empty history: zero state
    np.testing.assert_array_equal(final[1], out[1, 0])  # length 1: the one step's state
    np.testing.assert_array_equal(final[0], out[0, 5])
    # appended padded steps (random values) change nothing
    xx, mm = append_padding(x, mask)
    aa = None if a is None else np.concatenate([att, np.ones((4, 3), np.float32)], 1)
    out2, final2 = (np.asarray(t) for t in run(v, xx, mm, aa))
    np.testing.assert_allclose(out2[:, :6], out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(final2, final, rtol=1e-6, atol=1e-7)
    assert (out2[:, 6:] == 0).all()
    # finite gradients; none reaches a padded value
    def loss(v, x, a):
        o, f = layer.apply(v, x, mask, a)
        return jnp.sum(o ** 2) + jnp.sum(jnp.sin(f))

    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(v, nan_x, nan_a)
    chex.assert_tree_all_finite(g)
    assert (np.asarray(g[1])[~mask] == 0).all() and np.abs(np.asarray(g[1])[mask]).sum() > 0
    if a is not None:
        assert (np.asarray(g[2])[~mask] == 0).all() and np.abs(np.asarray(g[2])[mask]).sum() > 0


def test_recurrence_errors():
    x, mask = jnp.zeros((1, 3, 2)), jnp.ones((1, 3), bool)
    with pytest.raises(ConfigError, match="lstm"):
        jax.eval_shape(GRU(4, "lstm").init, jax.random.key(0), x, mask)
    with pytest.raises(ValueError, match="required"):
        jax.eval_shape(GRU(4, "augru").init, jax.random.key(0), x, mask)
    p = jax.eval_shape(GRU(4).init, jax.random.key(0), x, mask)
    with pytest.raises(ValueError, match="not used"):
        recurrence(p["params"], x, mask, jnp.ones((1, 3)), "gru")


# ---------------------------------------------------------------------------------------------
# the auxiliary loss


def test_negative_rows_are_a_random_derangement():
    for b in (2, 9):
        keys = jax.random.split(jax.random.PRNGKey(b), 6)
        draws = np.asarray(jax.jit(jax.vmap(lambda k, b=b: negative_rows(k, b)))(keys))
        for neg in draws:
            assert sorted(neg) == list(range(b)) and (neg != np.arange(b)).all()
            # a single cycle: following the negatives from row 0 visits every row
            seen, r = set(), 0
            for _ in range(b):
                seen.add(r)
                r = neg[r]
            assert len(seen) == b
        if b > 2:
            assert len({tuple(n) for n in draws}) > 1  # random
    np.testing.assert_array_equal(np.asarray(negative_rows(None, 4)), [1, 2, 3, 0])


def aux_reference(h, pos, neg, valid, p):
    def score(z):
        z = sig(z @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
        return (z @ p["score"]["kernel"] + p["score"]["bias"])[..., 0]

    total, count = 0.0, 0
    for n, t in zip(*np.nonzero(valid), strict=True):
        sp = score(np.concatenate([h[n, t], pos[n, t]]))
        sn = score(np.concatenate([h[n, t], neg[n, t]]))
        total += -np.log(sig(sp)) - np.log(1 - sig(sn))
        count += 1
    return total / max(count, 1)


def test_auxiliary_loss_matches_numpy():
    from dpn_jax.models.dien import AuxiliaryNet

    rng = np.random.default_rng(0)
    h, pos, neg = (rng.normal(size=(3, 4, s)).astype(np.float32) for s in (5, 3, 3))
    valid = rng.random((3, 4)) < 0.6
    valid[2] = False
    net = AuxiliaryNet((6,))
    v = random_variables(net.init, np.zeros((1, 8), np.float32), scale=0.8)
    p = jax.tree.map(lambda t: np.asarray(t, np.float64), v["params"])
    fn = jax.jit(lambda h, pos, neg, valid: auxiliary_loss(
        h, pos, neg, valid, functools.partial(net.apply, v)))
    garbage = lambda t: np.where(valid[..., None], t, np.nan).astype(np.float32)  # noqa: E731
    out = float(fn(garbage(h), garbage(pos), garbage(neg), valid))
    np.testing.assert_allclose(out, aux_reference(h, pos, neg, valid, p), rtol=1e-5)
    assert float(fn(h, pos, neg, np.zeros_like(valid))) == 0.0  # no pair: zero, not NaN


# ---------------------------------------------------------------------------------------------
# models


def test_dien_options_and_errors():
    opts = model_options("dien")
    assert (opts["embedding_dim"], opts["hidden"], opts["act"], opts["batch_norm"],
            opts["attention_hidden"], opts["attention_act"], opts["attention_groups"],
            opts["evolution"], opts["gru_dim"], opts["aux_loss_weight"], opts["aux_hidden"]) == (
        10, (200, 80), "dice", False, (80, 40), "sigmoid", "joint", "augru", 0, 1.0, (100, 50))
    dpo_opts = model_options("dien_dpo")
    assert (dpo_opts["generator"], dpo_opts["rank"], dpo_opts["heads"],
            dpo_opts["num_kernels"]) == ("lowrank", 4, 1, 4)
    batch = jbatch(make_split(4, 0))
    # one unit per history with attention_groups="pair": its own GRUs and auxiliary network;
    # gru_dim != the behaviour size projects the target to the interest size for the attention
    pair = build_model("dien", seq_schema(), **SMALL, attention_groups="pair", gru_dim=5)
    shapes = jax.eval_shape(pair.init, jax.random.PRNGKey(0), batch)["params"]
    for g in (0, 1):
        assert shapes[f"extractor_{g}"]["input_kernel"].shape == (4, 15)
        assert shapes[f"evolution_{g}"]["hidden_kernel"].shape == (5, 15)
        assert shapes[f"aux_{g}"]["dense_0"]["kernel"].shape == (5 + 4, 5)
        assert shapes[f"query_{g}"]["kernel"].shape == (4, 5)
    assert shapes["mlp"]["dense_0"]["kernel"].shape == (5 * 4 + 2 * 5, 8)
    agru = jax.eval_shape(build_model("dien", seq_schema(), **SMALL, evolution="agru").init,
                          jax.random.PRNGKey(0), batch)["params"]
    assert agru["evolution_0"]["hidden_kernel"].shape == (8, 16)  # r, c blocks only
    assert "query_0" not in agru
    # attention_scale (DIN's 1/sqrt(d) or DIEN's none) and attention_norm reach the attention
    # unit of both models; the layer's effect: TestDINAttention in test_sequence_models
    assert opts["attention_scale"] is True and dpo_opts["attention_scale"] is True
    assert opts["attention_norm"] == dpo_opts["attention_norm"] == "softmax"
    for name in ("dien", "dien_dpo"):
        for scale, norm in ((True, "softmax"), (False, "softmax"), (True, "sigmoid")):
            seen = []

            def record(f, args, kwargs, ctx, seen=seen):
                if isinstance(ctx.module, DINAttention):
                    seen.append((ctx.module.scale, ctx.module.weight_norm))
                return f(*args, **kwargs)

            model = build_model(name, seq_schema(), **SMALL, attention_scale=scale,
                                attention_norm=norm)
            with nn.intercept_methods(record):
                jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
            assert seen and set(seen) == {(scale, norm)}
    for bad, match in ((dict(evolution="lstm"), r"evolution='lstm'.*augru.*agru.*aigru"),
                       (dict(gru_dim=-1), "gru_dim"), (dict(aux_loss_weight=-1.0), "aux_loss"),
                       (dict(attention_norm="l1"), r"dien: attention_norm='l1'.*softmax.*sigmoid"),
                       (dict(query_transform="tanh"), r"dien: query_transform='tanh'.*auto.*dense_prelu")):
        with pytest.raises(ConfigError, match=match):  # out-of-range values fail in build_model
            model = build_model("dien", seq_schema(), **SMALL, **bad)
            jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)


def test_query_transform_dense_prelu_is_dien_public_code():
    """DIEN's din_fcn_attention: the attention reads PReLU(Dense(q)) (α from 0) even when the
    query already has the interest size; "auto" keeps q as it is then."""
    batch = jbatch(make_split(6, 1))
    seen = []

    def record(f, args, kwargs, ctx):
        if isinstance(ctx.module, DINAttention) and ctx.method_name == "__call__":
            seen.append(args[0])
        return f(*args, **kwargs)

    model = build_model("dien", seq_schema(), **SMALL, query_transform="dense_prelu")
    v = random_variables(model.init, batch)
    p = v["params"]
    assert set(p["query_prelu_0"]) == {"alpha"} and p["query_0"]["kernel"].shape == (8, 8)
    np.testing.assert_array_equal(model.init(jax.random.PRNGKey(0), batch)["params"]["query_prelu_0"]["alpha"], 0.0)
    seen.clear()
    with nn.intercept_methods(record):
        model.apply(v, batch)
    q_in = []

    def record_query(f, args, kwargs, ctx):
        if ctx.module.name == "query_0":
            q_in.append(args[0])
        return f(*args, **kwargs)

    with nn.intercept_methods(record_query):
        model.apply(v, batch)
    z = np.asarray(q_in[0]) @ np.asarray(p["query_0"]["kernel"]) + np.asarray(p["query_0"]["bias"])
    alpha = np.asarray(p["query_prelu_0"]["alpha"])
    np.testing.assert_allclose(seen[0], np.where(z >= 0, z, alpha * z), rtol=1e-5, atol=1e-6)
    auto = random_variables(build_model("dien", seq_schema(), **SMALL).init, batch)["params"]
    assert "query_0" not in auto and "query_prelu_0" not in auto


def short_histories(split):
    """Row 0: a one-step history, row 1: an empty one."""
    for key, pad in (("hist", 0), ("hist_cate", PAD_CATE)):
        split[f"seq/{key}"][:2] = pad
    split["seq/hist"][0, 0] = 5
    split["seq/hist_cate"][0, 0] = PAD_CATE + CATE_OF[5]
    return split


MODEL_CASES = [
    ("dien", {}),
    # agru is padding invariant as a layer (above); here the other evolutions and options
    ("dien_dpo", dict(evolution="aigru", gru_dim=5, attention_act="dice", dpo_input="behaviour",
                      act="relu", batch_norm=True, dropout=0.1, attention_norm="sigmoid",
                      query_transform="dense_prelu")),
]


@pytest.mark.parametrize("name,kw", MODEL_CASES)
def test_models_are_padding_invariant(name, kw):
    model = build_model(name, seq_schema(), **SMALL, **kw)
    split = short_histories(make_split(12, 4))
    v = random_variables(model.init, jbatch(split))
    # move the pad rows: their values must not matter (the target never uses local id 0)
    table = np.asarray(v["params"]["embedding"]["table"]).copy()
    table[[0, PAD_CATE]] += 100.0
    v_pad = {**v, "params": {**v["params"], "embedding": {"table": jnp.asarray(table)}}}
    longer = build_model(name, seq_schema(MAX_LEN + 3), **SMALL, **kw)
    rngs = {"dropout": jax.random.PRNGKey(2)}

    def train(m, v, b):  # train-mode logits, batch statistics and the aux loss
        return m.apply(v, b, train=True, mutable=["batch_stats", "losses"], rngs=rngs)

    short = jax.jit(lambda v, b: (model.apply(v, b), train(model, v, b)))  # + inference logits
    ref = short(v, jbatch(split))
    chex.assert_tree_all_finite(ref)  # one-step and empty histories included
    aux = float(aux_loss(ref[1][1]))  # what the train step adds to the data loss
    assert aux > 0.5  # two BCE terms near log 2 each with random parameters
    chex.assert_trees_all_close(short(v_pad, jbatch(split)), ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(functools.partial(train, longer))(
        v, jbatch(pad_more(split, 3))), ref[1], rtol=1e-5, atol=1e-6)
    # the one-step history matters
    other = {**split, "seq/hist": split["seq/hist"].copy()}
    other["seq/hist"][0, 0] = 7
    assert not np.allclose(np.asarray(short(v, jbatch(other))[0])[0], np.asarray(ref[0])[0])


def test_aux_loss_end_to_end_matches_numpy_and_only_in_train_mode():
    """The sowed loss = α × the numpy reference computed from the model's own parameters: GRU
    states by the Python loop, next behaviours and the negatives the model drew."""
    schema = seq_schema()
    model = build_model("dien", schema, **SMALL, aux_loss_weight=0.5)
    split = short_histories(make_split(8, 7))
    batch = jbatch(split)
    v = random_variables(model.init, batch)
    _, upd = jax.jit(lambda v, b: model.apply(
        v, b, train=True, mutable=["batch_stats", "losses", "intermediates"],
        rngs={"dropout": jax.random.PRNGKey(3)}))(v, batch)
    neg = np.asarray(upd["intermediates"]["dien_negative_rows"][0])
    assert (neg != np.arange(8)).all()
    p = jax.tree.map(lambda t: np.asarray(t, np.float64), v["params"])
    table = p["embedding"]["table"]
    keys = np.concatenate([table[split["seq/hist"]], table[split["seq/hist_cate"]]], -1)
    mask = split["seq/hist"] != 0
    states, _ = recurrence_reference(p["extractor_0"], keys, mask, None, "gru")
    valid = mask[:, :-1] & mask[:, 1:] & mask[neg][:, 1:]
    expect = aux_reference(states[:, :-1], keys[:, 1:], keys[neg][:, 1:], valid, p["aux_0"])
    np.testing.assert_allclose(float(upd["losses"]["dien_aux"][0]), 0.5 * expect, rtol=1e-4)
    # inference sows nothing
    _, upd_eval = jax.eval_shape(lambda v, b: model.apply(v, b, mutable=["losses"]), v, batch)
    assert "losses" not in upd_eval
    # aux_loss_weight=0: neither the auxiliary network nor the term
    off = build_model("dien", schema, **SMALL, aux_loss_weight=0.0)
    v_off = jax.eval_shape(off.init, jax.random.PRNGKey(0), batch)
    assert "aux_0" not in v_off["params"] and "extractor_0" in v_off["params"]
    _, upd_off = jax.eval_shape(lambda v, b: off.apply(
        v, b, train=True, mutable=["batch_stats", "losses"],
        rngs={"dropout": jax.random.PRNGKey(0)}), v_off, batch)
    assert "losses" not in upd_off and float(aux_loss(upd_off)) == 0.0


class TestDIEN(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_finite_gradients(self):
        batch = jbatch(make_split(16, 3))
        # small: without jit every operation is dispatched (and compiled) one by one
        model = build_model("dien_dpo", seq_schema(), embedding_dim=3, hidden=(4,), act="relu",
                            attention_hidden=(3,), aux_hidden=())
        v = random_variables(model.init, batch)

        def loss(params, batch):
            out, upd = model.apply({**v, "params": params}, batch, train=True,
                                   mutable=["batch_stats", "losses"],
                                   rngs={"dropout": jax.random.PRNGKey(1)})
            return jnp.mean(out ** 2) + upd["losses"]["dien_aux"][0], out

        # one pass for the logits and the gradient (each eager pass costs seconds)
        (_, logits), g = self.variant(jax.value_and_grad(loss, has_aux=True))(v["params"], batch)
        chex.assert_shape(logits, (16,))
        chex.assert_tree_all_finite((logits, g))
        # every stage is used: its parameters receive gradient
        for stage in ("extractor_0", "attention_0", "evolution_0", "aux_0"):
            assert sum(np.abs(np.asarray(t)).sum() for t in jax.tree.leaves(g[stage])) > 0, stage


def test_training_beats_chance_and_optimises_the_aux_loss():
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    data = tiny_dataset()
    model = build_model("dien", data.schema, embedding_dim=8, hidden=(32,),
                        attention_hidden=(16,), aux_hidden=(16,))
    cfg = TrainConfig(batch_size=150, max_epochs=5, patience=5, lr=3e-3, eval_batch_size=1000,
                      bn_recalibrate=False)  # compiling dominates: each epoch costs ~0.3 s
    aux_params = []
    res = fit(model, data, cfg, log=lambda s: None, progress=False,
              on_epoch=lambda e, st: aux_params.append(jax.tree.map(np.array, st.params["aux_0"])))
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.05, res.history
    assert res.test["auc"] > 0.65, res.history
    # make_train_step optimises data loss + aux: the auxiliary network, whose only gradient is
    # the auxiliary term's, moves from epoch to epoch
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), aux_params[0], aux_params[-1])
    assert min(jax.tree.leaves(moved)) > 1e-4, moved
