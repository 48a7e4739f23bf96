"""Checkpoints of a vmapped sweep (:func:`dpn_jax.train.sweep.fit_sweep`), one per epoch, so a
killed sweep continues at the epoch after its last checkpoint instead of from scratch.

Each chunk of replicas has its own :class:`~dpn_jax.train.checkpoint.Checkpoints` directory
(``<checkpoint_dir>/replicas_<first>-<last>``). A checkpoint holds the stacked train state of the
replicas still in the program, every replica's best parameters (stacked over the chunk; zeros for
a replica without a best yet) and, as JSON, the sweep's bookkeeping: which replicas the state
holds and which still train, their early-stopping counters, histories, best epochs and timings.
Data orders depend only on (seed, epoch), so the resumed sweep trains the batches the
uninterrupted one would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from dpn_jax.train.checkpoint import Checkpoints, run_metadata
from dpn_jax.train.engine import Best


def open_chunk(checkpoint_dir: str | Path, first: int, last: int, resume: bool) -> Checkpoints:
    """The checkpoints of replicas ``first..last``: continued when ``resume`` and there are some,
    else a fresh directory (which refuses an earlier run's checkpoints unless ``resume``)."""
    return Checkpoints(Path(checkpoint_dir) / f"replicas_{first}-{last}", resume="if_any" if resume else False)


def sweep_metadata(model, data, cfgs, replicas: list[dict], state) -> dict:
    """What must match for a sweep checkpoint to be continued: the model, the data, the shared
    training options, the parameter shapes and each replica's own options (seed, lr, ...)."""
    run = run_metadata(model, data, cfgs[0], state.params)
    run["train"].pop("seed", None)
    run["replicas"] = {str(k): r for k, r in enumerate(replicas)}  # a dict: differences name the replica
    return run


def _stacked_best(best: list, template: Any) -> Any:
    """Per-replica ``best[k][i]`` trees stacked on a leading axis; zeros for replicas without."""
    zeros = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), template)
    trees = [zeros if b is None else b for b in best]
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def save(ckpt: Checkpoints, epoch: int, state, best: list[Best | None], book: dict, run: dict) -> Path:
    """Checkpoint ``epoch`` of a chunk: ``state`` (held replicas), ``best`` (per replica) and the
    bookkeeping ``book`` (JSON)."""
    # the state serves only for shapes and dtypes: nothing is copied off the device for it
    params = _stacked_best([None if b is None else b.params for b in best], state.params)
    stats = _stacked_best([None if b is None else b.batch_stats for b in best], state.batch_stats)
    book = dict(book, epoch=epoch, best=[None if b is None else [b.epoch, b.valid] for b in best])
    return ckpt.save(epoch, state, Best(params, stats, 0, {}), {"sweep": book}, run)


def restore(ckpt: Checkpoints, fresh_state, run: dict) -> tuple[Any, list[Best | None], dict]:
    """``(state, best, book)`` of the newest checkpoint, read into the shapes of the chunk's
    freshly initialised stacked state (cut to the replicas the checkpoint's state held)."""
    pos = np.asarray(ckpt.progress()["sweep"]["pos"], int)
    host = jax.device_get((fresh_state.params, fresh_state.batch_stats))
    template = {"state": jax.tree.map(lambda x: x[pos], fresh_state),
                "best": {"params": host[0], "batch_stats": host[1]}}
    arrays, progress = ckpt.restore_arrays(template, run)
    book = progress["sweep"]
    best: list[Best | None] = []
    for k, meta in enumerate(book["best"]):
        if meta is None:
            best.append(None)
            continue
        pick = (lambda k_: lambda x: np.array(x[k_]))(k)
        best.append(Best(jax.tree.map(pick, arrays["best"]["params"]),
                         jax.tree.map(pick, arrays["best"]["batch_stats"]), meta[0], meta[1]))
    return arrays["state"], best, book
