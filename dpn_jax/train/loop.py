"""The fit loop: jitted train steps, precise BatchNorm, exact evaluation, early stopping.

Reads top to bottom: build the optimiser, state and program, then per epoch train -> re-estimate
BatchNorm statistics -> evaluate on every validation row -> the protocol's verdict (keep the
best parameters, stop, or cut the learning rate); finally evaluate the best on test. The steps of
each are the shared pieces of :mod:`dpn_jax.train.engine`. With a checkpoint directory, each
epoch (and every ``cfg.checkpoint_every_steps`` batches) ends in a checkpoint, and
``resume=True`` continues the newest one exactly (:mod:`dpn_jax.train.checkpoint`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
from jax.sharding import Mesh

from dpn_jax.data.schema import Dataset, split_len
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.train import batchnorm, early_stopping
from dpn_jax.train.checkpoint import Checkpoints, all_finite, describe, run_defaults, run_metadata
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.device_data import Orders, place_splits, streamed
from dpn_jax.train.engine import (
    MONITORS,
    READ_EVERY,
    Best,
    EpochTally,
    Feeder,
    FitResult,
    Program,
    Timing,
    dispatch_of,
    evaluate,
    example_batch,
    fit_result,
    history_row,
    monitor_score,
    predict_logits,
    recalibrate_bn,
    run_epoch,
)
from dpn_jax.train.progress import EpochProgress
from dpn_jax.train.sharding import Layout
from dpn_jax.train.state import (
    TrainState,
    get_lr,
    init_state,
    make_optimizer,
    make_predict,
    make_train_step,
    set_lr,
)

__all__ = ["MONITORS", "FitResult", "NonFiniteLoss", "evaluate", "fit", "monitor_score", "predict_logits"]


class NonFiniteLoss(DpnError):
    """Training diverged."""


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
    state: TrainState = init_state(model, example_batch(data.train), cfg, tx)
    layout = Layout.create(mesh, model)  # without a mesh: the model, state and jax.jit as they are
    model, state = layout.model, layout.place_state(state)
    program = Program(dispatch=layout.jit_step(dispatch_of(make_train_step(model, cfg, tx))),
                      predict=layout.jit_predict(make_predict(model)),
                      batch_stats=batchnorm.make_batch_stats_fn(model) if state.batch_stats else None)
    train, valid_split, test_split = place_splits(data, cfg.data_on_device, layout, log)
    orders = None if streamed(data.train) else Orders(n_train)
    feeder = Feeder(data.train, cfg.batch_size, (cfg.seed,), layout=layout, steps=cfg.steps_per_dispatch,
                    device=None if train is data.train else train, ahead=orders)
    rules = early_stopping.Rules.of(cfg)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    bar = EpochProgress(steps_per_epoch, cfg.batch_size, enabled=progress)

    history: list[dict] = []
    best: Best | None = None
    stop_state, timing = early_stopping.StopState(), Timing()
    seen_shapes: set[tuple[int, ...]] = set()
    run = run_metadata(model, data, cfg, state.params) if ckpt else None
    first_epoch, end_epoch, resumed, last_saved = 1, cfg.max_epochs, None, None
    if resume:
        r = ckpt.restore(state, run, defaults=run_defaults(model))
        state, best, history, stop_state, timing = r.state, r.best, r.history, r.stopper, r.timing
        first_epoch, last_saved = r.epoch, ckpt.path()
        resumed = r.tally if r.batch else None  # resuming mid-epoch: its batches trained and loss read
        end_epoch = 0 if r.stopped else cfg.max_epochs  # an early-stopped run has only its test left
        log(f"resume from {last_saved}: epoch {r.epoch}, {r.batch} of {steps_per_epoch} batches done")

    def diverged(what: str, epoch: int, n_steps: int, step: int) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"{what} at epoch {epoch}, batch {n_steps} of {steps_per_epoch} (step {step}; "
            f"the loss is read every {READ_EVERY} batches): lower the learning rate (--set lr=...), set "
            f"--set grad_clip=10, or skip such steps with --set on_nonfinite=skip"
            + (f"; {describe(last_saved)} (continue it with --resume)" if ckpt else ""))

    def save(epoch: int, state, tally: EpochTally, stopped: bool = False) -> None:
        # A diverged state must never replace the last good checkpoint.
        nonlocal last_saved
        if not all_finite((state.params, state.opt_state)):
            raise diverged("non-finite parameters", epoch, tally.steps, int(state.step))
        done = tally.steps == steps_per_epoch
        last_saved = ckpt.save((epoch - 1) * steps_per_epoch + tally.steps, state, best, run=run, progress=dict(
            epoch=epoch + done, batch=0 if done else tally.steps, stopped=stopped, history=history,
            stopper=stop_state._asdict(), tally=tally._asdict(), timing=timing))

    try:
        for epoch in range(first_epoch, end_epoch + 1):
            bar.start_epoch(epoch)
            state = layout.place_state(state)  # a new lr / recalibrated statistics: back on the mesh
            tally = resumed if epoch == first_epoch and resumed else EpochTally.start(1, int(state.step))

            def check(state, n_steps: int, values, epoch=epoch, first=tally.first_step) -> float:
                value = float(values[0])
                if not math.isfinite(value) and cfg.on_nonfinite == "stop":  # no step skipped yet
                    raise diverged(f"non-finite training loss {value}", epoch, n_steps, first + n_steps)
                return value

            ep = run_epoch(state, program, feeder.blocks(epoch, tally.steps), tally=tally,
                           steps_per_epoch=steps_per_epoch, seen_shapes=seen_shapes, bar=bar, check=check,
                           checkpoint=lambda state, tally, epoch=epoch: save(epoch, state, tally),
                           checkpoint_every=cfg.checkpoint_every_steps if ckpt else 0,
                           untimed_rows=min(n_train, tally.steps * cfg.batch_size))
            state, tally = ep.state, ep.tally
            timing = timing.add(ep, n_train - ep.untimed_rows)

            b0 = time.perf_counter()
            state = state.replace(batch_stats=jax.block_until_ready(recalibrate_bn(program, state, feeder, epoch, cfg)))
            seconds = ep.seconds + time.perf_counter() - b0
            valid = evaluate(program.predict, state.params, state.batch_stats, valid_split, cfg.eval_batch_size)
            lr = get_lr(state)
            stop_state, decision = early_stopping.update(rules, stop_state, monitor_score(cfg.monitor, valid), lr)
            row = history_row(epoch, float(tally.mean_loss()[0]), valid, lr, seconds)
            if cfg.on_nonfinite == "skip":  # a skipped step leaves state.step unchanged
                row["skipped_steps"] = tally.steps - (int(state.step) - tally.first_step)
            if on_epoch is not None:
                row.update(on_epoch(epoch, state) or {})
            history.append(row)
            bar.end_epoch()
            log(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  valid auc {valid['auc']:.4f}  "
                f"logloss {valid['logloss']:.4f}  lr {lr:.1e}  {seconds:.1f}s"
                + ("  *best" if decision.improved else ""))
            if decision.improved:
                best = Best(layout.to_host(state.params), layout.to_host(state.batch_stats), epoch, valid)
            elif decision.stop:
                log(f"early stop: no validation {cfg.monitor} gain for {cfg.patience} epochs; best epoch {best.epoch if best else '-'}")
                if ckpt:
                    save(epoch, state, tally, stopped=True)
                break
            elif decision.lr != lr:
                state = set_lr(state, decision.lr)
                log(f"reduce lr to {decision.lr:.1e}")
            if ckpt:
                save(epoch, state, tally)
    finally:
        bar.close()  # also on errors: rich leaves the cursor hidden otherwise
        if orders is not None:
            orders.close()
    if best is None:
        raise NonFiniteLoss(f"no epoch of {len(history)} had a finite validation {cfg.monitor}; "
                            "lower the learning rate (--set lr=...) or set --set grad_clip=10")
    test = evaluate(program.predict, best.params, best.batch_stats, test_split, cfg.eval_batch_size)
    return fit_result(best._replace(params=layout.unpad(best.params)), history, test, timing)
