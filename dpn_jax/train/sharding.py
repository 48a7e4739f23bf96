"""Data- and model-parallel training on a device mesh (``fit(mesh=...)``, ``--mesh data=4,model=2``).

One jitted program runs over a 2-D mesh with axes ``("data", "model")``:

* every batch is split by rows over ``data`` (a batch whose rows do not split evenly -- at most
  the last one of an epoch -- is replicated instead: same result, a little slower, once);
* parameters and optimiser state are replicated, except embedding tables (parameters named
  ``table`` and their Adam moments, same shape) which are split by rows over ``model``: in a CTR
  model the tables hold nearly all the memory.

``jax.jit`` (GSPMD) derives the gathers and all-reduces from this layout; the program computes
the single-device maths, so results agree with ``mesh=None`` up to float reduction order.

A table whose row count does not divide the ``model`` axis is padded with zero rows and the
model is cloned with the padded ``schema.table_size``. No id points at a padding row, so its
gradient, Adam moments and update stay exactly zero; :meth:`Layout.unpad` cuts it off again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpn_jax.errors import ConfigError

AXES = ("data", "model")
TABLE = "table"  # FieldEmbedding's parameter name (dpn_jax.nn.embedding)
MESH_EXAMPLE = "e.g. data=8 or data=4,model=2"


# ----------------------------------------------------------------------------- the mesh


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}``; an axis left out has size 1, and
    ``None``/empty puts every device on ``data``. The sizes must multiply to ``n_devices``."""
    if spec is None or not spec.strip():
        return {"data": n_devices, "model": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise ConfigError(f"--mesh {spec!r}: expected AXIS=SIZE pairs separated by commas, {MESH_EXAMPLE}")
        if name not in AXES:
            raise ConfigError(f"--mesh {spec!r}: unknown axis {name!r}; the axes are data and model ({MESH_EXAMPLE})")
        if name in sizes:
            raise ConfigError(f"--mesh {spec!r}: axis {name!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {spec!r}: {name}={value!r} is not an integer ({MESH_EXAMPLE})") from None
        if size < 1:
            raise ConfigError(f"--mesh {spec!r}: {name}={size} must be >= 1")
        sizes[name] = size
    out = {"data": sizes.get("data", 1), "model": sizes.get("model", 1)}
    if out["data"] * out["model"] != n_devices:
        raise ConfigError(
            f"--mesh {spec!r}: data x model = {out['data']} x {out['model']} = {out['data'] * out['model']} "
            f"devices, but {n_devices} {'is' if n_devices == 1 else 'are'} available; the sizes must multiply "
            f"to {n_devices} (e.g. data={n_devices}). To try more CPU devices, start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment")
    return out


def make_mesh(spec: str | None = None, devices: list | None = None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh(spec, len(devices))
    # Auto axes: GSPMD propagates shardings through any model code; Explicit (jax.make_mesh's
    # default) would make every op of every model state how its output is sharded.
    return jax.make_mesh((sizes["data"], sizes["model"]), AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def describe(mesh: Mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.shape.items())


# ----------------------------------------------------------------------------- shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, row_axis: int = 0) -> NamedSharding:
    """Rows (axis ``row_axis``: 1 in a block of batches ``[steps, rows, ...]``) over ``data``;
    the other dimensions whole."""
    return NamedSharding(mesh, P(*([None] * row_axis), "data"))


def table_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("model", None))


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def is_table(path: tuple, leaf) -> bool:
    """An embedding table or one of its optimiser moments: every optimiser keeps its moments in
    the parameters' tree, so their last key is ``table`` too."""
    return bool(path) and _key_name(path[-1]) == TABLE and np.ndim(leaf) == 2


def state_sharding(state: Any, mesh: Mesh) -> Any:
    """A tree of shardings matching ``state``: tables split by rows over ``model`` where their
    rows divide it (see :meth:`Layout.place_state` for padding), everything else replicated."""
    m = mesh.shape["model"]

    def one(path, leaf):
        if is_table(path, leaf) and np.shape(leaf)[0] % m == 0:
            return table_sharding(mesh)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def _put(x, sharding: NamedSharding):
    """``x`` laid out as ``sharding``; a no-op when it already is."""
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if jax.process_count() == 1 or not x.is_fully_addressable:
            return jax.device_put(x, sharding)
    # A host value (or a process-local array) that every process holds in full.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_state(state: Any, mesh: Mesh) -> Any:
    """Every leaf of ``state`` (params, batch_stats, opt_state, ...) laid out per
    :func:`state_sharding`."""
    return jax.tree.map(_put, state, state_sharding(state, mesh))


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh, row_axis: int = 0) -> dict[str, jax.Array]:
    """A global batch (host numpy, the same on every process) as arrays split by rows (axis
    ``row_axis``) over ``data``; replicated when its rows do not divide the ``data`` axis."""
    rows = int(next(iter(batch.values())).shape[row_axis])
    sharding = batch_sharding(mesh, row_axis) if rows % mesh.shape["data"] == 0 else replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    # Every process passes the whole batch with the global shape: each device takes its rows.
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), np.shape(v))
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- several hosts


def process_rows(rows: int, process_index: int, process_count: int) -> slice:
    """Rows ``[i*B/P, (i+1)*B/P)`` of a ``B``-row global batch: process ``i``'s share."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if rows % process_count:
        raise ConfigError(f"a batch of {rows} rows does not split over {process_count} processes: "
                          f"choose batch_size (--set batch_size=...) as a multiple of {process_count}")
    per = rows // process_count
    return slice(process_index * per, (process_index + 1) * per)


def process_shard(batch_iter: Iterable[dict], process_index: int, process_count: int) -> Iterator[dict]:
    """This process's rows of every global batch (see :func:`process_rows`); build the global
    arrays with :func:`place_local_batch`. Every process must iterate the same global batches
    (same seed and epoch), so the shares tile each batch exactly once."""
    for batch in batch_iter:
        sl = process_rows(int(next(iter(batch.values())).shape[0]), process_index, process_count)
        yield {k: v[sl] for k, v in batch.items()}


def place_local_batch(local: dict[str, np.ndarray], mesh: Mesh, global_rows: int) -> dict[str, jax.Array]:
    """Global arrays split by rows over ``data`` from this process's share (``process_shard``).
    Needs a mesh whose ``data`` axis visits the processes in order (``jax.make_mesh`` does)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), (global_rows, *np.shape(v)[1:]))
            for k, v in local.items()}


def to_host(tree: Any) -> Any:
    """Numpy copies of ``tree``; with several processes a split table is gathered first."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------- what fit uses


def _pad_rows(rows: int, multiple: int) -> int:
    return -(-rows // multiple) * multiple


@dataclasses.dataclass
class Layout:
    """How :func:`dpn_jax.train.loop.fit` lays state and batches out. With ``mesh=None`` every
    method is the identity (or plain ``jax.jit``), so single-device training is unchanged."""

    mesh: Mesh | None
    model: Any  # the model to train: a clone with padded table rows when the mesh needs it
    table_rows: int | None = None  # schema.table_size before padding
    padded_rows: int | None = None

    @classmethod
    def create(cls, mesh: Mesh | None, model: Any) -> Layout:
        schema = getattr(model, "schema", None)
        rows = getattr(schema, "table_size", None)
        if mesh is None or not rows or rows % mesh.shape["model"] == 0:
            return cls(mesh, model, rows, rows)
        padded = _pad_rows(rows, mesh.shape["model"])
        return cls(mesh, model.clone(schema=dataclasses.replace(schema, table_size=padded)), rows, padded)

    def _map_tables(self, fn: Callable, tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, x: fn(x) if is_table(p, x) else x, tree)

    def pad(self, tree: Any) -> Any:
        """Zero rows appended to every ``table_rows``-row table (and Adam moment)."""
        if self.padded_rows == self.table_rows:
            return tree
        extra = self.padded_rows - self.table_rows
        return self._map_tables(
            lambda x: np.pad(np.asarray(x), ((0, extra), (0, 0))) if np.shape(x)[0] == self.table_rows else x, tree)

    def unpad(self, tree: Any) -> Any:
        """The padding rows cut off again: the parameters of the model as the user built it."""
        if self.padded_rows == self.table_rows:
            return tree
        return self._map_tables(lambda x: x[: self.table_rows] if np.shape(x)[0] == self.padded_rows else x, tree)

    def place_state(self, state: Any) -> Any:
        """Pad (once) and lay out ``state``; cheap when it already is (no copies)."""
        if self.mesh is None:
            return state
        return place_state(self.pad(state), self.mesh)

    def place_batch(self, batch: dict) -> dict:
        return batch if self.mesh is None else place_batch(batch, self.mesh)

    def place_block(self, block: dict) -> dict:
        """A block of batches ``[steps, rows, ...]`` (host numpy) on the device(s): on a mesh,
        each batch split by rows over ``data`` as :meth:`place_batch` splits one."""
        return jax.device_put(block) if self.mesh is None else place_batch(block, self.mesh, row_axis=1)

    def batches(self, split: Any, batch_size: int, **kw: Any) -> Iterator[dict]:
        """``dpn_jax.data.batches(split, batch_size, **kw)`` laid out on the mesh. A streamed
        split (one with a ``batches`` method, :class:`dpn_jax.data.out_of_core.ShardedSplit`)
        places its batches on the devices in its prefetch thread, ahead of the train step."""
        if hasattr(split, "batches"):
            return split.batches(batch_size, place=jax.device_put if self.mesh is None else self.place_batch, **kw)
        from dpn_jax.data import batches

        it = batches(split, batch_size, **kw)
        return it if self.mesh is None else map(self.place_batch, it)

    def jit_step(self, step: Callable) -> Callable:
        """``jax.jit(step, donate_argnums=0)``; on a mesh the new state keeps the state's layout
        (pinned, so no step can drift a table to replicated) and the loss is replicated."""
        if self.mesh is None:
            return jax.jit(step, donate_argnums=0)
        compiled: dict[Any, Callable] = {}

        def run(state, batch):
            treedef = jax.tree.structure(state)
            if treedef not in compiled:
                compiled[treedef] = jax.jit(step, donate_argnums=0, out_shardings=(
                    state_sharding(state, self.mesh), replicated(self.mesh)))
            return compiled[treedef](state, batch)

        return run

    def jit_predict(self, predict: Callable) -> Callable:
        """``jax.jit(predict)``; on a mesh it places its arguments and returns replicated logits
        (readable on every process)."""
        if self.mesh is None:
            return jax.jit(predict)
        jitted = jax.jit(predict, out_shardings=replicated(self.mesh))

        def run(params, batch_stats, batch):
            placed = self.place_state({"params": params, "batch_stats": batch_stats})
            return jitted(placed["params"], placed["batch_stats"], self.place_batch(batch))

        return run

    def to_host(self, tree: Any) -> Any:
        return jax.device_get(tree) if self.mesh is None else to_host(tree)
