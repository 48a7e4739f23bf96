"""The pieces both training drivers are built from: :func:`dpn_jax.train.loop.fit` (one run,
optionally on a device mesh) and :func:`dpn_jax.train.sweep.fit_sweep` (replicas stacked on a
leading axis of every array). Each epoch of either is:

1. :func:`run_epoch`: the train steps, fed by :meth:`Feeder.blocks` and run by the
   :class:`Program`'s ``dispatch``, ``steps_per_dispatch`` of them per call (:func:`dispatch_of`:
   a ``lax.scan`` over a block of batches); compilation timed apart, the loss read every
   :data:`READ_EVERY` steps, one dispatch behind, so the host queues the next block first;
2. :func:`recalibrate_bn`: precise BatchNorm statistics from training batches in another order;
3. :func:`evaluate` (:func:`evaluate_replicas`) on validation, :func:`monitor_score`, and the
   protocol's verdict (:func:`dpn_jax.train.early_stopping.update`): keep a :class:`Best`, stop,
   or change the learning rate;
4. :func:`history_row`; after the last epoch, :func:`fit_result` builds the :class:`FitResult`.

Batches are fed in one place (:class:`Feeder`: from the host, two blocks ahead, or gathered
on the device, :mod:`dpn_jax.train.device_data`) and steps dispatched in one place
(``dispatch`` returns one loss per step it ran, on a leading axis).
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
from dpn_jax.data import batch_order, padded_batches
from dpn_jax.data.out_of_core import prefetch
from dpn_jax.data.schema import Split, split_len
from dpn_jax.errors import ConfigError
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.train import batchnorm
from dpn_jax.train.device_data import DeviceSplit, Orders, block_plan, group
from dpn_jax.train.progress import EpochProgress
from dpn_jax.train.sharding import Layout
from dpn_jax.train.state import count_params

READ_EVERY = 4  # the loss is read (a host synchronisation) every this many steps and at an epoch's end
BN_SEED_OFFSET = 7919  # BatchNorm re-estimation draws its batches in another order than training
AHEAD = 2  # host blocks put on the device ahead of the step that trains on them


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
    ``on_epoch`` hook's entries); ``seconds``: the wall time of its train steps and BatchNorm
    re-estimation, compilation included, evaluation not."""
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


def predict_logits(predict, params, batch_stats, split: Split | DeviceSplit, batch_size: int) -> np.ndarray:
    """Logits for every row of ``split`` in order -- ``[rows]``, or ``[replicas, rows]`` when
    ``predict`` maps stacked parameters; the last batch is padded, then cut. A
    :class:`DeviceSplit` is batched on the device and its logits read once, at the end."""
    if isinstance(split, DeviceSplit):
        out = [predict(params, batch_stats, batch) for batch in split.padded_batches(batch_size)]
        if not out:
            return np.zeros((0,), np.float32)
        return np.concatenate(jax.device_get(out), axis=-1)[..., :split.n]
    out = []
    for batch in padded_batches(split, batch_size):
        logits = predict(params, batch_stats, batch)
        out.append(np.asarray(logits)[..., batch["mask"] > 0])
    return np.concatenate(out, axis=-1) if out else np.zeros((0,), np.float32)


def scores(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, logits), "logloss": logloss_from_logits(labels, logits)}


def _labels(split: Split | DeviceSplit) -> np.ndarray:
    return np.asarray((split.host if isinstance(split, DeviceSplit) else split)["label"])


def evaluate(predict, params, batch_stats, split: Split | DeviceSplit, batch_size: int) -> dict[str, float]:
    """Exact AUC and logloss on every row of ``split``."""
    return scores(_labels(split), predict_logits(predict, params, batch_stats, split, batch_size))


def evaluate_replicas(predict, params, batch_stats, split: Split | DeviceSplit,
                      batch_size: int) -> list[dict[str, float]]:
    """:func:`evaluate` for every replica of stacked parameters."""
    labels = _labels(split)
    return [scores(labels, lg) for lg in predict_logits(predict, params, batch_stats, split, batch_size)]


# ----------------------------------------------------------------------------- training


class Program(NamedTuple):
    """The jitted functions of a training run: ``fit``'s, or a sweep's over stacked replicas."""

    # (state, block [steps, ...]) -> (state, losses [steps, ...]): one loss per step run
    dispatch: Callable[[Any, dict], tuple[Any, jax.Array]]
    predict: Callable[[Any, Any, dict], jax.Array]  # (params, batch_stats, batch) -> logits
    batch_stats: Callable | None  # (params, stats_in, batch, rng) -> batch_stats; None: no BatchNorm
    fold_in: Callable = jax.random.fold_in  # of the re-estimation's keys


def dispatch_of(step: Callable) -> Callable:
    """A train step ``(state, batch, *args) -> (state, loss)`` as a dispatch of a block of
    batches ``[steps, ...]``: ``lax.scan`` of the step over them, returning every step's loss
    ``[steps, ...]``; a block of one runs the step itself (the program one step per dispatch
    always ran). Each step is the same step, so ``on_nonfinite=skip`` decides per step."""

    def dispatch(state, block, *args):
        if jax.tree.leaves(block)[0].shape[0] == 1:
            state, loss = step(state, jax.tree.map(lambda x: x[0], block), *args)
            return state, loss[None]
        return jax.lax.scan(lambda s, batch: step(s, batch, *args), state, block)

    return dispatch


@dataclasses.dataclass(frozen=True)
class Feeder:
    """The training batches of a run, for its train steps and for BatchNorm re-estimation.

    ``seeds``: one data order per seed (``fit``: one). ``stacked`` (sweeps): the orders' batches
    zipped on a leading replica axis. ``layout`` (``fit``): batches laid out on its mesh.
    ``steps``: batches per dispatch (:func:`dpn_jax.train.device_data.block_plan`). ``device``:
    the split on the device, where batches are gathered; otherwise the host gathers them and a
    thread puts each block on the device while the one before it trains."""

    split: Split
    batch_size: int
    seeds: tuple[int, ...]
    stacked: bool = False
    layout: Layout | None = None
    steps: int = 1
    device: DeviceSplit | None = None
    ahead: Orders | None = None  # draws each epoch's orders while the one before trains

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        if self.ahead is None:
            return batch_order(split_len(self.split), shuffle=True, seed=seed, epoch=epoch)
        return self.ahead.get(seed, epoch)

    def order(self, epoch: int, seed_offset: int = 0) -> np.ndarray:
        """Epoch ``epoch``'s row order (``[n]``; stacked: ``[replicas, n]``), as the host draws it."""
        orders = [self._order(s + seed_offset, epoch) for s in self.seeds]
        return np.stack(orders) if self.stacked else orders[0]

    def _draw_ahead(self, epoch: int) -> None:
        """Once epoch ``epoch``'s training order is taken: its re-estimation order and the next
        epoch's training order, in the background."""
        if self.ahead is not None:
            for s in self.seeds:
                self.ahead.ahead(s + BN_SEED_OFFSET, epoch)
                self.ahead.ahead(s, epoch + 1)

    def batches(self, epoch: int, *, seed_offset: int = 0, start_batch: int = 0,
                drop_last: bool = False) -> Iterator[dict]:
        """Epoch ``epoch``'s batches in the order of ``seed + seed_offset``, from ``start_batch`` on."""
        if self.device is not None:
            plan = block_plan(split_len(self.split), self.batch_size, 1, start_batch)
            plan = [p for p in plan if p[2] == self.batch_size or not drop_last]
            order = self.device.order(self.order(epoch, seed_offset))
            return (self.device.take(order, start, None, rows) for start, _, rows in plan)
        return self._host_batches(epoch, seed_offset, start_batch, drop_last, place=True)

    def _host_batches(self, epoch: int, seed_offset: int, start_batch: int, drop_last: bool,
                      place: bool) -> Iterator[dict]:
        streamed = hasattr(self.split, "batches")  # it draws its own order

        def args(seed: int) -> dict:
            kw = dict(shuffle=True, seed=seed, epoch=epoch, drop_last=drop_last, start_batch=start_batch)
            return kw if streamed or self.ahead is None else dict(kw, order=self._order(seed, epoch))

        if not self.stacked:
            if place:
                layout = self.layout or Layout(None, None)
                return layout.batches(self.split, self.batch_size, **args(self.seeds[0] + seed_offset))
            return _host(self.split, self.batch_size, **args(self.seeds[0] + seed_offset))
        its = [_host(self.split, self.batch_size, **args(s + seed_offset)) for s in self.seeds]
        return ({k: np.stack([p[k] for p in parts]) for k in parts[0]} for parts in zip(*its))

    def blocks(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """What each dispatch of epoch ``epoch`` gets, from step ``start_step`` on: a block of
        batches with a leading step axis (:func:`dpn_jax.train.device_data.block_plan`)."""
        plan = block_plan(split_len(self.split), self.batch_size, self.steps, start_step)
        if self.device is not None:
            order = self.device.order(self.order(epoch))
            self._draw_ahead(epoch)
            return (self.device.take(order, start, steps, rows) for start, steps, rows in plan)
        host = group(self._host_batches(epoch, 0, start_step, False, place=False), plan)
        self._draw_ahead(epoch)
        layout = self.layout or Layout(None, None)
        return prefetch(host, layout.place_block, AHEAD)

    def keys(self, epoch: int) -> jax.Array:
        """The dropout key(s) of epoch ``epoch``'s BatchNorm re-estimation."""
        if not self.stacked:
            return jax.random.PRNGKey(self.seeds[0] + epoch)
        return jnp.stack([jax.random.PRNGKey(s + epoch) for s in self.seeds])


def _host(split, batch_size: int, **kw) -> Iterator[dict]:
    """Host batches of ``split``: ``dpn_jax.data.batches``, or a streamed split's own reader."""
    if hasattr(split, "batches"):
        return split.batches(batch_size, **kw)
    return dpn_jax.data.batches(split, batch_size, **kw)


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
              checkpoint: Callable[[Any, EpochTally], None] | None = None, checkpoint_every: int = 0,
              untimed_rows: int = 0) -> EpochRun:
    """Run the train steps of ``blocks``, continuing ``tally``.

    The first dispatch of each block shape compiles: it is timed apart (``seen_shapes`` holds the
    shapes compiled so far). Every :data:`READ_EVERY` steps and at the epoch's last, the loss of
    that step is read, one value per replica -- after the next dispatch is queued, so the device
    never waits for the host between dispatches: ``check(state, step, values)`` (``state``: the
    newest, a dispatch may have run since) reacts to non-finite values (raises, or drops
    replicas) and returns the loss to show on ``bar``; the finite ones are summed into the tally.
    ``checkpoint(state, tally)`` runs, every loss read, after each dispatch that passes a multiple
    of ``checkpoint_every`` steps (at the end of the block holding it) before the epoch's last."""
    t0 = time.perf_counter()
    compile_seconds = 0.0
    pending = None  # (steps before it, losses) of the last dispatch: read after the next one

    def read(tally: EpochTally) -> EpochTally:
        done, losses = pending
        values = None
        for step in range(done + 1, done + losses.shape[0] + 1):
            if step % READ_EVERY == 0 or step == steps_per_epoch:
                if values is None:
                    values = np.asarray(losses, np.float64).reshape(losses.shape[0], -1)
                shown = check(state, step, values[step - done - 1])
                tally = tally.add(values[step - done - 1])
                bar.update(step, shown)
        return tally

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
        if pending is not None:
            tally = read(tally)
        done = tally.steps
        tally, pending = tally._replace(steps=done + losses.shape[0]), (done, losses)
        faults.point("batch")  # test-only (dpn_jax.faults): no cost unless DPN_JAX_FAULT_AFTER is set
        if (checkpoint is not None and checkpoint_every and tally.steps < steps_per_epoch
                and tally.steps // checkpoint_every > done // checkpoint_every):
            tally, pending = read(tally), None
            checkpoint(state, tally)
    if pending is not None:
        tally = read(tally)
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
