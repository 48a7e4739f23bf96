"""The fit loop: jitted train steps, precise BatchNorm, exact evaluation, early stopping.

Reads top to bottom: build the optimiser and state, then per epoch train -> re-estimate BatchNorm
statistics -> evaluate on every validation row -> keep the best parameters; finally restore the
best and evaluate on test.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dpn_jax.data import batches, padded_batches
from dpn_jax.data.schema import Dataset, Split, split_len
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.train import batchnorm
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.early_stopping import EarlyStopping
from dpn_jax.train.metrics import auc, logloss_from_logits
from dpn_jax.train.progress import EpochProgress
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
        on_epoch: Callable[[int, TrainState], dict | None] | None = None) -> FitResult:
    """Train ``model`` on ``data.train``, early-stop on ``data.valid`` AUC, report on ``data.test``.

    ``on_epoch(epoch, state)`` runs after each evaluation; a dict it returns is added to that
    epoch's history row (learning curves, diagnostics)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    n_train = split_len(data.train)
    if n_train == 0:
        raise DpnError(f"dataset {data.name!r}: the train split is empty")
    monitor_score(cfg.monitor, {"auc": 0.0, "logloss": 0.0})  # fail before training, not after
    tx = make_optimizer(cfg)
    state: TrainState = init_state(model, _first_rows(data.train, min(n_train, 8)), cfg, tx)
    train_step = jax.jit(make_train_step(model, cfg, tx), donate_argnums=0)
    predict = jax.jit(make_predict(model))
    stats_of = batchnorm.make_batch_stats_fn(model) if state.batch_stats else None
    stopper = EarlyStopping(patience=cfg.patience)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    bar = EpochProgress(steps_per_epoch, cfg.batch_size, enabled=progress)

    history: list[dict] = []
    best = None
    train_seconds = compile_seconds = 0.0
    timed_samples = 0
    seen_shapes: set[int] = set()
    try:
        for epoch in range(1, cfg.max_epochs + 1):
            bar.start_epoch(epoch)
            t0 = time.perf_counter()
            epoch_compile, epoch_untimed, loss_sum, n_steps = 0.0, 0, 0.0, 0
            for batch in batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch):
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
                    if not math.isfinite(loss_value):
                        raise NonFiniteLoss(
                            f"non-finite training loss {loss_value} at epoch {epoch}, step {int(state.step)}: "
                            f"lower the learning rate (--set lr=...) or set --set grad_clip=10")
                    loss_sum += loss_value
                    bar.update(n_steps, loss_value)
            jax.block_until_ready(state)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds - epoch_compile
            compile_seconds += epoch_compile
            timed_samples += n_train - epoch_untimed

            if stats_of is not None and cfg.bn_recalibrate:
                calib = batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 7919,
                                epoch=epoch, drop_last=n_train >= cfg.batch_size)
                calib = (b for i, b in zip(range(cfg.bn_recalibrate_batches), calib))
                state = state.replace(batch_stats=batchnorm.recalibrate(
                    stats_of, state.params, state.batch_stats, calib, jax.random.PRNGKey(cfg.seed + epoch)))
            valid = evaluate(predict, state.params, state.batch_stats, data.valid, cfg.eval_batch_size)
            improved = stopper.update(monitor_score(cfg.monitor, valid))
            lr = get_lr(state)
            row = {"epoch": epoch, "train_loss": loss_sum / max(1, math.ceil(n_steps / 4)),
                   "valid_auc": valid["auc"], "valid_logloss": valid["logloss"], "lr": lr,
                   "epoch_seconds": epoch_seconds}
            if on_epoch is not None:
                row.update(on_epoch(epoch, state) or {})
            history.append(row)
            bar.end_epoch()
            log(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  valid auc {valid['auc']:.4f}  "
                f"logloss {valid['logloss']:.4f}  lr {lr:.1e}  {epoch_seconds:.1f}s"
                + ("  *best" if improved else ""))
            if improved:
                best = (jax.device_get(state.params), jax.device_get(state.batch_stats), epoch, valid)
            elif stopper.should_stop:
                log(f"early stop: no validation {cfg.monitor} gain for {cfg.patience} epochs; best epoch {best[2]}")
                break
            elif cfg.reduce_lr_factor > 0:
                new_lr = max(cfg.min_lr, lr * cfg.reduce_lr_factor)
                if new_lr < lr:
                    state = set_lr(state, new_lr)
                    log(f"reduce lr to {new_lr:.1e}")
    finally:
        bar.close()  # also on errors: rich leaves the cursor hidden otherwise
    params, batch_stats, best_epoch, best_valid = best
    test = evaluate(predict, params, batch_stats, data.test, cfg.eval_batch_size)
    return FitResult(
        params=params, batch_stats=batch_stats, best_epoch=best_epoch, epochs=len(history),
        history=history, valid=best_valid, test=test, train_seconds=train_seconds,
        compile_seconds=compile_seconds,
        train_samples_per_s=timed_samples / train_seconds if train_seconds > 0 else float("nan"),
        num_params=count_params(params),
    )
