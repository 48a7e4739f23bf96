"""Where training batches come from: the plan of an epoch's dispatches, a split held on the
device (``data_on_device``), and the host path that puts blocks on the device ahead of the step.

A dispatch runs ``steps_per_dispatch`` train steps (``K``) on a block ``[K, batch, ...]``.
:func:`block_plan` cuts an epoch into blocks of ``K`` whole batches, then the batches left
(fewer than ``K``) one per dispatch, then the partial last batch (``n % batch_size`` rows) on its
own: three program shapes at most, whatever the remainders, and the rows, their order and the
steps exactly those of one batch per dispatch.

With ``data_on_device`` the encoded splits are copied to the device once (:class:`DeviceSplit`);
each epoch's permutation is drawn on the host exactly as :func:`dpn_jax.data.batch_order` draws
it for the host pipeline, sent once, and every block is gathered on the device from it. Without,
the host gathers each block and a background thread puts it on the device while the step before
it trains (:func:`dpn_jax.data.out_of_core.prefetch`, two blocks ahead).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax.data import batch_order
from dpn_jax.data.schema import Split, split_len
from dpn_jax.errors import ConfigError
from dpn_jax.train.config import DATA_ON_DEVICE
from dpn_jax.train.sharding import Layout, batch_sharding, replicated

# "auto" keeps the splits on the device when they take at most this share of its memory: the
# rest is for parameters, optimiser state and activations.
DEVICE_SHARE = 0.25


# ----------------------------------------------------------------------------- the plan


def block_plan(n: int, batch_size: int, steps: int, start_batch: int = 0) -> list[tuple[int, int, int]]:
    """``(first row, batches, rows per batch)`` of each dispatch of an ``n``-row epoch from batch
    ``start_batch`` on: blocks of ``steps`` whole batches while that many are left, then the
    whole batches left one by one, then the last ``n % batch_size`` rows."""
    whole = n // batch_size
    out, b = [], start_batch
    while b + steps <= whole:
        out.append((b * batch_size, steps, batch_size))
        b += steps
    while b < whole:
        out.append((b * batch_size, 1, batch_size))
        b += 1
    if n % batch_size and b == whole:
        out.append((whole * batch_size, 1, n % batch_size))
    return out


def group(batches: Iterable[dict], plan: Sequence[tuple[int, int, int]]) -> Iterator[dict]:
    """Consecutive host ``batches`` stacked into the plan's blocks (a leading step axis each)."""
    it = iter(batches)
    for _, steps, _ in plan:
        parts = [next(it) for _ in range(steps)]
        if steps == 1:
            yield {k: np.expand_dims(v, 0) for k, v in parts[0].items()}
        else:
            yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


class Orders:
    """Epoch row orders (:func:`dpn_jax.data.batch_order`, as int32) drawn ahead in a background
    thread: permuting a large split is slow on the host, and an accelerator would wait for it at
    every epoch's start, so the next epoch's order is drawn while this one trains. Each order
    asked ahead is held until taken (``n`` int32s each) or :meth:`close`."""

    def __init__(self, n: int):
        self.n = n
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dpn-orders")
        self._ahead: dict[tuple[int, int], Future] = {}

    def _draw(self, seed: int, epoch: int) -> np.ndarray:
        order = batch_order(self.n, shuffle=True, seed=seed, epoch=epoch)
        return order.astype(np.int32) if self.n < 2**31 else order

    def ahead(self, seed: int, epoch: int) -> None:
        """Start drawing the order of ``(seed, epoch)``."""
        if (seed, epoch) not in self._ahead:
            self._ahead[(seed, epoch)] = self._pool.submit(self._draw, seed, epoch)

    def get(self, seed: int, epoch: int) -> np.ndarray:
        fut = self._ahead.pop((seed, epoch), None)
        return fut.result() if fut is not None else self._draw(seed, epoch)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._ahead.clear()


# ----------------------------------------------------------------------------- the choice


def device_memory_bytes() -> int:
    """What the default device can hold: the accelerator's limit, or half the host's RAM on CPU."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)


def streamed(split: Any) -> bool:
    """A split read from disk as it trains (:class:`dpn_jax.data.out_of_core.ShardedSplit`)."""
    return hasattr(split, "batches")


def split_bytes(split: Split) -> int:
    return int(sum(v.nbytes for v in split.values()))


def on_device(setting: str, splits: Sequence[Any], budget: int, platform: str, processes: int = 1) -> bool:
    """Whether ``data_on_device=setting`` puts ``splits`` on the device. "auto": when they fit
    :data:`DEVICE_SHARE` of ``budget`` bytes on an accelerator; on the CPU, where device memory
    is host memory and a gather costs the same in numpy and in XLA, auto keeps them on the host;
    never for a split streamed from disk, nor across several processes (each feeds its own)."""
    if setting not in DATA_ON_DEVICE:
        raise ConfigError(f"--set data_on_device={setting}: choose one of {', '.join(DATA_ON_DEVICE)}")
    if setting == "false":
        return False
    why = ("the train split is streamed from disk (out of core)" if any(streamed(s) for s in splits) else
           f"training runs in {processes} processes" if processes > 1 else None)
    if why:
        if setting == "true":
            raise ConfigError(f"--set data_on_device=true: {why}, and its data cannot be held on the "
                              "device; use data_on_device=auto or false")
        return False
    if setting == "true":
        return True
    return platform != "cpu" and sum(split_bytes(s) for s in splits) <= DEVICE_SHARE * budget


# ----------------------------------------------------------------------------- on the device


@functools.partial(jax.jit, static_argnames=("steps", "rows"))
def _take(arrays: dict, order: jax.Array, start: jax.Array, steps: int | None, rows: int) -> dict:
    """Rows ``order[..., start : start + steps * rows]`` of ``arrays`` as ``[steps, ..., rows, ...]``
    (``steps=None``: ``[..., rows, ...]``; ``order`` may be ``[n]`` or ``[replicas, n]``)."""
    idx = jax.lax.dynamic_slice_in_dim(order, start, (steps or 1) * rows, axis=order.ndim - 1)
    if steps is not None:
        idx = jnp.moveaxis(idx.reshape(order.shape[:-1] + (steps, rows)), -2, 0)
    return {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()}


@functools.partial(jax.jit, static_argnames=("rows",))
def _take_padded(arrays: dict, start: jax.Array, rows: int) -> dict:
    """Rows ``start .. start + rows - 1`` in order, the ones past the end repeating the last row
    (:func:`dpn_jax.data.padded_batches`' padding)."""
    n = jax.tree.leaves(arrays)[0].shape[0]
    idx = jnp.minimum(start + jnp.arange(rows), n - 1)
    return {k: jnp.take(v, idx, axis=0) for k, v in arrays.items()}


class DeviceSplit:
    """A split's arrays on the device(s) -- on a mesh, whole on every device -- and the gathers
    of its rows there. ``host`` is the split it was copied from (labels are scored on the host)."""

    def __init__(self, host: Split, layout: Layout | None = None):
        self.host = host
        self.n = split_len(host)
        self.mesh = layout.mesh if layout is not None else None
        if self.mesh is None:  # on the CPU jnp.asarray shares the numpy buffer (no copy) when it can
            self.arrays = {k: jnp.asarray(np.asarray(v)) for k, v in host.items()}
        else:
            self.arrays = {k: _put_replicated(np.asarray(v), self.mesh) for k, v in host.items()}

    def order(self, order: np.ndarray) -> jax.Array:
        """An epoch's row order(s) (``[n]`` or ``[replicas, n]``, from the host) on the device."""
        order = np.asarray(order, np.int32)
        return jax.device_put(order) if self.mesh is None else _put_replicated(order, self.mesh)

    def take(self, order: jax.Array, start: int, steps: int | None, rows: int) -> dict:
        """The block of ``steps`` batches of ``rows`` rows from ``order[start:]`` (``steps=None``:
        one batch, no step axis); on a mesh laid out by rows over ``data`` like host blocks."""
        out = _take(self.arrays, order, np.int32(start), steps, rows)
        if self.mesh is None:
            return out
        row_axis = (0 if steps is None else 1) + (order.ndim - 1)
        sharding = replicated(self.mesh) if rows % self.mesh.shape["data"] else batch_sharding(self.mesh, row_axis)
        return jax.device_put(out, sharding)

    def padded_batches(self, batch_size: int) -> Iterator[dict]:
        """Every row once, in order, in batches of ``batch_size`` (the last one padded)."""
        for start in range(0, self.n, batch_size):
            yield _take_padded(self.arrays, np.int32(start), batch_size)


def _put_replicated(x: np.ndarray, mesh) -> jax.Array:
    return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])


def place_splits(data, setting: str, layout: Layout | None, log: Callable[[str], None]):
    """``(train, valid, test)``: :class:`DeviceSplit` copies when ``setting`` (see
    :func:`on_device`) puts the dataset on the device, else ``data``'s own splits."""
    splits = (data.train, data.valid, data.test)
    if not on_device(setting, splits, device_memory_bytes(), jax.default_backend(), jax.process_count()):
        return splits
    size = sum(split_bytes(s) for s in splits)
    log(f"data on device: {size / 2**20:,.0f} MiB (train, valid and test)")
    return tuple(DeviceSplit(s, layout) for s in splits)
