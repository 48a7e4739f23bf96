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
# # 01 · The Dynamic Parameterized Operation from scratch
#
# A **Dynamic Parameterized Operation** (DPO; Zhu et al., arXiv 2111.04983, §2.1; docs/dpo_math.md, §'The operation') is
# two pure functions:
#
# * a **weight generator** $g(z;\theta) \to (W, b)$ that turns an instance's *context* $z$ into
#   that instance's own kernel and bias, and
# * a **feature aggregator** $f(x; W, b)$ that applies them to the input, here the matrix
#   product $y = Wx + b$ of the feature-based DPO ("DyMLP", docs/dpo_math.md, §'Feature-based DPO').
#
# $y = f(x; g(z;\theta))$. A dense layer is the special case where $g$ ignores $z$.
#
# This notebook writes both functions in a few lines of JAX for **one** instance, lifts them to
# a batch with `jax.vmap`, checks the dense-layer special case, checks the result against the
# library (`dpn_jax.dpo`), and finally counts what the low-rank generator costs compared with a
# full hypernetwork (HyperDense).
#
# Notation: input $x \in \mathbb{R}^m$, context $z \in \mathbb{R}^c$, output $y \in \mathbb{R}^n$,
# generator rank $l$.

# %%
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from dpn_jax import dpo

# Figures go to notebooks/figures/ (the test suite redirects them to a temporary folder).
FIG_DIR = Path(os.environ.get("DPN_NOTEBOOK_FIGURES", "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

m, n, c, l = 6, 5, 3, 2  # input, output, context sizes and generator rank (tiny, to print)
key = jax.random.PRNGKey(0)

# %% [markdown]
# ## 1. The two functions
#
# The low-rank generator of the paper (Eqn. 5) is a two-layer MLP from the context to the kernel:
#
# $$h = \sigma(\hat W z + \hat b) \in \mathbb{R}^l, \qquad
#   \operatorname{vec}(W) = \dot W h + \dot b, \qquad b = \tilde W h + \tilde b .$$
#
# $\dot W \in \mathbb{R}^{mn \times l}$: every instance's kernel lies in the $(l{+}1)$-dimensional
# affine family $\dot b + \operatorname{span}(\dot W)$, and $h(z)$ picks the point.
# The parameters are a plain dict; the functions below handle a **single** instance
# (no batch axis).


# %%
def init_generator(key, m, n, c, l, scale=0.5):
    """θ of Eqn. 5 with the shapes written in the equation (random, for the demo)."""
    k = jax.random.split(key, 6)
    return {
        "W_hat": jax.random.normal(k[0], (l, c)) / np.sqrt(c),
        "b_hat": scale * jax.random.normal(k[1], (l,)),
        "W_dot": scale * jax.random.normal(k[2], (m * n, l)) / np.sqrt(m),
        "b_dot": jax.random.normal(k[3], (m * n,)) / np.sqrt(m),
        "W_tilde": scale * jax.random.normal(k[4], (n, l)),
        "b_tilde": scale * jax.random.normal(k[5], (n,)),
    }


def generate(theta, z):
    """Weight generator g(z; θ) -> (W [n, m], b [n]) for ONE context z [c]."""
    h = jax.nn.relu(theta["W_hat"] @ z + theta["b_hat"])
    w = (theta["W_dot"] @ h + theta["b_dot"]).reshape(n, m)
    b = theta["W_tilde"] @ h + theta["b_tilde"]
    return w, b


def aggregate(x, w, b):
    """Feature aggregator f(x; W, b) = W x + b for ONE input x [m]."""
    return w @ x + b


def dpo_single(theta, x, z):
    """The DPO: y = f(x; g(z; θ))."""
    return aggregate(x, *generate(theta, z))


theta = init_generator(key, m, n, c, l)
x1, z1 = jnp.arange(m, dtype=jnp.float32) / m, jnp.ones(c)
w1, b1 = generate(theta, z1)
print("W(z):", w1.shape, " b(z):", b1.shape, " y:", dpo_single(theta, x1, z1).shape)

# %% [markdown]
# ## 2. Compose, `vmap`, `jit`
#
# Because both functions are pure, batching is `jax.vmap` (θ shared, `x` and `z` mapped) and
# compilation is `jax.jit`. Every row of the batch gets **its own** kernel.

# %%
batch = 8
kx, kz = jax.random.split(jax.random.PRNGKey(1))
x = jax.random.normal(kx, (batch, m))
z = jax.random.normal(kz, (batch, c))

dpo_batch = jax.jit(jax.vmap(dpo_single, in_axes=(None, 0, 0)))
generate_batch = jax.jit(jax.vmap(generate, in_axes=(None, 0)))

y = dpo_batch(theta, x, z)
W, b = generate_batch(theta, z)
print("y", y.shape, " W", W.shape, " b", b.shape)
# the batched DPO is the per-row loop
np.testing.assert_allclose(y, np.stack([dpo_single(theta, x[i], z[i]) for i in range(batch)]),
                           rtol=1e-5, atol=1e-6)
# and the kernels really differ from instance to instance
spread = float(jnp.linalg.norm(W - W.mean(0), axis=(1, 2)).mean())
print(f"mean distance of an instance's kernel from the batch-mean kernel: {spread:.3f}")
assert spread > 1e-2

# %% [markdown]
# ## 3. A constant context is a dense layer
#
# If $g$ ignores $z$ (or all instances share one context $z_0$), every instance gets the same
# $(W, b)$ and the DPO **is** a dense layer $y = Wx + b$: additive in the features and
# with one fixed kernel. Checked against `flax.linen.Dense` (kernel stored as $W^\top$).

# %%
z0 = jnp.asarray([0.3, -1.0, 2.0])
const_z = jnp.broadcast_to(z0, (batch, c))
y_const = dpo_batch(theta, x, const_z)

w0, b0 = generate(theta, z0)
dense = nn.Dense(n)
y_dense = dense.apply({"params": {"kernel": w0.T, "bias": b0}}, x)
np.testing.assert_allclose(y_const, y_dense, rtol=1e-5, atol=1e-6)


# A generator that ignores z altogether: g(z) = (W, b) for fixed parameters.
def generate_static(theta_s, z):
    return theta_s["W"], theta_s["b"]


theta_s = {"W": w0, "b": b0}
y_static = jax.vmap(lambda xi, zi: aggregate(xi, *generate_static(theta_s, zi)))(x, z)
np.testing.assert_allclose(y_static, y_dense, rtol=1e-5, atol=1e-6)
print("constant-context DPO == Dense: OK")

# %% [markdown]
# ## 4. The same operation in the library
#
# `dpn_jax.dpo.lowrank(m, n, c, rank=l)` returns a `WeightGenerator` with the same Eqn. 5.
# Its parameters are stored in *Dense layout* so the static part is literally a dense kernel:
#
# | notebook | library (`LowRankParams`) |
# |---|---|
# | $\hat W$ `[l, c]`, $\hat b$ `[l]` | `hidden.kernel [c, l]` ($=\hat W^\top$), `hidden.bias [l]` |
# | $\dot b$ `[mn]` | `kernel[:, 0, :]` `[m, n]` ($=\text{reshape}(\dot b)^\top$) |
# | $\dot W$ `[mn, l]` | `kernel[:, 1:, :]` `[m, l, n]` |
# | $\tilde b$ `[n]`, $\tilde W$ `[n, l]` | `bias[0]`, `bias[1:]` `[l, n]` |
#
# The library offers a materialising `generate(params, z) -> (W [B,n,m], b [B,n])` and a
# fused `apply(params, x, z)` that never builds the per-instance kernels:
# $W(z)x = \dot b\,x + \sum_k h_k(z)\,(\dot W_k x)$, one matmul with the $l{+}1$ stacked kernels.

# %%
gen = dpo.lowrank(m, n, c, rank=l)
params = gen.init(jax.random.PRNGKey(2))
# A fresh generator starts with zero dynamic bias; perturb every leaf so all terms are exercised.
leaves, treedef = jax.tree.flatten(params)
noise = jax.random.split(jax.random.PRNGKey(3), len(leaves))
params = jax.tree.unflatten(treedef, [p + 0.3 * jax.random.normal(k_, p.shape)
                                      for p, k_ in zip(leaves, noise)])


def theta_from_library(p):
    """Re-lay a library LowRankParams out as the notebook's θ."""
    kern = p.kernel  # [m, l+1, n]
    return {
        "W_hat": p.hidden.kernel.T, "b_hat": p.hidden.bias,
        "b_dot": kern[:, 0, :].T.reshape(-1),  # vec of W [n, m], row-major
        "W_dot": jnp.transpose(kern[:, 1:, :], (2, 0, 1)).reshape(n * m, l),
        "b_tilde": p.bias[0], "W_tilde": p.bias[1:].T,
    }


theta_lib = theta_from_library(params)
W_lib, b_lib = gen.generate(params, z)  # materialised: [B, n, m], [B, n]
W_nb, b_nb = generate_batch(theta_lib, z)
np.testing.assert_allclose(W_lib, W_nb, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(b_lib, b_nb, rtol=1e-5, atol=1e-6)

y_lib_fused = gen.apply(params, x, z)  # fused, no [B, n, m] kernel
y_lib_materialised = dpo.matrix_product(W_lib, x, b_lib)  # library aggregator f
y_nb = dpo_batch(theta_lib, x, z)
np.testing.assert_allclose(y_lib_fused, y_nb, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(y_lib_materialised, y_nb, rtol=1e-5, atol=1e-5)
print("notebook DPO == dpn_jax.dpo.lowrank (generate, matrix_product and fused apply): OK")

# %% [markdown]
# The library's other families (`hyperdense`, `multihead`, `mixture`, `diagonal`, `rank1`) share
# the same interface. HyperDense (Ha et al. 2016) is the full hypernetwork
# $\operatorname{vec}(W), b = \hat W z + \hat b$; algebraically it is the low-rank family with
# $h = z$ (identity activation, $l = c$):

# %%
hd = dpo.hyperdense(m, n, c)
p_hd = hd.init(jax.random.PRNGKey(4))
# hyperdense's `kernel`/`bias` have the low-rank layout with coefficients [1, z]
as_lowrank = dpo.LowRankParams(dpo.HiddenParams(jnp.eye(c), jnp.zeros(c)), p_hd.kernel, p_hd.bias)
lr_twin = dpo.lowrank(m, n, c, rank=c, activation="identity")
np.testing.assert_allclose(hd.apply(p_hd, x, z), lr_twin.apply(as_lowrank, x, z),
                           rtol=1e-5, atol=1e-5)
print("HyperDense == low-rank with h = z: OK")

# %% [markdown]
# ## 5. What the generator costs: low-rank vs HyperDense
#
# Counting the parameters of each generator for an $n \times m$ kernel from a $c$-dimensional
# context (with biases):
#
# | generator | parameters | FLOPs per instance (as the library computes it) |
# |---|---|---|
# | Dense (no generator) | $mn + n$ | $2mn + n$ |
# | low-rank, Eqn. 5, fused | $cl + l + (l{+}1)(mn + n)$ | $2cl + 2l + 2(l{+}1)mn + 4(l{+}1)n + n$ |
# | HyperDense, materialised | $(c{+}1)(mn + n)$ | $2(c{+}1)(mn + n) + 2mn + n$ |
#
# (FLOPs count a multiply-add as 2.) The low-rank FLOPs: the hidden layer $2cl$ plus its bias and
# ReLU $2l$, $x$ against the $l{+}1$ stacked kernels $2(l{+}1)mn$, mixing them with $[1, h]$ and
# the generated bias $4(l{+}1)n$, adding the bias $n$. HyperDense builds $W$ and $b$ from
# $[1, z]$, then applies $W$.
#
# **Both grow linearly in $n$ (and in $m$)**: the low-rank generator still stores
# $\dot W \in \mathbb{R}^{mn\times l}$. What it saves is the factor $(l{+}1)/(c{+}1)$ — the context
# enters only through $l$ hidden units instead of all $c$ of its dimensions. In the DPN's first
# layer with `context=input`, $c = m$ = all fields' embeddings (8 fields × 10 = 80 on `synthetic`),
# so rank 4 is ~16× cheaper than HyperDense, in memory and in time.
#
# Below: the formulas, checked against the actual parameter count of the library's generators
# (`jax.eval_shape` of `init`, nothing is allocated) and against XLA's own FLOP count of the
# jitted `apply` (`jax.jit(...).lower(...).cost_analysis()`, no compilation needed).

# %%
M, C, L = 80, 80, 4  # the first DPO layer of `dpn` on `synthetic`: 8 fields x 10 dims


def params_dense(m, n):
    return m * n + n


def flops_dense(m, n):
    return 2 * m * n + n


def params_lowrank(m, n, c, l):
    return c * l + l + (l + 1) * (m * n + n)


def flops_lowrank(m, n, c, l):
    return 2 * c * l + 2 * l + 2 * (l + 1) * m * n + 4 * (l + 1) * n + n


def params_hyperdense(m, n, c):
    return (c + 1) * (m * n + n)


def flops_hyperdense(m, n, c):
    return 2 * (c + 1) * (m * n + n) + 2 * m * n + n


def library_params(g):
    shapes = jax.eval_shape(g.init, jax.random.PRNGKey(0))
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def library_flops(g):
    shapes = jax.eval_shape(g.init, jax.random.PRNGKey(0))
    xs = jax.ShapeDtypeStruct((1, g.in_features), jnp.float32)
    zs = jax.ShapeDtypeStruct((1, g.context_features), jnp.float32)
    cost = jax.jit(g.apply).lower(shapes, xs, zs).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX returns a list
    return float(cost["flops"])


ns = [16, 32, 64, 128, 256, 400, 512, 1024]
rows = []
for n_out in ns:
    g_lr = dpo.lowrank(M, n_out, C, rank=L)
    g_hd = dpo.hyperdense(M, n_out, C)
    row = {
        "n": n_out,
        "dense_params": params_dense(M, n_out),
        "lowrank_params": params_lowrank(M, n_out, C, L),
        "hyperdense_params": params_hyperdense(M, n_out, C),
        "dense_flops": flops_dense(M, n_out),
        "lowrank_flops": flops_lowrank(M, n_out, C, L),
        "hyperdense_flops": flops_hyperdense(M, n_out, C),
        "lowrank_flops_xla": library_flops(g_lr),
        "hyperdense_flops_xla": library_flops(g_hd),
    }
    # the parameter formulas are exact
    assert row["lowrank_params"] == library_params(g_lr), (n_out, library_params(g_lr))
    assert row["hyperdense_params"] == library_params(g_hd), (n_out, library_params(g_hd))
    # the FLOP formulas agree with XLA's count (to 1%: XLA may count an elementwise op more or less)
    for fam in ("lowrank", "hyperdense"):
        rel = abs(row[f"{fam}_flops"] - row[f"{fam}_flops_xla"]) / row[f"{fam}_flops_xla"]
        assert rel < 0.01, (fam, n_out, row[f"{fam}_flops"], row[f"{fam}_flops_xla"])
    rows.append(row)

header = ("| n | Dense params | low-rank params | HyperDense params | HyperDense / low-rank "
          "| Dense FLOPs | low-rank FLOPs (XLA) | HyperDense FLOPs (XLA) |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|\n")
table = header + "\n".join(
    f"| {r['n']} | {r['dense_params']:,} | {r['lowrank_params']:,} | {r['hyperdense_params']:,} "
    f"| {r['hyperdense_params'] / r['lowrank_params']:.1f}× | {r['dense_flops']:,} "
    f"| {r['lowrank_flops']:,} ({r['lowrank_flops_xla']:,.0f}) "
    f"| {r['hyperdense_flops']:,} ({r['hyperdense_flops_xla']:,.0f}) |" for r in rows)
display(Markdown(f"m = {M}, c = {C}, rank l = {L}\n\n" + table))

# %% [markdown]
# The ratio is the constant $(c{+}1)(mn+n) / \big(cl + l + (l{+}1)(mn+n)\big) \approx (c{+}1)/(l{+}1)$:

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, what, label in ((axes[0], "params", "parameters"),
                        (axes[1], "flops", "FLOPs per instance")):
    for fam, style in (("dense", "k:"), ("lowrank", "C0-o"), ("hyperdense", "C3-s")):
        ax.plot(ns, [r[f"{fam}_{what}"] for r in rows], style,
                label={"dense": "Dense (static)", "lowrank": f"low-rank, l={L} (Eqn. 5)",
                       "hyperdense": "HyperDense"}[fam])
    if what == "flops":
        ax.plot(ns, [r["lowrank_flops_xla"] for r in rows], "C0x", ms=9, label="XLA count")
        ax.plot(ns, [r["hyperdense_flops_xla"] for r in rows], "C3x", ms=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("output size n")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
for ax in axes:
    ax.legend(fontsize=8)
fig.suptitle(f"Generator cost for an n×m kernel (m = {M}, context c = {C})")
fig.tight_layout()
fig.savefig(FIG_DIR / "01_generator_cost.png", dpi=110, metadata={"Software": None})
plt.show()

ratio = [r["hyperdense_params"] / r["lowrank_params"] for r in rows]
print("HyperDense / low-rank parameters:", [f"{v:.1f}" for v in ratio],
      f"~ (c+1)/(l+1) = {(C + 1) / (L + 1):.1f}")

# %% [markdown]
# **Take-aways.** A DPO is `aggregate(x, *generate(z))`; a constant context makes it a dense
# layer; the library's `dpn_jax.dpo.lowrank` is exactly Eqn. 5 and applies it fused. The
# low-rank generator costs about $l{+}1$ dense layers in parameters and time, HyperDense
# about $c{+}1$. Next: `02_decompositions` splits the DPO's output into its static and
# multiplicative parts and recovers FM and DCN's cross layer as DPOs.
