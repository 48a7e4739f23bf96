"""The fit loop: jitted train steps, precise BatchNorm, exact evaluation, early stopping.

Reads top to bottom: build the optimiser and state, then per epoch train -> re-estimate BatchNorm
statistics -> evaluate on every validation row -> keep the best parameters; finally restore the
best and evaluate on test. With a checkpoint directory, each epoch (and every
``cfg.checkpoint_every_steps`` batches) ends in a checkpoint, and ``resume=True`` continues the
newest one exactly (:mod:`dpn_jax.train.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from dpn_jax.data import padded_batches
from dpn_jax.data.schema import Dataset, Split, split_len
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.train import batchnorm
from dpn_jax.train.checkpoint import Checkpoints, all_finite, describe, run_defaults, run_metadata
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.early_stopping import EarlyStopping
from dpn_jax.train.progress import EpochProgress
from dpn_jax.train.sharding import Layout
from dpn_jax.train.state import (
    TrainState,
    count_params,
    get_lr,
    init_state,
    make_optimizer,
    make_predict,
    make_train_step,
    set_lr,
)


class NonFiniteLoss(DpnError):
    """Training diverged."""


@dataclasses.dataclass
class FitResult:
    params: Any
    batch_stats: Any
    best_epoch: int
    epochs: int
    history: list[dict]
    valid: dict[str, float]
    test: dict[str, float]
    train_seconds: float
    compile_seconds: float
    train_samples_per_s: float
    num_params: int


def predict_logits(predict, params, batch_stats, split: Split, batch_size: int) -> np.ndarray:
    """Logits for every row of ``split`` in order; the last batch is padded, then cut."""
    out = []
    for batch in padded_batches(split, batch_size):
        logits = predict(params, batch_stats, batch)
        out.append(np.asarray(logits)[batch["mask"] > 0])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def evaluate(predict, params, batch_stats, split: Split, batch_size: int) -> dict[str, float]:
    logits = predict_logits(predict, params, batch_stats, split, batch_size)
    labels = np.asarray(split["label"])
    return {"auc": auc(labels, logits), "logloss": logloss_from_logits(labels, logits)}


MONITORS = {"auc": lambda m: m["auc"], "auc-logloss": lambda m: m["auc"] - m["logloss"]}


def monitor_score(name: str, metrics: dict[str, float]) -> float:
    if name not in MONITORS:
        raise ConfigError(f"monitor={name!r} is not known; choose one of {sorted(MONITORS)}")
    return MONITORS[name](metrics)


def _first_rows(split: Split, n: int) -> dict:
    return {k: np.asarray(v[:n]) for k, v in split.items()}


def fit(model: nn.Module, data: Dataset, cfg: TrainConfig, *,
        log: Callable[[str], None] | None = None, progress: bool | None = None,
        on_epoch: Callable[[int, TrainState], dict | None] | None = None,
        checkpoint_dir: str | Path | None = None, resume: bool = False,
        mesh: Mesh | None = None) -> FitResult:
    """Train ``model`` on ``data.train``, early-stop on ``data.valid`` AUC, report on ``data.test``.

    ``on_epoch(epoch, state)`` runs after each evaluation; a dict it returns is added to that
    epoch's history row (learning curves, diagnostics). ``checkpoint_dir``: write checkpoints
    there; ``resume``: continue its newest checkpoint, ending as the uninterrupted run would.
    ``mesh`` (:func:`dpn_jax.train.sharding.make_mesh`): split batches over its ``data`` axis and
    embedding tables over ``model`` (:mod:`dpn_jax.train.sharding`); ``on_epoch`` then sees the
    laid-out state, tables padded to a multiple of ``model`` rows."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    n_train = split_len(data.train)
    if n_train == 0:
        raise DpnError(f"dataset {data.name!r}: the train split is empty")
    monitor_score(cfg.monitor, {"auc": 0.0, "logloss": 0.0})  # fail before training, not after
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs checkpoint_dir, the directory of the run to continue")
    ckpt = Checkpoints(checkpoint_dir, resume=resume) if checkpoint_dir is not None else None
    tx = make_optimizer(cfg)
    state: TrainState = init_state(model, _first_rows(data.train, min(n_train, 8)), cfg, tx)
    layout = Layout.create(mesh, model)  # without a mesh: the model, state and jax.jit as they are
    model, state = layout.model, layout.place_state(state)
    train_step = layout.jit_step(make_train_step(model, cfg, tx))
    predict = layout.jit_predict(make_predict(model))
    stats_of = batchnorm.make_batch_stats_fn(model) if state.batch_stats else None
    stopper = EarlyStopping.for_config(cfg)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    bar = EpochProgress(steps_per_epoch, cfg.batch_size, enabled=progress)

    history: list[dict] = []
    best = None
    train_seconds = compile_seconds = 0.0
    timed_samples = 0
    seen_shapes: set[int] = set()
    run = run_metadata(model, data, cfg, state.params) if ckpt else None
    start, end_epoch, last_saved = (1, 0, None), cfg.max_epochs, None
    if resume:
        r = ckpt.restore(state, run, cfg, defaults=run_defaults(model))
        state, best, history, stopper = r.state, r.best, r.history, r.stopper
        train_seconds, compile_seconds, timed_samples = r.timing
        start, last_saved = (r.epoch, r.batch, r.epoch_loss), ckpt.path()
        end_epoch = 0 if r.stopped else cfg.max_epochs  # an early-stopped run has only its test left
        log(f"resume from {last_saved}: epoch {r.epoch}, {r.batch} of {steps_per_epoch} batches done")

    def diverged(what: str, epoch: int, n_steps: int) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"{what} at epoch {epoch}, batch {n_steps} of {steps_per_epoch} (step {int(state.step)}; "
            f"the loss is read every 4 batches): lower the learning rate (--set lr=...), set --set "
            f"grad_clip=10, or skip such steps with --set on_nonfinite=skip"
            + (f"; {describe(last_saved)} (continue it with --resume)" if ckpt else ""))

    def save(epoch: int, n_steps: int, stopped: bool = False) -> None:
        # A diverged state must never replace the last good checkpoint.
        nonlocal last_saved
        if not all_finite((state.params, state.opt_state)):
            raise diverged("non-finite parameters", epoch, n_steps)
        done = n_steps == steps_per_epoch
        last_saved = ckpt.save((epoch - 1) * steps_per_epoch + n_steps, state, best, run=run, progress=dict(
            epoch=epoch + done, batch=0 if done else n_steps, stopped=stopped, history=history,
            stopper=stopper.state_dict(), epoch_loss=(loss_sum, n_losses, step0),
            timing=(train_seconds, compile_seconds, timed_samples)))

    try:
        for epoch in range(start[0], end_epoch + 1):
            bar.start_epoch(epoch)
            state = layout.place_state(state)  # a new lr / recalibrated statistics: back on the mesh
            t0 = time.perf_counter()
            epoch_compile, epoch_untimed, loss_sum, n_losses, n_steps = 0.0, 0, 0.0, 0, 0
            step0 = int(state.step)  # the state is synchronised here anyway
            if epoch == start[0] and start[1]:  # resuming mid-epoch: skip the batches trained
                n_steps, (loss_sum, n_losses, step0) = start[1], start[2]
                epoch_untimed = min(n_train, n_steps * cfg.batch_size)
            for batch in layout.batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                                        start_batch=n_steps):
                rows = int(batch["label"].shape[0])
                if rows not in seen_shapes:  # first call of a shape compiles: time it apart
                    jax.block_until_ready(state)
                    c0 = time.perf_counter()
                    state, loss = train_step(state, batch)
                    jax.block_until_ready(loss)
                    epoch_compile += time.perf_counter() - c0
                    epoch_untimed += rows
                    seen_shapes.add(rows)
                    bar.restart_clock(n_steps + 1)
                else:
                    state, loss = train_step(state, batch)
                n_steps += 1
                if n_steps % 4 == 0 or n_steps == steps_per_epoch:
                    loss_value = float(loss)
                    if math.isfinite(loss_value):
                        loss_sum, n_losses = loss_sum + loss_value, n_losses + 1
                    elif cfg.on_nonfinite == "stop":
                        raise diverged(f"non-finite training loss {loss_value}", epoch, n_steps)
                    bar.update(n_steps, loss_value)
                if ckpt and cfg.checkpoint_every_steps and n_steps % cfg.checkpoint_every_steps == 0 \
                        and n_steps < steps_per_epoch:
                    save(epoch, n_steps)
            jax.block_until_ready(state)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds - epoch_compile
            compile_seconds += epoch_compile
            timed_samples += n_train - epoch_untimed

            if stats_of is not None and cfg.bn_recalibrate:
                calib = layout.batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7919,
                                       epoch=epoch, drop_last=n_train >= cfg.batch_size)
                calib = (b for i, b in zip(range(cfg.bn_recalibrate_batches), calib))
                state = state.replace(batch_stats=batchnorm.recalibrate(
                    stats_of, state.params, state.batch_stats, calib, jax.random.PRNGKey(cfg.seed + epoch)))
            valid = evaluate(predict, state.params, state.batch_stats, data.valid, cfg.eval_batch_size)
            improved = stopper.update(monitor_score(cfg.monitor, valid))
            lr = get_lr(state)
            row = {"epoch": epoch, "train_loss": loss_sum / max(1, n_losses),
                   "valid_auc": valid["auc"], "valid_logloss": valid["logloss"], "lr": lr,
                   "epoch_seconds": epoch_seconds}
            if cfg.on_nonfinite == "skip":  # a skipped step leaves state.step unchanged
                row["skipped_steps"] = n_steps - (int(state.step) - step0)
            if on_epoch is not None:
                row.update(on_epoch(epoch, state) or {})
            history.append(row)
            bar.end_epoch()
            log(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  valid auc {valid['auc']:.4f}  "
                f"logloss {valid['logloss']:.4f}  lr {lr:.1e}  {epoch_seconds:.1f}s"
                + ("  *best" if improved else ""))
            if improved:
                best = (layout.to_host(state.params), layout.to_host(state.batch_stats), epoch, valid)
            elif stopper.should_stop:
                log(f"early stop: no validation {cfg.monitor} gain for {cfg.patience} epochs; best epoch {best[2]}")
                if ckpt:
                    save(epoch, n_steps, stopped=True)
                break
            elif (new_lr := stopper.lr_after_bad_epoch(lr, cfg)) < lr:
                state = set_lr(state, new_lr)
                log(f"reduce lr to {new_lr:.1e}")
            if ckpt:
                save(epoch, n_steps)
    finally:
        bar.close()  # also on errors: rich leaves the cursor hidden otherwise
    params, batch_stats, best_epoch, best_valid = best
    test = evaluate(predict, params, batch_stats, data.test, cfg.eval_batch_size)
    params = layout.unpad(params)  # tables back to the model's own row count
    return FitResult(
        params=params, batch_stats=batch_stats, best_epoch=best_epoch, epochs=len(history),
        history=history, valid=best_valid, test=test, train_seconds=train_seconds,
        compile_seconds=compile_seconds,
        train_samples_per_s=timed_samples / train_seconds if train_seconds > 0 else float("nan"),
        num_params=count_params(params),
    )
