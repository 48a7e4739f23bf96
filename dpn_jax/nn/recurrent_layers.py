"""Masked recurrent layers of DIEN (Zhou et al., AAAI 2019, "Deep Interest Evolution Network"):
the GRU interest extractor and the attentional GRUs of interest evolution (AUGRU, AGRU, AIGRU).

The cell math is in plain functions with explicit parameters (easy to check against a loop);
the Linen module :class:`GRU` owns the parameters.  Gate layout (DIEN §4.2, Eqns. 1-4; ``σ`` the
logistic function, ``x_t`` the input, ``h`` the previous state, ``a_t`` the attention score)::

    r_t  = σ(x_t W_r + h U_r + b_r)                         reset gate
    u_t  = σ(x_t W_u + h U_u + b_u)                         update gate (fraction of new content)
    h̃_t  = tanh(x_t W_c + r_t ⊙ (h U_c) + b_c)              candidate state
    gru:   h_t = (1 − u_t) ⊙ h + u_t ⊙ h̃_t
    augru: h_t = (1 − u'_t) ⊙ h + u'_t ⊙ h̃_t,  u'_t = a_t u_t   (DIEN Eqns. 15-16, the default)
    agru:  h_t = (1 − a_t) h + a_t h̃_t                    (no update gate: its block is absent)
    aigru: the GRU on the scaled input  x'_t = a_t x_t     (DIEN §4.3)

Parameters (``GRUParams``): ``input_kernel W [m, G·H]``, ``hidden_kernel U [H, G·H]``,
``bias b [G·H]`` with the gate blocks concatenated in the order ``r, u, c`` (``r, c`` for agru,
``G = 2``).  Note ``u`` is DIEN's update gate (the weight of the NEW content); Flax's and
PyTorch's ``z`` is its complement and they add a second bias inside ``r ⊙ (·)``.  Init as Flax's
``GRUCell``: ``W`` LeCun normal, ``U`` orthogonal per gate block, ``b`` zeros.

Masks: ``mask [B,L]``, True = a real step, any layout (right padding, holes).  At a padded step
the state is carried unchanged and the output is zero, so the final state is the state after
the last valid step; an empty history keeps the initial (zero) state.  Padded inputs and scores
are replaced by zeros with ``jnp.where`` before any arithmetic: their values (even non-finite)
never change an output nor a gradient.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError

Array = jax.Array

EVOLUTIONS = ("augru", "agru", "aigru")  # attentional GRUs (interest evolution, DIEN §4.3)
KINDS = ("gru",) + EVOLUTIONS
GATES = {"gru": ("r", "u", "c"), "augru": ("r", "u", "c"), "aigru": ("r", "u", "c"),
         "agru": ("r", "c")}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"recurrent kind {kind!r} is not known; expected one of {list(KINDS)}")
    return kind


class GRUParams(NamedTuple):
    input_kernel: Array  # W [m, G*H], gate blocks GATES[kind]
    hidden_kernel: Array  # U [H, G*H]
    bias: Array  # b [G*H]


def num_gates(kind: str) -> int:
    return len(GATES[check_kind(kind)])


def _blocks(z: Array, kind: str) -> dict[str, Array]:
    return dict(zip(GATES[kind], jnp.split(z, len(GATES[kind]), axis=-1), strict=True))


def cell_update(params: GRUParams, h: Array, xp: Array, a: Array | None = None,
                kind: str = "gru") -> Array:
    """One step from the projected input ``xp = x_t W + b`` (``[B, G·H]``): ``h [B,H] -> [B,H]``.

    ``a [B]``: the attention score of the step (attentional kinds; for aigru it must already be
    in ``xp``, see :func:`cell`)."""
    hp = h @ params.hidden_kernel
    xs, hs = _blocks(xp, kind), _blocks(hp, kind)
    r = jax.nn.sigmoid(xs["r"] + hs["r"])
    cand = jnp.tanh(xs["c"] + r * hs["c"])
    if kind == "agru":
        g = a[:, None]
    else:
        g = jax.nn.sigmoid(xs["u"] + hs["u"])
        if kind == "augru":
            g = a[:, None] * g
    return (1.0 - g) * h + g * cand


def project_inputs(params: GRUParams, x: Array, a: Array | None = None,
                   kind: str = "gru") -> Array:
    """``x W + b`` for every step (one matmul outside the recurrence); aigru scales ``x`` by
    ``a`` first.  ``x [..., m], a [...] -> [..., G·H]``."""
    if kind == "aigru":
        x = a[..., None] * x
    return x @ params.input_kernel + params.bias


def cell(params: GRUParams, h: Array, x: Array, a: Array | None = None,
         kind: str = "gru") -> Array:
    """One unmasked step ``h_t = cell(h_{t-1}, x_t, a_t)`` of ``kind`` (module doc)."""
    return cell_update(params, h, project_inputs(params, x, a, kind), a, kind)


def recurrence(params: GRUParams, x: Array, mask: Array, att: Array | None = None,
               kind: str = "gru", h0: Array | None = None) -> tuple[Array, Array]:
    """Run ``kind`` over time with ``jax.lax.scan``: ``x [B,L,m], mask [B,L], att [B,L]`` ->
    ``(outputs [B,L,H], final [B,H])``.

    Padded steps carry the state and output zeros; ``h0`` defaults to zeros."""
    check_kind(kind)
    if (att is None) != (kind == "gru"):
        raise ValueError(f"recurrence kind={kind!r}: attention scores are "
                         f"{'not used' if kind == 'gru' else 'required'}")
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"recurrence expects x [B,L,m] and mask [B,L], got {x.shape}, "
                         f"{mask.shape}")
    bsz = x.shape[0]
    hidden = params.hidden_kernel.shape[0]
    x = jnp.where(mask[..., None], x, 0)
    if att is not None:
        if att.shape != mask.shape:
            raise ValueError(f"recurrence: att {att.shape} must match mask {mask.shape}")
        att = jnp.where(mask, att, 0).astype(x.dtype)
    xp = project_inputs(params, x, att, kind)
    h = jnp.zeros((bsz, hidden), xp.dtype) if h0 is None else h0
    dummy = jnp.zeros(mask.shape, xp.dtype) if att is None else att

    def step(h, inputs):
        xp_t, m_t, a_t = inputs
        new = cell_update(params, h, xp_t, None if kind == "gru" else a_t, kind)
        h = jnp.where(m_t[:, None], new, h)
        return h, jnp.where(m_t[:, None], h, 0)

    time_major = (jnp.swapaxes(xp, 0, 1), jnp.swapaxes(mask, 0, 1), jnp.swapaxes(dummy, 0, 1))
    final, outputs = jax.lax.scan(step, h, time_major)
    return jnp.swapaxes(outputs, 0, 1), final


def _block_orthogonal(gates: int):
    ortho = nn.initializers.orthogonal()

    def init(key, shape, dtype=jnp.float32):
        keys = jax.random.split(key, gates)
        return jnp.concatenate([ortho(k, (shape[0], shape[0]), dtype) for k in keys], axis=-1)

    return init


class GRU(nn.Module):
    """A masked GRU (``kind="gru"``, DIEN's interest extractor) or attentional GRU (``"augru"``,
    ``"agru"``, ``"aigru"``: interest evolution) of ``features`` units (module doc).

    ``__call__(x [B,L,m], mask [B,L], att [B,L] | None) -> (outputs [B,L,H], final [B,H])``;
    ``att`` is required by the attentional kinds and refused by ``gru``."""

    features: int
    kind: str = "gru"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array, att: Array | None = None) -> tuple[Array, Array]:
        g = num_gates(self.kind)
        h = self.features
        params = GRUParams(
            self.param("input_kernel", nn.initializers.lecun_normal(), (x.shape[-1], g * h),
                       self.param_dtype),
            self.param("hidden_kernel", _block_orthogonal(g), (h, g * h), self.param_dtype),
            self.param("bias", nn.initializers.zeros, (g * h,), self.param_dtype))
        return recurrence(params, x, mask, att, self.kind)
