"""The pieces both training drivers are built from: :func:`dpn_jax.train.loop.fit` (one run,
optionally on a device mesh) and :func:`dpn_jax.train.sweep.fit_sweep` (replicas stacked on a
leading axis of every array). Each epoch of either is:

1. :func:`run_epoch`: the train steps, fed by :meth:`Feeder.blocks` and run by the
   :class:`Program`'s ``dispatch``; compilation timed apart, the loss read every
   :data:`READ_EVERY` steps;
2. :func:`recalibrate_bn`: precise BatchNorm statistics from training batches in another order;
3. :func:`evaluate` (:func:`evaluate_replicas`) on validation, :func:`monitor_score`, and the
   protocol's verdict (:func:`dpn_jax.train.early_stopping.update`): keep a :class:`Best`, stop,
   or change the learning rate;
4. :func:`history_row`; after the last epoch, :func:`fit_result` builds the :class:`FitResult`.

Batches are fed in one place (:class:`Feeder`) and steps dispatched in one place (``dispatch``
returns one loss per step it ran, on a leading axis): running several steps per dispatch changes
those two and nothing else.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import dpn_jax.data
from dpn_jax import faults
from dpn_jax.data import padded_batches
from dpn_jax.data.schema import Split, split_len
from dpn_jax.errors import ConfigError
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.train import batchnorm
from dpn_jax.train.progress import EpochProgress
from dpn_jax.train.sharding import Layout
from dpn_jax.train.state import count_params

READ_EVERY = 4  # the loss is read (a host synchronisation) every this many steps and at an epoch's end
BN_SEED_OFFSET = 7919  # BatchNorm re-estimation draws its batches in another order than training


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


class Best(NamedTuple):
    """The best epoch so far: its parameters and statistics (host copies) and validation metrics."""

    params: Any
    batch_stats: Any
    epoch: int
    valid: dict[str, float]


class Timing(NamedTuple):
    train_seconds: float = 0.0  # train steps, compilation excluded
    compile_seconds: float = 0.0  # first dispatches of each batch shape
    timed_samples: int = 0  # rows trained within train_seconds (over all replicas)

    def add(self, epoch: EpochRun, timed_samples: int) -> Timing:
        return Timing(self.train_seconds + (epoch.seconds - epoch.compile_seconds),
                      self.compile_seconds + epoch.compile_seconds, self.timed_samples + timed_samples)

    @property
    def samples_per_s(self) -> float:
        return self.timed_samples / self.train_seconds if self.train_seconds > 0 else float("nan")


def fit_result(best: Best, history: list[dict], test: dict[str, float], timing: Timing) -> FitResult:
    return FitResult(
        params=best.params, batch_stats=best.batch_stats, best_epoch=best.epoch, epochs=len(history),
        history=history, valid=best.valid, test=test, train_seconds=timing.train_seconds,
        compile_seconds=timing.compile_seconds, train_samples_per_s=timing.samples_per_s,
        num_params=count_params(best.params))


def history_row(epoch: int, train_loss: float, valid: dict[str, float], lr: float, seconds: float) -> dict:
    """One epoch's row of ``FitResult.history`` (``fit`` may add ``skipped_steps`` and the
    ``on_epoch`` hook's entries)."""
    return {"epoch": epoch, "train_loss": train_loss, "valid_auc": valid["auc"],
            "valid_logloss": valid["logloss"], "lr": lr, "epoch_seconds": seconds}


def example_batch(split: Split, rows: int = 8) -> dict:
    """The first ``rows`` rows of ``split`` as host arrays: the shapes a model is initialised from."""
    n = min(split_len(split), rows)
    return {k: np.asarray(v[:n]) for k, v in split.items()}


# ----------------------------------------------------------------------------- evaluation


MONITORS = {"auc": lambda m: m["auc"], "auc-logloss": lambda m: m["auc"] - m["logloss"]}


def monitor_score(name: str, metrics: dict[str, float]) -> float:
    """The early-stopping score (higher is better) of validation ``metrics``."""
    if name not in MONITORS:
        raise ConfigError(f"monitor={name!r} is not known; choose one of {sorted(MONITORS)}")
    return MONITORS[name](metrics)


def predict_logits(predict, params, batch_stats, split: Split, batch_size: int) -> np.ndarray:
    """Logits for every row of ``split`` in order -- ``[rows]``, or ``[replicas, rows]`` when
    ``predict`` maps stacked parameters; the last batch is padded, then cut."""
    out = []
    for batch in padded_batches(split, batch_size):
        logits = predict(params, batch_stats, batch)
        out.append(np.asarray(logits)[..., batch["mask"] > 0])
    return np.concatenate(out, axis=-1) if out else np.zeros((0,), np.float32)


def scores(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, logits), "logloss": logloss_from_logits(labels, logits)}


def evaluate(predict, params, batch_stats, split: Split, batch_size: int) -> dict[str, float]:
    """Exact AUC and logloss on every row of ``split``."""
    return scores(np.asarray(split["label"]), predict_logits(predict, params, batch_stats, split, batch_size))


def evaluate_replicas(predict, params, batch_stats, split: Split, batch_size: int) -> list[dict[str, float]]:
    """:func:`evaluate` for every replica of stacked parameters."""
    labels = np.asarray(split["label"])
    return [scores(labels, lg) for lg in predict_logits(predict, params, batch_stats, split, batch_size)]


# ----------------------------------------------------------------------------- training


class Program(NamedTuple):
    """The jitted functions of a training run: ``fit``'s, or a sweep's over stacked replicas."""

    # (state, block) -> (state, losses): one loss per step run, on a leading axis (then replicas)
    dispatch: Callable[[Any, dict], tuple[Any, jax.Array]]
    predict: Callable[[Any, Any, dict], jax.Array]  # (params, batch_stats, batch) -> logits
    batch_stats: Callable | None  # (params, stats_in, batch, rng) -> batch_stats; None: no BatchNorm
    fold_in: Callable = jax.random.fold_in  # of the re-estimation's keys


def one_step(step: Callable) -> Callable:
    """A train step ``(state, batch, *args) -> (state, loss)`` as a dispatch of one step: the loss
    gets its leading step axis inside the (jitted) program, costing no extra device call."""

    def dispatch(state, batch, *args):
        state, loss = step(state, batch, *args)
        return state, loss[None]

    return dispatch


@dataclasses.dataclass(frozen=True)
class Feeder:
    """The training batches of a run, for its train steps and for BatchNorm re-estimation.

    ``seeds``: one data order per seed (``fit``: one). ``stacked`` (sweeps): the orders' batches
    zipped on a leading replica axis. ``layout`` (``fit``): batches laid out on its mesh; a
    streamed split places them in its prefetch thread."""

    split: Split
    batch_size: int
    seeds: tuple[int, ...]
    stacked: bool = False
    layout: Layout | None = None

    def batches(self, epoch: int, *, seed_offset: int = 0, start_batch: int = 0,
                drop_last: bool = False) -> Iterator[dict]:
        """Epoch ``epoch``'s batches in the order of ``seed + seed_offset``, from ``start_batch`` on."""
        kw = dict(shuffle=True, epoch=epoch, drop_last=drop_last, start_batch=start_batch)
        if not self.stacked:
            layout = self.layout or Layout(None, None)
            return layout.batches(self.split, self.batch_size, seed=self.seeds[0] + seed_offset, **kw)
        its = [dpn_jax.data.batches(self.split, self.batch_size, seed=s + seed_offset, **kw) for s in self.seeds]
        return ({k: np.stack([p[k] for p in parts]) for k in parts[0]} for parts in zip(*its))

    def blocks(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """What each dispatch of epoch ``epoch`` gets, from step ``start_step`` on: one batch."""
        return self.batches(epoch, start_batch=start_step)

    def keys(self, epoch: int) -> jax.Array:
        """The dropout key(s) of epoch ``epoch``'s BatchNorm re-estimation."""
        if not self.stacked:
            return jax.random.PRNGKey(self.seeds[0] + epoch)
        return jnp.stack([jax.random.PRNGKey(s + epoch) for s in self.seeds])


class EpochTally(NamedTuple):
    """What an epoch has counted so far; a mid-epoch checkpoint saves it (``_asdict()``)."""

    steps: int  # train steps run
    loss_sum: np.ndarray  # per replica: the sum of the finite losses read ...
    losses: np.ndarray  # ... and how many
    first_step: int = 0  # the state's step counter when the epoch began (fit: skipped steps)

    @classmethod
    def start(cls, replicas: int, first_step: int = 0) -> EpochTally:
        return cls(0, np.zeros(replicas), np.zeros(replicas, np.int64), first_step)

    @classmethod
    def restore(cls, saved: dict) -> EpochTally:
        return cls(int(saved["steps"]), np.asarray(saved["loss_sum"], np.float64),
                   np.asarray(saved["losses"], np.int64), int(saved["first_step"]))

    def add(self, values: np.ndarray) -> EpochTally:
        finite = np.isfinite(values)
        return self._replace(loss_sum=self.loss_sum + np.where(finite, values, 0.0),
                             losses=self.losses + finite)

    def mean_loss(self) -> np.ndarray:
        return self.loss_sum / np.maximum(1, self.losses)


class EpochRun(NamedTuple):
    state: Any
    tally: EpochTally
    seconds: float  # wall time of the epoch's steps, compilation included
    compile_seconds: float
    untimed_rows: int  # rows (per replica) of compiling steps, or trained before a resume


def run_epoch(state, program: Program, blocks: Iterable[dict], *, tally: EpochTally, steps_per_epoch: int,
              seen_shapes: set, bar: EpochProgress, check: Callable[[Any, int, np.ndarray], float],
              after_dispatch: Callable[[Any, EpochTally], None] | None = None,
              untimed_rows: int = 0) -> EpochRun:
    """Run the train steps of ``blocks``, continuing ``tally``.

    The first dispatch of each batch shape compiles: it is timed apart (``seen_shapes`` holds the
    shapes compiled so far). Every :data:`READ_EVERY` steps and at the epoch's last, the loss of
    that step is read, one value per replica: ``check(state, step, values)`` reacts to non-finite
    ones (raises, or drops replicas) and returns the loss to show on ``bar``; the finite ones are
    summed into the tally. ``after_dispatch(state, tally)`` runs after each dispatch (checkpoints)."""
    t0 = time.perf_counter()
    compile_seconds = 0.0
    for block in blocks:
        shape = tuple(block["label"].shape)
        if shape not in seen_shapes:  # first call of a shape compiles: time it apart
            jax.block_until_ready(state)
            c0 = time.perf_counter()
            state, losses = program.dispatch(state, block)
            jax.block_until_ready(losses)
            compile_seconds += time.perf_counter() - c0
            untimed_rows += shape[-1] * losses.shape[0]
            seen_shapes.add(shape)
            bar.restart_clock(tally.steps + losses.shape[0])
        else:
            state, losses = program.dispatch(state, block)
        done, tally = tally.steps, tally._replace(steps=tally.steps + losses.shape[0])
        read = None
        for step in range(done + 1, tally.steps + 1):
            if step % READ_EVERY == 0 or step == steps_per_epoch:
                if read is None:
                    read = np.asarray(losses, np.float64).reshape(losses.shape[0], -1)
                values = read[step - done - 1]
                shown = check(state, step, values)
                tally = tally.add(values)
                bar.update(step, shown)
        faults.point("batch")  # test-only (dpn_jax.faults): no cost unless DPN_JAX_FAULT_AFTER is set
        if after_dispatch is not None:
            after_dispatch(state, tally)
    jax.block_until_ready(state)
    return EpochRun(state, tally, time.perf_counter() - t0, compile_seconds, untimed_rows)


def recalibrate_bn(program: Program, state, feeder: Feeder, epoch: int, cfg) -> Any:
    """The state's BatchNorm statistics re-estimated (:mod:`dpn_jax.train.batchnorm`) from up to
    ``cfg.bn_recalibrate_batches`` training batches, drawn in another order than training's; its
    own statistics when the model has none or ``cfg.bn_recalibrate`` is off."""
    if program.batch_stats is None or not cfg.bn_recalibrate:
        return state.batch_stats
    calib = feeder.batches(epoch, seed_offset=BN_SEED_OFFSET,
                           drop_last=split_len(feeder.split) >= feeder.batch_size)
    return batchnorm.recalibrate(program.batch_stats, state.params, state.batch_stats,
                                 itertools.islice(calib, cfg.bn_recalibrate_batches), feeder.keys(epoch),
                                 fold_in=program.fold_in)
