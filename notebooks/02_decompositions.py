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
# # 02 · Decompositions: what a DPO computes, and which classic layers are DPOs
#
# Three algebraic facts from the paper (§2.2 after Eqn. 5 and §2.3; docs/dpo_math.md, §'Decomposition' and §'FM and the cross layer'), each shown
# numerically and checked with an assertion, once with the library (`dpn_jax.dpo`) and once
# with the direct NumPy formula beside it:
#
# 1. the low-rank feature DPO = a **static** (low-order, DNN-like) term + a **multiplicative**
#    (second-order in $x$ and $z$) term + a conditional bias;
# 2. **FM**'s pairwise term is the self-excluded *summation* field DPO with $g(z) = \operatorname{diag}(z)$;
# 3. **DCN's cross layer** is the DPO whose generator is a scalar times the identity, plus a
#    residual.

# %%
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from dpn_jax import dpo
from dpn_jax.nn.cross_layers import CrossLayer
from dpn_jax.nn.fm_layers import bi_interaction

FIG_DIR = Path(os.environ.get("DPN_NOTEBOOK_FIGURES", "figures"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

rng = np.random.default_rng(0)
B = 256  # instances


def perturbed(params, key, scale=0.3):
    """Fresh generators start with a zero dynamic bias: perturb every leaf so all terms are live."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape)
                                        for p, k in zip(leaves, keys)])


# %% [markdown]
# ## 1. Low-order + second-order: the low-rank feature DPO
#
# With $h(z) = \sigma(\hat W z + \hat b)$, $\operatorname{vec}(W) = \dot W h + \dot b$ and
# $b = \tilde W h + \tilde b$ (Eqn. 5):
#
# $$y = W(z)\,x + b(z) = \underbrace{\operatorname{reshape}(\dot b)\,x}_{\text{static: a dense layer}}
#   + \underbrace{\operatorname{reshape}(\dot W h(z))\,x}_{\text{multiplicative: } x \times h(z)}
#   + \underbrace{\tilde W h(z) + \tilde b}_{\text{conditional bias}} .$$
#
# The static term is what a DNN's first layer computes (additive in the features). The
# multiplicative term is **bilinear in $x$ and $h(z)$**: every output is a weighted sum of
# products $x_i h_k(z)$, the explicit feature interactions that a DNN has to approximate.
# `dpn_jax.dpo.decompose` returns the three parts.

# %%
m, n, c, l = 12, 7, 5, 3
gen = dpo.lowrank(m, n, c, rank=l)
params = perturbed(gen.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
x = jnp.asarray(rng.normal(size=(B, m)), jnp.float32)
z = jnp.asarray(rng.normal(size=(B, c)), jnp.float32)

parts = dpo.decompose(params, x, z)  # activation: the generator's (relu, the default)
y = gen.apply(params, x, z)
np.testing.assert_allclose(parts.static + parts.multiplicative + parts.bias, y,
                           rtol=1e-5, atol=1e-5)

# The same three parts, directly in NumPy from the stored arrays (Dense layout, see notebook 01):
K = np.asarray(params.kernel)  # [m, l+1, n]: K[:, 0] = reshape(ḃ)ᵀ, K[:, k] = reshape(Ẇ_k)ᵀ
beta = np.asarray(params.bias)  # [l+1, n]: beta[0] = b̃, beta[k] = row k of W̃ᵀ
xn, zn = np.asarray(x), np.asarray(z)
h = np.maximum(zn @ np.asarray(params.hidden.kernel) + np.asarray(params.hidden.bias), 0.0)
static_np = xn @ K[:, 0, :]
mult_np = np.einsum("bm,mkn,bk->bn", xn, K[:, 1:, :], h)  # Σ_k h_k (x K_k)
bias_np = beta[0] + h @ beta[1:]
np.testing.assert_allclose(parts.static, static_np, rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(parts.multiplicative, mult_np, rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(parts.bias, bias_np, rtol=1e-4, atol=1e-5)
print("static + multiplicative + bias == y, and each part == its NumPy formula: OK")

# %% [markdown]
# **Orders.** The static part does not depend on $z$; the multiplicative part vanishes when
# $x = 0$ or $h(z) = 0$ and doubles when either doubles. With the identity activation and
# $\hat b = 0$ ($h$ linear in $z$) the decomposition is exactly the expansion of $y(x, z)$ by
# order: the mixed second difference $y(x,z) - y(x,0) - y(0,z) + y(0,0)$ isolates the
# $x \cdot z$ term, and it **is** the multiplicative part.

# %%
gen_lin = dpo.lowrank(m, n, c, rank=l, activation="identity")
p_lin = perturbed(gen_lin.init(jax.random.PRNGKey(2)), jax.random.PRNGKey(3))
p_lin = p_lin._replace(hidden=p_lin.hidden._replace(bias=jnp.zeros(l)))  # b̂ = 0: h(0) = 0
zero_x, zero_z = jnp.zeros_like(x), jnp.zeros_like(z)
f = gen_lin.apply
mixed = f(p_lin, x, z) - f(p_lin, x, zero_z) - f(p_lin, zero_x, z) + f(p_lin, zero_x, zero_z)
lin_parts = dpo.decompose(p_lin, x, z, activation="identity")
np.testing.assert_allclose(mixed, lin_parts.multiplicative, rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(f(p_lin, x, zero_z), lin_parts.static + p_lin.bias[0],
                           rtol=1e-4, atol=1e-5)  # z = 0: the dense layer ḃ x + b̃
# bilinear: scaling x or z by 3 scales the multiplicative part by 3
for sx, sz in ((3.0, 1.0), (1.0, 3.0)):
    scaled = dpo.decompose(p_lin, sx * x, sz * z, activation="identity").multiplicative
    np.testing.assert_allclose(scaled, 3.0 * lin_parts.multiplicative, rtol=1e-4, atol=1e-4)
print("mixed second difference == multiplicative part; it is bilinear in (x, z): OK")

# %% [markdown]
# How large is each part? At initialisation the library scales the dynamic part to about a
# quarter of the static one (`DEFAULT_DYNAMIC_SCALE`), so a fresh DPO starts as (almost) a
# dense layer and training decides how much multiplicative structure to use (the generated
# bias starts at exactly zero, like a dense layer's bias). Notebook 03 looks at a trained one.

# %%
fresh = gen.init(jax.random.PRNGKey(4))
fresh_parts = dpo.decompose(fresh, x, z)
stds = {k: float(jnp.std(v)) for k, v in fresh_parts._asdict().items()}
print({k: round(v, 3) for k, v in stds.items()})
assert stds["multiplicative"] < stds["static"]

fig, ax = plt.subplots(figsize=(4.5, 3))
ax.bar(list(stds), list(stds.values()), color=["C0", "C1", "C2"])
ax.set_ylabel("std over instances and outputs")
ax.set_title("fresh low-rank DPO, unit-variance x, z")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. FM is the self-excluded summation field DPO with $g(z) = \operatorname{diag}(z)$
#
# Field embeddings $x_1, \dots, x_F \in \mathbb{R}^d$. The summation field DPO is
# $y_i = \sum_j g(z_j)\,x_i$; excluding $j = i$ and taking $z = x$, $g(z) = \operatorname{diag}(z)$:
#
# $$y_i = \sum_{j \ne i} x_j \odot x_i, \qquad
#   \tfrac12 \sum_{i,k} [y_i]_k = \tfrac12 \sum_{i \ne j} \langle x_i, x_j\rangle
#   = \sum_{i<j} \langle x_i, x_j \rangle,$$
#
# FM's pairwise term (without its linear part). The factor ½ (`FM_CONSTANT`) appears because
# every unordered pair is visited twice. `dpn_jax.dpo.diagonal` with `diag_generator_params`
# **is** $g(z) = \operatorname{diag}(z)$ (no static kernel, $\hat W = D = I$, identity activation).

# %%
F, d = 6, 4
xf = jnp.asarray(rng.normal(size=(B, F, d)), jnp.float32)

g_diag = dpo.diagonal(d, d, d, rank=d, activation="identity", use_bias=False)
p_diag = dpo.diag_generator_params(d)
W_z, b_z = g_diag.generate(p_diag, xf[:, 0])  # g(z) for z = field 0 of every instance
np.testing.assert_allclose(W_z, jax.vmap(jnp.diag)(xf[:, 0]), atol=1e-6)  # W(z) == diag(z)
np.testing.assert_allclose(b_z, 0.0)

# the self-excluded summation DPO, library vs NumPy
y_sum = dpo.field_sum(g_diag, p_diag, xf, xf, exclude_self=True)  # [B, F, d]
xfn = np.asarray(xf)
y_sum_np = (xfn.sum(axis=1, keepdims=True) - xfn) * xfn  # Σ_{j≠i} x_j ⊙ x_i
np.testing.assert_allclose(y_sum, y_sum_np, rtol=1e-4, atol=1e-5)

# ... summed over fields and dimensions, times ½, is FM's pairwise term
fm_dpo = dpo.fm_interaction(xf)  # = FM_CONSTANT * Σ y_sum
fm_pairs_np = sum((xfn[:, i] * xfn[:, j]).sum(-1) for i in range(F) for j in range(i + 1, F))
fm_trick_np = 0.5 * ((xfn.sum(1) ** 2) - (xfn ** 2).sum(1)).sum(-1)  # Rendle's O(F d) form
np.testing.assert_allclose(fm_dpo, dpo.FM_CONSTANT * y_sum.sum(axis=(1, 2)), rtol=1e-5)
np.testing.assert_allclose(fm_dpo, fm_pairs_np, rtol=1e-4, atol=1e-4)
np.testing.assert_allclose(fm_dpo, fm_trick_np, rtol=1e-4, atol=1e-4)
# and the library's FM layer (NFM's Bi-Interaction pooling, summed over d)
np.testing.assert_allclose(fm_dpo, bi_interaction(xf).sum(-1), rtol=1e-4, atol=1e-4)
print(f"FM pairwise term == ½ Σ (self-excluded summation DPO with g = diag), FM_CONSTANT = "
      f"{dpo.FM_CONSTANT}: OK")

# %% [markdown]
# What a DPO adds over FM: FM fixes $g(z) = \operatorname{diag}(z)$; a learned generator makes
# the field-pair interaction a learned, instance-dependent bilinear form. Without `exclude_self`
# the summation also contains each field's square $x_i \odot x_i$:

# %%
y_incl = dpo.field_sum(g_diag, p_diag, xf, xf)
np.testing.assert_allclose(y_incl - y_sum, xfn * xfn, rtol=1e-4, atol=1e-5)
print("including j = i adds x_i ⊙ x_i: OK")

# %% [markdown]
# ## 3. DCN's cross layer: a scalar generator times the identity, plus a residual
#
# $$x_{l+1} = x_0\,(x_l^\top w) + b + x_l
#   = \underbrace{(z^\top w)\, I}_{W(z)}\; x + b \;+\; x_l, \qquad x = x_0,\ z = x_l .$$
#
# The generator produces **one number** per instance, $z^\top w$, and scales the identity by
# it: the cheapest possible DPO. `dpn_jax.dpo.cross_layer` builds it from the `diagonal`
# family (rank 1, identity activation, $\hat W = w$, $D = \mathbf 1$, static bias $b$).

# %%
D_ = 9
x0 = jnp.asarray(rng.normal(size=(B, D_)), jnp.float32)
xl = jnp.asarray(rng.normal(size=(B, D_)), jnp.float32)
w = jnp.asarray(rng.normal(size=(D_,)), jnp.float32)
b = jnp.asarray(rng.normal(size=(D_,)), jnp.float32)

cross_dpo = dpo.cross_layer(x0, xl, w, b)
cross_np = np.asarray(x0) * (np.asarray(xl) @ np.asarray(w))[:, None] + np.asarray(b) + np.asarray(xl)
np.testing.assert_allclose(cross_dpo, cross_np, rtol=1e-4, atol=1e-5)

# the library's DCN layer (dpn_jax.nn.cross_layers.CrossLayer) with the same w, b
cross_flax = CrossLayer().apply({"params": {"kernel": w[:, None], "bias": b}}, x0, xl)
np.testing.assert_allclose(cross_dpo, cross_flax, rtol=1e-4, atol=1e-5)

# the generated kernel is (zᵀ w) · I: rebuild the generator cross_layer uses and look at W(z)
g_cross = dpo.diagonal(D_, D_, D_, rank=1, activation="identity", use_bias=True)
p_cross = dpo.DiagonalParams(dpo.HiddenParams(w[:, None], jnp.zeros((1,))),
                             jnp.zeros((D_, D_)), jnp.ones((1, D_)),
                             jnp.zeros((2, D_)).at[0].set(b))
W_x, b_x = g_cross.generate(p_cross, xl)
scalar = np.asarray(xl) @ np.asarray(w)
np.testing.assert_allclose(W_x, scalar[:, None, None] * np.eye(D_), rtol=1e-4, atol=1e-5)
np.testing.assert_allclose(b_x, np.broadcast_to(b, (B, D_)), atol=1e-6)
np.testing.assert_allclose(dpo.matrix_product(W_x, x0, b_x) + xl, cross_dpo, rtol=1e-4, atol=1e-5)
print("CrossLayer == (zᵀw)·I applied to x0, + b, + x_l residual: OK")

# %% [markdown]
# ## Summary
#
# | layer | as a DPO: context $z$, generator $g(z)$, input $x$ | checked |
# |---|---|---|
# | dense layer | any $z$, constant $g$ | notebook 01 |
# | low-rank DPO | $g$ = Eqn. 5: static + multiplicative + conditional bias | `decompose`, NumPy |
# | FM pairwise term | $z_j = x_j$, $g = \operatorname{diag}$, self-excluded sum, $\tfrac12\sum$ | `fm_interaction`, NumPy, `bi_interaction` |
# | DCN cross layer | $z = x_l$, $g(z) = (z^\top w) I$, $x = x_0$, + residual | `cross_layer`, NumPy, `CrossLayer` |
#
# One more visual: how the generated cross-layer kernel scales with the context.

# %%
fig, axes = plt.subplots(1, 3, figsize=(9, 3))
for ax, i in zip(axes, np.argsort(scalar)[[0, B // 2, -1]]):
    im = ax.imshow(np.asarray(W_x[i]), cmap="RdBu_r", vmin=-abs(scalar).max(), vmax=abs(scalar).max())
    ax.set_title(f"W(x_l) for zᵀw = {scalar[i]:.2f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()
