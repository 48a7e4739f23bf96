"""Lazy (sparse) Adam: update only the embedding rows a batch looks up.

Dense Adam reads and writes every row of every embedding table, and its moments, each step: for a
1M x 10 table that is ~280 MB of memory traffic per step whatever the batch holds, and the
backward pass first scatters the row gradients into a dense zero table. Production CTR systems
(TF's ``LazyAdamOptimizer``, PyTorch's ``SparseAdam``) instead touch only the rows seen:

1. ``gather``: the ids of the batch (``cat`` and every ``seq/*``) are made unique
   (:func:`unique_ids`: each id keeps the slot of its first occurrence, the other slots hold the
   out-of-range id ``V``); every table leaf is replaced by its gathered rows ``[n, d]`` and the
   batch gets ``rows/<key>``: the slot of each id. The train step applies the model with ``schema.table_size = n``
   (Flax checks parameter shapes against the declared ones) and ``FieldEmbedding`` looks
   ``rows/<key>`` up in the gathered rows, so the forward pass is unchanged and the gradient
   w.r.t. the gathered rows is the dense gradient's non-zero rows.
2. ``apply``: Adam on those rows only, with the global step for bias correction (TF's lazy Adam):
   ``m[r] = b1 m[r] + (1-b1) g``, ``v[r] = b2 v[r] + (1-b2) g²``, ``T[r] -= lr m̂/(√v̂ + eps)``;
   all other parameters take optax's Adam as usual.

Rows absent from a batch keep their parameters and moments (dense Adam keeps moving them with
their decaying momentum). When no row repeats across steps the two agree on the rows a step
uses: a row's first gradient meets zero moments either way (a row dense Adam never saw gets
``0 / (0 + eps) = 0``), so every forward pass, and the dense layers, are the same; they differ
on rows of earlier steps, which only dense Adam goes on moving. ``embedding_l2`` penalises the rows of the batch (each unique row once),
not the whole table: the usual lazy regulariser. Global-norm clipping sees the same gradient
norm as dense Adam (the skipped rows' gradients are zero).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from dpn_jax import native
from dpn_jax.errors import ConfigError
from dpn_jax.nn.embedding import ROWS_PREFIX

TABLE = "table"  # FieldEmbedding's table parameter
KERNELS = ("xla", "native")
NATIVE_OPTION = "lazy_adam_kernel=native"
PORTABLE_OPTION = "lazy_adam_kernel=xla"
NATIVE_TARGET = "dpn_jax_sparse_adam"


def _is_table(path: tuple) -> bool:
    return path[-1] == TABLE


def id_keys(batch: dict) -> list[str]:
    """The batch arrays holding embedding-table ids."""
    return [k for k in sorted(batch) if k == "cat" or k.startswith("seq/")]


def unique_ids(ids: jnp.ndarray, fill: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(slots, inv)`` with every id of ``ids`` once in ``slots`` and ``slots[inv] == ids``:
    each id's slot is the position of its first occurrence, every other slot holds ``fill``
    (which must exceed every id: the table's row count, so scatters drop it).

    ``jnp.unique(..., size=ids.size)`` gives the same rows in sorted order, but sorting the
    Criteo batch's 160k ids costs ~20 ms on this CPU; one scatter-min of positions into a
    ``[fill]`` array and one gather cost ~1 ms (``experiments/results/bench_cpu.md``)."""
    pos = jnp.arange(ids.size, dtype=jnp.int32)
    first = jnp.full((fill,), ids.size, jnp.int32).at[ids].min(pos)[ids]
    return jnp.where(first == pos, ids, fill).astype(ids.dtype), first


class LazyAdamState(NamedTuple):
    dense: optax.OptState  # inject_hyperparams(adam) over the non-table parameters (holds the lr)
    count: jnp.ndarray  # steps taken, for the tables' bias correction
    mu: dict[str, jnp.ndarray]  # first moment of each table, by "/"-joined parameter path
    nu: dict[str, jnp.ndarray]
    clip: jnp.ndarray  # global-norm threshold as data (sweeps: one per replica); inf = off


class LazyAdam:
    """``optimizer="lazy_adam"``: not an optax transformation, since its table gradients come
    as gathered rows plus their ids; ``dpn_jax.train.state.make_train_step`` calls
    ``gather``/``apply`` around the gradient."""

    def __init__(self, lr: float, grad_clip: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-8, clip_as_data: bool = False, kernel: str = "xla"):
        """``clip_as_data`` (vmapped sweeps): always clip, at the threshold held in the state, so
        replicas with and without clipping share one program (below it, the gradient is
        returned unchanged). ``kernel="native"``: the rows' update by :func:`native_row_update`."""
        if kernel not in KERNELS:
            raise ConfigError(f"--set lazy_adam_kernel={kernel}: choose one of {', '.join(KERNELS)}")
        if kernel == "native":
            reason = native.cpu_only(NATIVE_OPTION, PORTABLE_OPTION)
            if reason:
                raise ConfigError(reason)
            _load_native()
        self.b1, self.b2, self.eps, self.grad_clip = b1, b2, eps, grad_clip
        self.clip_as_data, self.kernel = clip_as_data, kernel
        self.dense_tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=b1, b2=b2, eps=eps)

    @staticmethod
    def split(params) -> tuple[dict[str, Any], dict[str, Any]]:
        flat = traverse_util.flatten_dict(params, sep="/")
        tables = {k: v for k, v in flat.items() if _is_table(tuple(k.split("/")))}
        rest = {k: v for k, v in flat.items() if k not in tables}
        if not tables:
            raise ConfigError("optimizer=lazy_adam: the model has no embedding table to update "
                              "lazily; use optimizer=adam")
        return tables, rest

    def init(self, params) -> LazyAdamState:
        tables, rest = self.split(params)
        zeros = {k: jnp.zeros_like(v) for k, v in tables.items()}
        clip = jnp.asarray(self.grad_clip if self.grad_clip > 0 else jnp.inf, jnp.float32)
        return LazyAdamState(self.dense_tx.init(rest), jnp.zeros((), jnp.int32), zeros,
                             {k: jnp.zeros_like(v) for k, v in tables.items()}, clip)

    def gather(self, params, batch: dict) -> tuple[Any, dict, jnp.ndarray]:
        """``(params with tables -> their batch rows, batch + rows/<key>, unique ids)``."""
        tables, rest = self.split(params)
        sizes = {v.shape[0] for v in tables.values()}
        if len(sizes) != 1:
            raise ConfigError(f"optimizer=lazy_adam: embedding tables of different row counts "
                              f"{sorted(sizes)} cannot share one id remapping; use optimizer=adam")
        n_rows = sizes.pop()
        keys = id_keys(batch)
        flat_ids = jnp.concatenate([batch[k].reshape(-1) for k in keys])
        uniq, inv = unique_ids(flat_ids, n_rows)
        rows, start = {}, 0
        for k in keys:
            size = batch[k].size
            rows[ROWS_PREFIX + k] = inv.reshape(-1)[start:start + size].reshape(batch[k].shape).astype(jnp.int32)
            start += size
        # Padding slots (id V) gather zeros: no penalty, and their gradients are dropped below.
        sub = {k: jnp.take(v, uniq, axis=0, mode="fill", fill_value=0) for k, v in tables.items()}
        gathered = traverse_util.unflatten_dict({**rest, **sub}, sep="/")
        return gathered, {**batch, **rows}, uniq

    def apply(self, grads, state: LazyAdamState, params, uniq: jnp.ndarray) -> tuple[Any, LazyAdamState]:
        g_tables, g_rest = self.split(grads)
        tables, rest = self.split(params)
        if self.grad_clip > 0 or self.clip_as_data:  # optax.clip_by_global_norm's rule, over both
            norm = optax.tree.norm((g_tables, g_rest))
            g_tables, g_rest = jax.tree.map(
                lambda g: jnp.where(norm < state.clip, g, g * (state.clip / norm)), (g_tables, g_rest))
        updates, dense = self.dense_tx.update(g_rest, state.dense, rest)
        rest = optax.apply_updates(rest, updates)
        lr = dense.hyperparams["learning_rate"]
        t = (state.count + 1).astype(jnp.float32)
        bc1, bc2 = 1.0 - self.b1**t, 1.0 - self.b2**t
        mu, nu = dict(state.mu), dict(state.nu)
        for k, g in g_tables.items():
            if self.kernel == "native":
                tables[k], mu[k], nu[k] = native_row_update(
                    tables[k], mu[k], nu[k], uniq, g, jnp.stack([lr, bc1, bc2]).astype(jnp.float32),
                    self.b1, self.b2, self.eps)
                continue
            m = self.b1 * jnp.take(mu[k], uniq, axis=0, mode="fill", fill_value=0) + (1 - self.b1) * g
            v = self.b2 * jnp.take(nu[k], uniq, axis=0, mode="fill", fill_value=0) + (1 - self.b2) * g * g
            step = -lr * (m / bc1) / (jnp.sqrt(v / bc2) + self.eps)
            # uniq holds each id once, so add == set; the padding id V is out of range: dropped.
            tables[k] = tables[k].at[uniq].add(step.astype(tables[k].dtype), mode="drop")
            mu[k] = mu[k].at[uniq].set(m, mode="drop")
            nu[k] = nu[k].at[uniq].set(v, mode="drop")
        new_params = traverse_util.unflatten_dict({**rest, **tables}, sep="/")
        return new_params, LazyAdamState(dense, state.count + 1, mu, nu, state.clip)


@functools.cache
def _load_native() -> None:
    native.load("sparse_adam.cc", (("DpnJaxSparseAdam", NATIVE_TARGET),), NATIVE_OPTION)


def native_row_update(table, mu, nu, slots, grads, scalars, b1: float, b2: float, eps: float):
    """``(table, mu, nu)`` after lazy Adam on the rows ``slots`` (each row once; out-of-range =
    padding) with row gradients ``grads [n, d]`` and ``scalars = [lr, bc1, bc2]``: the formulas of
    :meth:`LazyAdam.apply` in one C++ pass, in place (dpn_jax/native/sparse_adam.cc)."""
    if not all(a.dtype == jnp.float32 for a in (table, mu, nu, grads)):
        raise ConfigError(f"{NATIVE_OPTION}: float32 tables only (got {table.dtype}); use lazy_adam_kernel=xla")
    _load_native()
    call = jax.ffi.ffi_call(NATIVE_TARGET, (jax.ShapeDtypeStruct(table.shape, table.dtype),) * 3,
                            input_output_aliases={0: 0, 1: 1, 2: 2}, vmap_method="sequential")
    return call(table, mu, nu, slots.astype(jnp.int32), grads, scalars,
                b1=np.float32(b1), b2=np.float32(b2), eps=np.float32(eps))
