# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Sequence DPO: dynamic kernels over a user's history
#
# The paper's sequence-based DPO (§2.4, docs/dpo_math.md, §'Sequence-based DPO') has two forms:
#
# * **homogeneous (behaviour-behaviour)**: a dynamic depthwise convolution. Each step $i$ of the
#   history gets its own window kernel $W_i \in \mathbb{R}^{k}$, generated from a local view
#   (a convolution of the neighbours) and a global one (the mean of the valid behaviours), then
#   $y_{i} = \sum_{|o| \le k/2} W_{i,o}\, x_{i+o}$ over the **valid** neighbours only;
# * **heterogeneous (query-behaviour)**: the target item $q$ generates one kernel that is applied
#   to every behaviour, $y_i = W(q)\,x_i + b(q)$.
#
# We check both on a toy history with the pure functions of `dpn_jax.dpo.sequence`, then train
# the paper's sDPN (`bst_dpo`: Transformer encoder with the dynamic convolution beside
# self-attention, decoder whose values are the query-generated DPO outputs) on the Amazon
# Musical Instruments log (`amazon_instruments`; a generated log when `../shared/data` is absent)
# and look at the kernels it produces for one real user and two different targets.
#
# About a minute on 2 CPU cores.

# %%
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from dpn_jax import dpo
from dpn_jax.data import load_dataset
from dpn_jax.data.behaviour import InteractionLog, build_behaviour_dataset
from dpn_jax.dpo import sequence as sq
from dpn_jax.errors import DataError
from dpn_jax.models import build_model
from dpn_jax.nn.sequence_layers import DynamicConv, QueryBehaviourDPO
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit

T0 = time.perf_counter()
FIG_DIR = Path(os.environ.get("DPN_NOTEBOOK_FIGURES", "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. The dynamic convolution on a toy history
#
# Two histories of 6 steps and 4 channels, right-padded: the first has 4 real steps, the second
# only one. Kernel size $k = 3$ (a window centred on each step), one kernel per channel
# (depthwise, the paper's $c = 1$), softmax over the valid window slots.

# %%
rng = np.random.default_rng(0)
x = rng.normal(size=(2, 6, 4)).astype(np.float32)
mask = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
params = sq.init_dynamic_conv(jax.random.key(0), 4, 3)
params = params._replace(local_proj=3 * params.local_proj)  # sharper kernels, for the display
W = np.asarray(sq.dynamic_conv_weights(params, x, mask))  # [B, L, H=d, k]
y = np.asarray(sq.dynamic_conv(params, x, mask))

print("kernels of channel 0 for the first history (rows: steps, columns: offsets -1, 0, +1)")
print(np.round(W[0, :, 0, :], 3))
# every valid step's kernel is a distribution over its VALID neighbours ...
np.testing.assert_allclose(W.sum(-1)[mask], 1.0, rtol=1e-5)
# ... the first step has no left neighbour, the last valid step no right one, padded steps nothing
assert (W[0, 0, :, 0] == 0).all() and (W[0, 3, :, 2] == 0).all() and (W[0, 4:] == 0).all()
# padded values never matter, padded outputs are zero
x_garbage = np.where(mask[..., None], x, 1e4).astype(np.float32)
np.testing.assert_array_equal(np.asarray(sq.dynamic_conv(params, x_garbage, mask)), y)
assert (y[~mask] == 0).all()
# a one-step history maps to itself: its only valid slot gets weight 1
np.testing.assert_allclose(y[1, 0], x[1, 0], rtol=1e-6)
# Eqn. 6 written out for step 2, channel 1 of the first history
np.testing.assert_allclose(y[0, 2, 1], W[0, 2, 1] @ x[0, 1:4, 1], rtol=1e-5)
print("dynamic convolution: masking and Eqn. 6 checks passed")

# %% [markdown]
# ## 2. The query-behaviour DPO is one generated kernel per target
#
# For a fixed query, $x \mapsto W(q)x + b(q)$ is an ordinary linear map. The library evaluates
# it in one of two exact ways: fused (the low-rank generator, Eqn. 5, mixes $l+1$ static kernels
# with coefficients $h(q)$, no kernel is built: $L(l+1)$ products per history) or, the default
# for histories longer than one step, by building each target's kernel once and applying it to
# every step ($l + 1 + L$ products). Both agree with the materialised kernel, and two queries give
# two different kernels for the same behaviours.

# %%
gen = dpo.make_generator("lowrank", 4, 3, 5, rank=2)  # behaviours of 4 dims -> 3 outputs, |q| = 5
gp = gen.init(jax.random.key(1))
gp = gp._replace(kernel=gp.kernel.at[:, 1:].multiply(8.0))  # a visible dynamic part
qs = rng.normal(size=(2, 5)).astype(np.float32)
hist = np.broadcast_to(x[:1], (2, 6, 4))  # the SAME history for both targets
m2 = np.broadcast_to(mask[:1], (2, 6))
yq = np.asarray(sq.query_behaviour_apply(gen, gp, hist, qs, m2))
Wq, bq = (np.asarray(t) for t in sq.query_behaviour_kernels(gen, gp, jnp.asarray(qs)))
np.testing.assert_allclose(yq, np.where(m2[..., None], np.einsum("bnm,blm->bln", Wq, hist)
                                        + bq[:, None], 0), rtol=1e-4, atol=1e-5)
yq_fused = np.asarray(sq.query_behaviour_apply(gen, gp, hist, qs, m2, materialize=False))
np.testing.assert_allclose(yq_fused, yq, rtol=1e-4, atol=1e-5)
print("||W(q1) - W(q2)||_F =", round(float(np.linalg.norm(Wq[0] - Wq[1])), 3),
      " (||W(q1)||_F =", round(float(np.linalg.norm(Wq[0])), 3), ")")

# %% [markdown]
# ### DIN's attention input never needs to be built
#
# DIN scores behaviour $k_i$ against the target $q$ with an MLP on $[q, k_i, q-k_i, q\odot k_i]$
# ($4d$ wide). Split the first layer's kernel into row blocks $W = [W_q; W_k; W_d; W_p]$:
#
# $$[q, k_i, q-k_i, q\odot k_i]\,W = \underbrace{q(W_q + W_d)}_{c(q)} +
#   k_i\,\underbrace{(W_k - W_d + \mathrm{diag}(q)\,W_p)}_{M(q)}$$
#
# The query part is computed once per target and each step costs a $d\times n$ product instead
# of $4d\times n$; with a query-generated kernel (DIN-DPO) $M(q)$ is simply built from $W(q)$.
# `dpo.sequence.din_features_dense` is this identity; the DIN and DPO-armed attention units use it.

# %%
d, n = 4, 3
q1 = rng.normal(size=(2, d)).astype(np.float32)
keys = rng.normal(size=(2, 6, d)).astype(np.float32)
Wd = rng.normal(size=(4 * d, n)).astype(np.float32)
concat = np.asarray(sq.din_features(q1, keys)) @ Wd
np.testing.assert_allclose(np.asarray(sq.din_features_dense(q1, keys, Wd)), concat, rtol=1e-4, atol=1e-5)
Wq_, Wk_, Wd_, Wp_ = np.split(Wd, 4)
M = Wk_ - Wd_ + q1[0][:, None] * Wp_  # M(q) of the first target, [d, n]
np.testing.assert_allclose(keys[0] @ M + q1[0] @ (Wq_ + Wd_), concat[0], rtol=1e-4, atol=1e-5)
print("DIN features: c(q) + k_i M(q) equals the concatenated form")

# %% [markdown]
# ## 3. Train sDPN on a real behaviour log
#
# `amazon_instruments` is the Musical Instruments 5-core review log turned into DIN-style CTR
# rows (`dpn_jax/data/behaviour.py`): for each user in time order, every review after the first
# is a positive with the items before it as history, paired with a negative whose target was
# drawn from the items that user never reviewed; the last interaction goes to test. Positive and
# negative of one user therefore share the history and differ only in the target: exactly the
# two-targets comparison of section 5.
#
# Without the real data we generate a log where users drift between item categories, so the
# history says which targets are likely.


# %%
def generated_log(users=400, items=120, cats=8, steps=12, seed=0):
    r = np.random.default_rng(seed)
    cat_of = np.arange(items) % cats
    u, it = [], []
    for user in range(users):
        c = r.integers(cats)
        for _ in range(steps):
            c = c if r.random() < 0.8 else r.integers(cats)
            u.append(f"u{user}")
            it.append(f"i{r.choice(np.flatnonzero(cat_of == c))}")
    return InteractionLog(np.array(u), np.array(it))


try:
    data = load_dataset("amazon_instruments")
except DataError as err:
    print("real data unavailable (", err, ") -> a generated log")
    data = build_behaviour_dataset(generated_log(), "generated_log", max_len=20)
print(data.name, {k: len(v["label"]) for k, v in (("train", data.train), ("valid", data.valid),
                                                      ("test", data.test))})

CFG = TrainConfig(batch_size=256, lr=3e-3, max_epochs=5, seed=2021)  # transformers start slowly at 1e-3
model = build_model("bst_dpo", data.schema, embedding_dim=8, hidden=(64, 32))
res = fit(model, data, CFG, log=print, progress=False)
display(Markdown(f"`bst_dpo` (sDPN): test AUC **{res.test['auc']:.4f}**, logloss "
                 f"{res.test['logloss']:.4f}, best epoch {res.best_epoch}"))

# %% [markdown]
# ## 4. The kernels sDPN generates over one user's history
#
# We run the trained model on two test rows and record what reaches its DPO layers with Flax's
# method interceptor: the dynamic convolution's input and parameters (its kernels are then
# recomputed with the pure function `dynamic_conv_weights` and checked against the layer's
# output), and the query-behaviour DPO's behaviours and target. The user is the test user with
# the longest history; the two rows are that user's positive (the item they reviewed next) and
# negative (a sampled item).

# %%
hist_name = next(f.name for f in data.schema.seq_fields)
ids = np.asarray(data.test[f"seq/{hist_name}"])
pad = data.schema.field(hist_name).pad_id
lengths = (ids != pad).sum(1)
labels = np.asarray(data.test["label"])
# rows of the longest history: the positive and the negative share it
longest = np.flatnonzero((ids == ids[np.argmax(lengths)]).all(1))
rows = [int(longest[labels[longest] == 1][0]), int(longest[labels[longest] == 0][0])]
batch = {k: jnp.asarray(np.asarray(v)[rows]) for k, v in data.test.items()}
captured = {}


def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, DynamicConv) and "conv" not in captured:
        captured["conv"] = (sq.DynamicConvParams(**context.module.variables["params"]), *args,
                            out)
    if isinstance(context.module, QueryBehaviourDPO) and context.method_name == "__call__":
        layer = context.module.clone(parent=None)  # a free copy, applied again below
        captured["hetero"] = (layer, context.module.variables["params"], *args, out)
    return out


variables = {"params": res.params, **({"batch_stats": res.batch_stats} if res.batch_stats else {})}
with nn.intercept_methods(record):
    logits = model.apply(variables, batch)
probs = np.asarray(jax.nn.sigmoid(logits))

cp, cx, cmask, cout = captured["conv"]
kernels = np.asarray(sq.dynamic_conv_weights(cp, cx, cmask))  # [2, L, H, k]
np.testing.assert_allclose(np.asarray(sq.windowed_sum(cx, jnp.asarray(kernels), cmask)),
                           np.asarray(cout), rtol=1e-4, atol=1e-6)
layer, lparams, hx, hq, hmask, hout = captured["hetero"]
# W(q)x + b(q) is linear in x for a fixed q: probing with 0 and the basis vectors recovers it
b_, m_ = hx.shape[0], hx.shape[-1]
probe = jnp.concatenate([jnp.zeros((b_, 1, m_)), jnp.broadcast_to(jnp.eye(m_), (b_, m_, m_))], 1)
yp = np.asarray(layer.apply({"params": lparams}, probe, hq, None))
hb, hk = yp[:, 0], np.swapaxes(yp[:, 1:] - yp[:, :1], 1, 2)  # b(q) [B,n], W(q) [B,n,m]
hx, hmask, hout = np.asarray(hx), np.asarray(hmask), np.asarray(hout)
np.testing.assert_allclose(np.where(hmask[..., None], np.einsum("bnm,blm->bln", hk, hx)
                                    + hb[:, None], 0), hout, rtol=1e-4, atol=1e-5)
n_valid = int(cmask[0].sum())
assert (kernels[0, n_valid:] == 0).all(), "padded steps must get no kernel"
print(f"user history: {n_valid} valid steps of {cmask.shape[1]}; "
      f"P(click) positive target {probs[0]:.3f}, negative target {probs[1]:.3f}")

# %% [markdown]
# Left: the dynamic convolution's kernel at each of the most recent valid steps (mean over
# channels; columns are the window offsets $-1, 0, +1$), shown as the deviation from a plain
# moving average (1/3 per slot, 1/2 at the history's edges). A static convolution would show one
# row repeated; here every step gets its own kernel. After a few epochs the kernels are still
# close to the moving average a fresh layer starts from; the deviations are what the generator
# has learned from the local and global views. The first step has no left neighbour and the
# last none to its right: those slots are exactly zero (grey), and every row sums to one.
#
# Right: how the query-behaviour DPO treats the same behaviours for the two targets: the
# difference of its responses $\lVert W(q)x_i + b(q)\rVert$ between the positive and the
# negative target. The history is identical; the generated kernel is not.

# %%
steps = min(n_valid, 30)
first = n_valid - steps  # the most recent `steps` valid steps
kw = kernels[0, first:n_valid].mean(1)  # [steps, k]
valid_slots = kernels[0, first:n_valid, 0] > 0
uniform = np.where(valid_slots, 1.0 / valid_slots.sum(1, keepdims=True), 0.0)
dev = np.where(valid_slots, kw - uniform, np.nan)
lim = np.nanmax(np.abs(dev))
fig, ax = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2]})
cmap = plt.get_cmap("RdBu_r").copy()
cmap.set_bad("lightgrey")
im = ax[0].imshow(dev, aspect="auto", cmap=cmap, vmin=-lim, vmax=lim)
k = kernels.shape[-1]
ax[0].set_xticks(range(k), [f"{o - k // 2:+d}" for o in range(k)])
ax[0].set_yticks(range(0, steps, 5), [str(first + i) for i in range(0, steps, 5)])
ax[0].set_xlabel("window offset")
ax[0].set_ylabel("history step (oldest first)")
ax[0].set_title("homogeneous DPO:\nkernel − moving average")
fig.colorbar(im, ax=ax[0])
resp = np.linalg.norm(hout, axis=-1)[:, first:n_valid]
ax[1].bar(np.arange(first, n_valid), resp[0] - resp[1], color="tab:purple")
ax[1].axhline(0, color="black", lw=0.8)
ax[1].set_xlabel("history step")
ax[1].set_ylabel(r"$\|W(q_+)x_i + b(q_+)\| - \|W(q_-)x_i + b(q_-)\|$")
ax[1].set_title(f"heterogeneous DPO: one history, two targets "
                f"(P(click) {probs[0]:.2f} vs {probs[1]:.2f})")
fig.tight_layout()
fig.savefig(FIG_DIR / "05_sequence_kernels.png", dpi=110)
plt.show()

# the two targets generate different kernels for the same behaviours
rel = float(np.linalg.norm(hk[0] - hk[1]) / np.linalg.norm(hk[0]))
print(f"relative difference of the two generated kernels: {rel:.3f}")
assert rel > 1e-4
print(f"notebook ran in {time.perf_counter() - T0:.0f} s")
