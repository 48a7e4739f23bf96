"""Vmapped sweeps: K replicas of one model trained as one jitted program.

Reads like :func:`dpn_jax.train.loop.fit`, with a leading replica axis on every piece of state:
each replica is initialised exactly as ``fit`` would (own seed), then per epoch all replicas take
their train steps together (``vmap`` inside one ``jit``), each on its own data order; BatchNorm
statistics are re-estimated and validation is scored per replica; a replica that early-stops
keeps its best parameters and is masked out of further updates while the others go on.

A replica differs from the others by seed and by training options that are data, not program
structure (``SWEEPABLE``: learning rate, embedding/net L2, gradient clip), and by the model's
``dropout`` rate (``dropouts``: passed into the model as a traced scalar). Everything else —
model options, batch size, epochs, monitor — must be equal within one call: callers group
configurations by those first (``dpn_jax.sweep_runner`` does).

Replica ``k`` computes the same arithmetic as ``fit(model, data, cfgs[k])``, but XLA may sum the
vmapped matmuls in another order: each step agrees to float rounding, not bit for bit. Over long
training at high learning rates those rounding differences can grow as far as the seed-to-seed
spread — exactly as they do between two compilations of ``fit`` itself (notebook 04 shows both):
a replica is a statistically equivalent run, and bit-equal only step by step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax.data import batches, padded_batches
from dpn_jax.data.schema import Dataset, Split, split_len
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.train import batchnorm, sweep_checkpoint
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.early_stopping import EarlyStopping
from dpn_jax.train.loop import FitResult, _first_rows, monitor_score
from dpn_jax.train.progress import EpochProgress
from dpn_jax.train.state import (
    REGULARIZERS,
    TrainState,
    _inject_state,
    count_params,
    init_state,
    make_init_fn,
    make_optimizer,
    make_predict,
    make_train_step,
    set_lr,
)

SWEEPABLE = ("seed", "lr", "embedding_l2", "net_l2", "grad_clip")


@dataclasses.dataclass
class ReplicaResult:
    """One replica's outcome: ``fit``'s result, or why it has none (``diverged``)."""

    config: TrainConfig
    result: FitResult | None
    status: str  # "done" | "diverged"
    message: str = ""


def static_key(cfg: TrainConfig) -> tuple:
    """Options that shape the program; replicas must agree on them."""
    return tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                 if f.name not in SWEEPABLE)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _where(mask: jnp.ndarray, new: Any, old: Any) -> Any:
    def pick(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree_util.tree_map(pick, new, old)


def _stacked_batches(split: Split, cfgs: Sequence[TrainConfig], batch_size: int, *, seed_offset: int,
                     epoch: int, drop_last: bool = False):
    """Per-replica data orders zipped into batches with a leading replica axis."""
    its = [batches(split, batch_size, shuffle=True, seed=c.seed + seed_offset, epoch=epoch,
                   drop_last=drop_last) for c in cfgs]
    for parts in zip(*its):
        yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def replica_bytes(model: nn.Module, example: dict, cfg: TrainConfig) -> tuple[int, int]:
    """``(state, activations)``: device bytes one replica holds between steps (parameters, batch
    statistics, optimiser state, one gradient and one update) and during a step (every module's
    output for one batch, kept for the backward pass, and its gradient) — from ``jax.eval_shape``,
    nothing is allocated."""
    tx = make_optimizer(cfg, clip_as_data=True)
    shapes = jax.eval_shape(lambda b: init_state(model, b, cfg, tx), example)

    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))

    batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, *v.shape[1:]), v.dtype) for k, v in example.items()}
    variables = {"params": shapes.params, **({"batch_stats": shapes.batch_stats} if shapes.batch_stats else {})}
    _, inter = jax.eval_shape(lambda v, b: model.apply(v, b, train=False, capture_intermediates=True,
                                                       mutable=["intermediates"]), variables, batch)
    return nbytes(shapes) + 2 * nbytes(shapes.params), 2 * nbytes(inter)


def device_memory_bytes() -> int:
    """What the default device can hold: the accelerator's limit, or half the host's RAM on CPU."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory_stats
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)


def plan_chunk(n: int, per_replica: int, budget: int) -> int:
    """Most replicas per program whose memory fits ``budget`` (at least one)."""
    return max(1, min(n, budget // max(per_replica, 1)))


def fit_sweep(model: nn.Module, data: Dataset, cfgs: Sequence[TrainConfig], *,
              log: Callable[[str], None] | None = None, progress: bool | None = None,
              dropouts: Sequence[float] | None = None, max_replicas: int | None = None,
              memory_budget: int | None = None,
              on_epoch: Callable[[int, TrainState, np.ndarray, np.ndarray], None] | None = None,
              checkpoint_dir: str | Path | None = None, resume: bool = False,
              ) -> list[ReplicaResult]:
    """Train one replica per config in ``cfgs`` (same static options) as vmapped programs.

    ``dropouts``: per-replica values of the model's ``dropout`` option (data, one program).
    Returns one :class:`ReplicaResult` per config, in order. Replicas are split into chunks
    that fit the device (``memory_budget`` bytes, default from the device) or ``max_replicas``.
    ``on_epoch(epoch, stacked_state, held, active)`` runs after each epoch's bookkeeping: the
    state's leading axis holds replicas ``held`` (indices into ``cfgs``; stopped replicas are
    dropped from it once fewer than ``COMPACT_BELOW`` of those held are active), and
    ``active[k]`` says whether replica ``k`` still trains.
    ``checkpoint_dir``: a checkpoint per chunk after every epoch (:mod:`dpn_jax.train.sweep_checkpoint`);
    ``resume``: chunks with a checkpoint there continue after its epoch, the others start afresh."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfgs = list(cfgs)
    if not cfgs:
        raise ConfigError("fit_sweep: no configurations given")
    keys = {static_key(c) for c in cfgs}
    if len(keys) > 1:
        differ = sorted({k for key in keys for k, v in key if v != dict(static_key(cfgs[0]))[k]})
        raise ConfigError(f"fit_sweep: the configurations differ in {differ}, which change the "
                          f"program; group them into separate sweeps (only {list(SWEEPABLE)} may vary)")
    if dropouts is not None:
        dropouts = [float(d) for d in dropouts]
        if len(dropouts) != len(cfgs):
            raise ConfigError(f"fit_sweep: {len(dropouts)} dropout rates for {len(cfgs)} replicas")
        if not hasattr(model, "dropout"):
            raise ConfigError(f"model {type(model).__name__} has no `dropout` option to sweep; "
                              "remove dropout from the grid")
        if any(not 0.0 <= d < 1.0 for d in dropouts):
            raise ConfigError(f"dropout rates must lie in [0, 1), got {dropouts}")
    n_train = split_len(data.train)
    if n_train == 0:
        raise DpnError(f"dataset {data.name!r}: the train split is empty")
    monitor_score(cfgs[0].monitor, {"auc": 0.0, "logloss": 0.0})

    example = _first_rows(data.train, min(n_train, 8))
    per_replica = sum(replica_bytes(model, example, cfgs[0]))
    budget = memory_budget if memory_budget is not None else device_memory_bytes()
    chunk = plan_chunk(len(cfgs), per_replica, budget)
    if max_replicas:
        chunk = min(chunk, max_replicas)
    if chunk < len(cfgs):
        log(f"sweep: {len(cfgs)} replicas need about {len(cfgs) * per_replica / 2**30:.2f} GiB; "
            f"{budget / 2**30:.1f} GiB available: running {math.ceil(len(cfgs) / chunk)} programs "
            f"of at most {chunk} replicas")
    out: list[ReplicaResult] = []
    for start in range(0, len(cfgs), chunk):
        part = cfgs[start:start + chunk]
        ckpt = None if checkpoint_dir is None else sweep_checkpoint.open_chunk(
            checkpoint_dir, start, start + len(part) - 1, resume)
        out += _fit_chunk(model, data, part, log=log, progress=progress,
                          first=start, dropouts=None if dropouts is None else dropouts[start:start + chunk],
                          on_epoch=on_epoch, ckpt=ckpt)
    return out


COMPACT_BELOW = 0.75  # drop stopped replicas from the program once fewer than this share is active


def _fit_chunk(model, data: Dataset, cfgs: list[TrainConfig], *, log, progress, first: int,
               dropouts: list[float] | None, on_epoch=None, ckpt=None) -> list[ReplicaResult]:
    K, cfg0 = len(cfgs), cfgs[0]
    n_train = split_len(data.train)
    example = _first_rows(data.train, min(n_train, 8))
    use_clip = any(c.grad_clip > 0 for c in cfgs)
    reg_names = [k for k in REGULARIZERS if any(getattr(c, k) > 0 for c in cfgs)]

    # Each replica is initialised exactly as fit() would, then stacked on a leading axis.
    txs = [make_optimizer(c, clip_as_data=use_clip) for c in cfgs]
    init_fn = make_init_fn(model)  # one compilation for every seed
    states = [init_state(model, example, c, tx, init_fn) for c, tx in zip(cfgs, txs)]
    state: TrainState = _stack(states)
    del states
    coefs_all = {k: np.asarray([getattr(c, k) for c in cfgs], np.float32) for k in reg_names}
    rates_all = None if dropouts is None else np.asarray(dropouts, np.float32)

    def model_with(rate):  # a per-replica dropout rate enters the model as a traced scalar
        return model if rate is None else model.clone(dropout=rate)

    def step(state, batch, coefs, rate):
        return make_train_step(model_with(rate), cfg0, txs[0], regularizers_as_data=True)(state, batch, coefs)

    def sweep_step(state, batch, coefs, rates, active):
        new, loss = jax.vmap(step)(state, batch, coefs, rates)
        return _where(active, new, state), loss

    def stats_one(params, stats_in, batch, rng, rate):
        return batchnorm.batch_stats_fn(model_with(rate))(params, stats_in, batch, rng)

    train_step = jax.jit(sweep_step, donate_argnums=0)
    predict = jax.jit(jax.vmap(make_predict(model), in_axes=(0, 0, None)))
    stats_of = None
    if state.batch_stats:
        stats_of = jax.jit(lambda p, s, b, r, rates: jax.vmap(stats_one)(p, s, b, r, rates))
    fold_in = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    # ``pos``: which replicas (indices into cfgs) the stacked state holds, in order. Stopped
    # replicas stay in it, masked, until few are left; then the stack is compacted (one new
    # compilation) so a CPU stops spending steps on them.
    pos = np.arange(K)
    stoppers = [EarlyStopping.for_config(c) for c in cfgs]
    active = np.ones(K, bool)
    status = ["done"] * K
    messages = [""] * K
    histories: list[list[dict]] = [[] for _ in range(K)]
    best: list[Any] = [None] * K
    steps_per_epoch = math.ceil(n_train / cfg0.batch_size)
    bar = EpochProgress(steps_per_epoch, cfg0.batch_size * K, enabled=progress)
    train_seconds = compile_seconds = 0.0
    timed_samples = 0
    seen_shapes: set[tuple[int, int]] = set()
    label = f"replicas {first}-{first + K - 1}"
    start_epoch = 1
    if ckpt is not None:
        run = sweep_checkpoint.sweep_metadata(
            model, data, cfgs, [{"sweep": _describe(c), "dropout": None if dropouts is None else dropouts[k]}
                                for k, c in enumerate(cfgs)], state)
        if ckpt.path() is not None:
            state, best, book = sweep_checkpoint.restore(ckpt, state, run)
            pos, active = np.asarray(book["pos"], int), np.asarray(book["active"], bool)
            status, messages, histories = book["status"], book["messages"], book["histories"]
            stoppers = [EarlyStopping.for_config(c, saved) for c, saved in zip(cfgs, book["stoppers"])]
            train_seconds, compile_seconds, timed_samples = book["timing"]
            start_epoch = book["epoch"] + 1
            log(f"sweep: {label} resumed after epoch {book['epoch']} from {ckpt.path()}")
    try:
        for epoch in range(start_epoch, cfg0.max_epochs + 1):
            if not active.any():
                break
            held = [cfgs[i] for i in pos]
            coefs = {k: jnp.asarray(v[pos]) for k, v in coefs_all.items()}
            rates = None if rates_all is None else jnp.asarray(rates_all[pos])
            bar.start_epoch(epoch)
            t0 = time.perf_counter()
            epoch_compile, epoch_untimed, n_steps = 0.0, 0, 0
            loss_sum = np.zeros(K)
            mask = jnp.asarray(active[pos])
            for batch in _stacked_batches(data.train, held, cfg0.batch_size, seed_offset=0, epoch=epoch):
                shape = (len(pos), int(batch["label"].shape[1]))
                if shape not in seen_shapes:
                    jax.block_until_ready(state)
                    c0 = time.perf_counter()
                    state, loss = train_step(state, batch, coefs, rates, mask)
                    jax.block_until_ready(loss)
                    epoch_compile += time.perf_counter() - c0
                    epoch_untimed += shape[1]
                    seen_shapes.add(shape)
                    bar.restart_clock(n_steps + 1)
                else:
                    state, loss = train_step(state, batch, coefs, rates, mask)
                n_steps += 1
                if n_steps % 4 == 0 or n_steps == steps_per_epoch:
                    values = np.full(K, np.nan)
                    values[pos] = np.asarray(loss, np.float64)
                    for k in np.flatnonzero(active & ~np.isfinite(values)):
                        active[k], status[k] = False, "diverged"
                        messages[k] = (f"non-finite training loss {values[k]} at epoch {epoch}: lower "
                                       f"the learning rate or set grad_clip")
                        log(f"sweep: replica {first + k} ({_describe(cfgs[k])}) diverged at epoch {epoch}")
                    mask = jnp.asarray(active[pos])
                    loss_sum += np.where(np.isfinite(values), values, 0.0)
                    shown = values[active]
                    bar.update(n_steps, float(shown.mean()) if shown.size else float("nan"))
            jax.block_until_ready(state)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds - epoch_compile
            compile_seconds += epoch_compile
            timed_samples += (n_train - epoch_untimed) * int(active[pos].sum())

            if stats_of is not None and cfg0.bn_recalibrate:
                calib = _stacked_batches(data.train, held, cfg0.batch_size, seed_offset=7919, epoch=epoch,
                                         drop_last=n_train >= cfg0.batch_size)
                calib = (b for _, b in zip(range(cfg0.bn_recalibrate_batches), calib))
                keys = jnp.stack([jax.random.PRNGKey(c.seed + epoch) for c in held])
                new_stats = batchnorm.recalibrate(
                    lambda p, s, b, r, rates=rates: stats_of(p, s, b, r, rates), state.params, state.batch_stats,
                    calib, keys, fold_in=fold_in)
                state = state.replace(batch_stats=_where(mask, new_stats, state.batch_stats))
            scores = evaluate_replicas(predict, state.params, state.batch_stats, data.valid,
                                       cfg0.eval_batch_size)
            valid = dict(zip(pos.tolist(), scores))
            lrs_held = np.asarray(_inject_state(state.opt_state).hyperparams["learning_rate"], np.float64)
            new_lrs = lrs_held.copy()
            improved_any = []
            params_host = stats_host = None
            for j, k in enumerate(pos):
                if not active[k]:
                    continue
                c = cfgs[k]
                improved = stoppers[k].update(monitor_score(c.monitor, valid[k]))
                histories[k].append({
                    "epoch": epoch, "train_loss": loss_sum[k] / max(1, math.ceil(n_steps / 4)),
                    "valid_auc": valid[k]["auc"], "valid_logloss": valid[k]["logloss"],
                    "lr": float(lrs_held[j]), "epoch_seconds": epoch_seconds})
                if improved:
                    if params_host is None:
                        params_host, stats_host = jax.device_get((state.params, state.batch_stats))
                    pick = (lambda j_: lambda x: np.array(x[j_]))(j)
                    best[k] = (jax.tree_util.tree_map(pick, params_host),
                               jax.tree_util.tree_map(pick, stats_host), epoch, valid[k])
                    improved_any.append(k)
                elif stoppers[k].should_stop:
                    active[k] = False
                else:
                    new_lrs[j] = stoppers[k].lr_after_bad_epoch(float(lrs_held[j]), c)
            if (new_lrs != lrs_held).any():
                state = set_lr(state, new_lrs.astype(np.float32))
            if on_epoch is not None:
                on_epoch(epoch, state, pos.copy(), active.copy())
            bar.end_epoch()
            shown = "  ".join(
                f"{valid[k]['auc']:.4f}{'*' if k in improved_any else (' ' if active[k] else 'x')}"
                if k in valid else "   -   " for k in range(K))
            log(f"epoch {epoch:3d}  {label} valid auc  {shown}  ({int(active.sum())} active, {epoch_seconds:.1f}s)")
            keep = np.flatnonzero(active[pos])
            if 0 < len(keep) < COMPACT_BELOW * len(pos):
                state = jax.tree_util.tree_map(lambda x, keep=keep: x[keep], state)
                pos = pos[keep]
            if ckpt is not None:
                sweep_checkpoint.save(ckpt, epoch, state, best, {
                    "pos": pos.tolist(), "active": active.tolist(), "status": status, "messages": messages,
                    "histories": histories, "stoppers": [st.state_dict() for st in stoppers],
                    "timing": [train_seconds, compile_seconds, timed_samples]}, run)
    finally:
        bar.close()

    # Test: every finished replica's best parameters, scored together.
    results: list[ReplicaResult] = []
    done = [k for k in range(K) if best[k] is not None]
    tests: dict[int, dict] = {}
    if done:
        params = _stack([best[k][0] for k in done])
        stats = _stack([best[k][1] for k in done])
        for k, metrics in zip(done, evaluate_replicas(predict, params, stats, data.test, cfg0.eval_batch_size)):
            tests[k] = metrics
    rate = timed_samples / train_seconds if train_seconds > 0 else float("nan")
    for k, c in enumerate(cfgs):
        if best[k] is None:
            results.append(ReplicaResult(c, None, "diverged", messages[k] or "no finite validation score"))
            continue
        p, s, best_epoch, best_valid = best[k]
        results.append(ReplicaResult(c, FitResult(
            params=p, batch_stats=s, best_epoch=best_epoch, epochs=len(histories[k]),
            history=histories[k], valid=best_valid, test=tests[k], train_seconds=train_seconds,
            compile_seconds=compile_seconds, train_samples_per_s=rate, num_params=count_params(p)),
            status[k], messages[k]))
    return results


def evaluate_replicas(predict, params, batch_stats, split: Split, batch_size: int) -> list[dict[str, float]]:
    """Exact AUC and logloss of every replica on every row of ``split``."""
    out = []
    for batch in padded_batches(split, batch_size):
        logits = np.asarray(predict(params, batch_stats, batch))
        out.append(logits[:, batch["mask"] > 0])
    labels = np.asarray(split["label"])
    logits = np.concatenate(out, axis=1)
    return [{"auc": auc(labels, lg), "logloss": logloss_from_logits(labels, lg)} for lg in logits]


def _describe(cfg: TrainConfig) -> str:
    return " ".join(f"{k}={getattr(cfg, k)}" for k in SWEEPABLE)
