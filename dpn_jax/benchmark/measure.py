"""What the harness measures for one (model, workload): train-step throughput, compile time,
memory, input-pipeline throughput, inference latency, and the training loop itself.

Timing rules (the same for the PyTorch peer): the step is compiled and warmed up first, then
each of ``steps`` steps is timed on its own from dispatch to ``block_until_ready`` of the new
state; samples/s = batch / median step time. Batches come from a pool placed on the device
beforehand, so the step is timed apart from the input pipeline, which is timed on its own:
``dpn_jax.data.batches`` (the iterator ``fit`` uses: shuffled fancy-indexing of the numpy split)
plus ``jax.device_put``. The loop (:func:`measure_fit`) is ``fit`` itself on a generated
dataset: an epoch's wall time with its input, dispatches, loss reads and BatchNorm re-estimation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dpn_jax.benchmark.workloads import Workload
from dpn_jax.data import batches
from dpn_jax.data.schema import Dataset
from dpn_jax.models import build_model
from dpn_jax.serving.latency import time_requests
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit
from dpn_jax.train.state import (
    count_params,
    init_state,
    make_optimizer,
    make_predict,
    make_train_step,
)

POOL_BATCHES = 8  # distinct device batches cycled through the timed steps


@dataclasses.dataclass
class TrainMeasure:
    samples_per_s: float
    step_ms: float  # median
    step_ms_spread: float  # (p90 - p10) / 2 over the timed steps
    compile_s: float
    memory_mb: float  # the compiled step's arguments + outputs + temporaries (XLA's estimate)
    num_params: int


def _memory_mb(compiled) -> float:
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
        return total / 2**20
    except Exception:  # not every backend reports it
        return float("nan")


def device_pool(workload: Workload, batch_size: int, n: int = POOL_BATCHES, seed: int = 0) -> list[dict]:
    rows = workload.rows(batch_size * n, seed)
    return [jax.device_put(b) for b in batches(rows, batch_size, shuffle=False, seed=0, epoch=0)]


def time_steps(run_step, pool: Sequence[Any], steps: int, warmup: int) -> np.ndarray:
    """``run_step(batch)`` must block until its step is done; returns seconds per step."""
    for i in range(warmup):
        run_step(pool[i % len(pool)])
    out = np.empty(steps)
    for i in range(steps):
        t0 = time.perf_counter()
        run_step(pool[i % len(pool)])
        out[i] = time.perf_counter() - t0
    return out


def summarise(times: np.ndarray, batch_size: int) -> tuple[float, float, float]:
    med = float(np.median(times))
    p10, p90 = np.percentile(times, [10, 90])
    return batch_size / med, med * 1e3, float(p90 - p10) / 2 * 1e3


def scan_steps(step):
    """``(state, batches [K, ...]) -> (state, losses [K])``: K train steps in one dispatch, the
    way to amortise a per-call fixed cost that dominates small steps on accelerators."""
    return lambda state, stacked: jax.lax.scan(step, state, stacked)


def measure_train(model_name: str, workload: Workload, cfg: TrainConfig, *, steps: int = 20,
                  warmup: int = 3, model_kw: dict | None = None, scan: int = 1) -> TrainMeasure:
    """With ``scan > 1`` each timed call runs ``scan`` steps (``scan_steps``); samples/s and the
    step time are per step."""
    model = build_model(model_name, workload.schema, **(model_kw or {}))
    pool = device_pool(workload, cfg.batch_size)
    tx = make_optimizer(cfg)
    # eval_shape first: fail on a bad configuration before allocating the table.
    jax.eval_shape(lambda b: init_state(model, b, cfg, tx), pool[0])
    state = init_state(model, pool[0], cfg, tx)
    step = make_train_step(model, cfg, tx)
    if scan > 1:
        step = scan_steps(step)
        pool = [jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[pool[(i + j) % len(pool)] for j in range(scan)])
                for i in range(len(pool))]
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, pool[0]).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run(batch):
        holder[0], loss = compiled(holder[0], batch)
        jax.block_until_ready(holder[0])

    times = time_steps(run, pool, max(1, steps // scan), warmup) / scan
    sps, med, spread = summarise(times, cfg.batch_size)
    return TrainMeasure(sps, med, spread, compile_s, _memory_mb(compiled), count_params(holder[0].params))


# BatchNorm re-estimation in the proportion of a Criteo epoch (32 batches for ~8,900 steps of
# 4096 rows): with its default 32 batches it would dominate the bench's short epochs.
STEPS_PER_BN_BATCH = 256
FIT_EPOCHS = 3  # the first compiles; the others are timed


def workload_dataset(workload: Workload, train_rows: int, eval_rows: int, seed: int = 0) -> Dataset:
    """A generated dataset of ``workload``'s shape for :func:`measure_fit`."""
    return Dataset(f"bench-{workload.name}", workload.schema, train=workload.rows(train_rows, seed),
                   valid=workload.rows(eval_rows, seed + 1), test=workload.rows(eval_rows, seed + 2))


def measure_fit(model_name: str, data: Dataset, cfg: TrainConfig, *, epochs: int = FIT_EPOCHS,
                model_kw: dict | None = None) -> TrainMeasure:
    """The training loop as a run has it: ``fit`` for ``epochs`` epochs of ``data`` (no early
    stop). Per epoch after the first (which compiles), the wall time ``fit`` records for its
    train steps and BatchNorm re-estimation -- batches fed, steps dispatched, losses read;
    evaluation excluded; samples/s of the median epoch, its time per step, and half the range
    of the epochs' step times."""
    model = build_model(model_name, data.schema, **(model_kw or {}))
    n = len(data.train["label"])
    steps = -(-n // cfg.batch_size)
    cfg = cfg.replace(max_epochs=epochs, patience=epochs, reduce_lr_factor=0.0,
                      bn_recalibrate_batches=max(1, steps // STEPS_PER_BN_BATCH))
    res = fit(model, data, cfg, log=lambda s: None, progress=False)
    seconds = np.asarray([h["epoch_seconds"] for h in res.history[1:]])
    step_ms = seconds / steps * 1e3
    med = float(np.median(seconds))
    return TrainMeasure(n / med, med / steps * 1e3, float(step_ms.max() - step_ms.min()) / 2,
                        res.compile_seconds, float("nan"), res.num_params)


def measure_pipeline(workload: Workload, batch_size: int, n_batches: int = 16, seed: int = 1) -> float:
    """Samples/s of the input pipeline alone: shuffled batches of a numpy split, to the device."""
    split = workload.rows(batch_size * n_batches, seed)
    best = 0.0
    for epoch in range(3):  # best of three: the pipeline's own speed, not the machine's noise
        t0 = time.perf_counter()
        for b in batches(split, batch_size, shuffle=True, seed=seed, epoch=epoch):
            jax.block_until_ready(jax.device_put(b))
        best = max(best, batch_size * n_batches / (time.perf_counter() - t0))
    return best


def measure_latency(model_name: str, workload: Workload, batch_sizes: Sequence[int], *,
                    requests: int = 50, model_kw: dict | None = None) -> dict[int, tuple[float, float]]:
    """``{batch: (p50 ms, p99 ms)}`` of one jitted inference call, numpy in, numpy out."""
    model = build_model(model_name, workload.schema, **(model_kw or {}))
    example = workload.rows(1)
    variables = jax.jit(lambda k, b: model.init(k, b, train=False))(jax.random.PRNGKey(0), example)
    predict = jax.jit(make_predict(model))
    params, stats = variables["params"], variables.get("batch_stats", {})
    out = {}
    for b in batch_sizes:
        batch = {k: v for k, v in workload.rows(b, seed=b).items() if k != "label"}
        t = time_requests(lambda batch=batch: np.asarray(predict(params, stats, batch)),
                          requests if b < 1024 else max(10, requests // 5))
        out[b] = tuple(float(x) for x in np.percentile(t, [50, 99]) * 1e3)
    return out


def measure_replicas(model_name: str, workload: Workload, cfg: TrainConfig, replicas: int, *,
                     steps: int = 10, warmup: int = 2) -> TrainMeasure:
    """``replicas`` copies of the train step as one vmapped program (``dpn-jax sweep``'s shape:
    own parameters and own batches per replica); samples/s counts every replica's rows."""
    model = build_model(model_name, workload.schema)
    tx = make_optimizer(cfg)
    pools = [device_pool(workload, cfg.batch_size, n=2, seed=s) for s in range(replicas)]
    stacked = [jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[p[i] for p in pools]) for i in range(2)]
    states = [init_state(model, pools[0][0], cfg.replace(seed=cfg.seed + s), tx) for s in range(replicas)]
    state = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *states)
    del states
    t0 = time.perf_counter()
    compiled = jax.jit(jax.vmap(make_train_step(model, cfg, tx)), donate_argnums=0).lower(
        state, stacked[0]).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run(batch):
        holder[0], _ = compiled(holder[0], batch)
        jax.block_until_ready(holder[0])

    times = time_steps(run, stacked, steps, warmup)
    sps, med, spread = summarise(times, cfg.batch_size * replicas)
    return TrainMeasure(sps, med, spread, compile_s, _memory_mb(compiled), count_params(holder[0].params))
