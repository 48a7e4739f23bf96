"""Precise BatchNorm statistics: re-estimate running averages from training batches.

With batch 4096 an epoch of a small dataset is ~13 steps, and exponential running averages
still carry their initial values (variance 1) when the model is evaluated, mis-scaling every
prediction (docs/results/protocol.md, §'BatchNorm statistics'). Before each evaluation we replace them with the average of per-batch
statistics over up to K training batches (Wu & Johnson, "Rethinking BatchNorm", 2021).

Flax's BatchNorm only exposes ``new = m * running + (1 - m) * batch``. Running the model once
from zero statistics gives ``(1 - m) * batch``; once from ones gives ``m + (1 - m) * batch``; their
difference is ``m`` for every module, so the trick works whatever momentum each layer uses.
"""

from __future__ import annotations

from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp


def batch_stats_fn(model: nn.Module):
    """Pure ``(params, stats_in, batch, rng) -> stats_out`` of one train-mode forward pass."""

    def stats_of(params, stats_in, batch, rng):
        _, upd = model.apply({"params": params, "batch_stats": stats_in}, batch, train=True,
                             rngs={"dropout": rng}, mutable=["batch_stats"])
        return upd["batch_stats"]

    return stats_of


def make_batch_stats_fn(model: nn.Module):
    """``batch_stats_fn`` jitted."""
    return jax.jit(batch_stats_fn(model))


def recalibrate(stats_of, params, batch_stats, batches: Iterable[dict], rng: jax.Array,
                fold_in=jax.random.fold_in):
    """Average per-batch BatchNorm statistics over ``batches``; returns new ``batch_stats``.

    Sweeps pass stacked replicas with a vmapped ``stats_of`` and ``fold_in``."""
    if not batch_stats:
        return batch_stats
    zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
    ones = jax.tree_util.tree_map(jnp.ones_like, batch_stats)
    total, n, keep = None, 0, None
    for i, batch in enumerate(batches):
        key = fold_in(rng, i)
        a = stats_of(params, zeros, batch, key)
        if keep is None:  # 1 - m per statistic, from one extra pass
            b = stats_of(params, ones, batch, key)
            keep = jax.tree_util.tree_map(lambda x, y: 1.0 - (y - x), a, b)
        total = a if total is None else jax.tree_util.tree_map(jnp.add, total, a)
        n += 1
    if n == 0:
        return batch_stats
    # A statistic with momentum 1 never moves: keep its old value rather than divide by zero.
    return jax.tree_util.tree_map(
        lambda t, k, old: jnp.where(k > 0, t / (n * jnp.where(k > 0, k, 1.0)), old),
        total, keep, batch_stats)
