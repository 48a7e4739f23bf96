"""``run_bench``: every (model, workload, optimiser) measured in one process, with the PyTorch
peer beside it, as rows for a markdown table and a JSON record.

Tabular models run on the ``criteo`` and ``frappe`` workloads, behaviour models (those with
``attention_groups``) on ``behaviour``. Ratios compare rows of the same run only. With
``loop=True`` each (model, workload) also gets ``fit`` rows (:func:`measure.measure_fit`), one per
steps-per-dispatch and data placement, beside the step they run (the plain step, or ``K`` steps
scanned in one call): their ratio is what the loop costs over the step.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from dpn_jax.benchmark import measure
from dpn_jax.benchmark.schemas import is_behaviour_model, random_batch, schema_for
from dpn_jax.benchmark.workloads import WORKLOADS, get_workload
from dpn_jax.errors import ConfigError
from dpn_jax.models import available_models, model_options
from dpn_jax.nn.precision import dense_dot_general
from dpn_jax.serving import latency
from dpn_jax.train.config import TrainConfig

DEFAULT_MODELS = ("dnn", "dpn", "dpn_field", "dcnv2", "din", "dien")
# --optimizers names -> TrainConfig fields (lazy_adam_native: lazy_adam with the C++ row update)
OPTIMIZERS = {"adam": {"optimizer": "adam"}, "lazy_adam": {"optimizer": "lazy_adam"},
              "lazy_adam_native": {"optimizer": "lazy_adam", "lazy_adam_kernel": "native"}}
LATENCY_BATCHES = (1, 64, 4096)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (ratios against PyTorch differ between CPU makes: say which ran)."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    d = jax.devices()[0]
    return {"platform": d.platform, "device": getattr(d, "device_kind", "") or platform.processor(),
            "devices": str(jax.device_count()), "cpu_count": str(os.cpu_count()),
            "cpu": cpu_model(), "python": platform.python_version(), "host": platform.machine()}


def _versions() -> dict[str, str]:
    from dpn_jax.runner import versions

    return versions()


def run_latency(models: Sequence[str], batches: Sequence[int], requests: int,
                bundle: str | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """``dpn-jax bench --latency``: :func:`dpn_jax.serving.latency.bench_latency` of a bundle's
    model, or of each of ``models`` freshly initialised on its made-up schema
    (:func:`~dpn_jax.benchmark.schemas.schema_for`), on random rows."""
    latency.check_request_sizes(batches, requests)
    if bundle is not None:
        from dpn_jax.serving.predictor import load

        predictors = [load(bundle)]
    else:
        predictors = [latency.fresh_predictor(m, schema_for(m)) for m in models]
    return latency.bench_latency(predictors, batches, requests, random_batch, log=log)


def workloads_for(model: str, asked: Sequence[str] | None) -> list[str]:
    native = ["behaviour"] if is_behaviour_model(model) else ["criteo", "frappe"]
    return [w for w in native if asked is None or w in asked]


class Loop(NamedTuple):
    """The ``fit`` rows asked for: steps per dispatch x data placement, on a generated dataset."""

    steps_per_dispatch: tuple[int, ...]
    data_on_device: tuple[str, ...]
    data: Any = None  # the workload's dataset (made once per workload)


def step_impl(opt: str, k: int) -> str:
    """The name of the step row a loop of ``k`` steps per dispatch is compared with."""
    return f"dpn-jax {opt}" if k == 1 else f"dpn-jax {opt} scan {k}"


def fit_impl(opt: str, k: int, on_device: str) -> str:
    return f"dpn-jax {opt} fit K={k} data {'device' if on_device == 'true' else 'host'}"


def _train_round(model: str, w, dtypes: Sequence[str], optimizers: Sequence[str], *,
                 batch_size: int, steps: int, grad_clip: float, peer: str | None,
                 log: Callable[[str], None], label: str,
                 loop: Loop | None = None) -> list[tuple[str, measure.TrainMeasure]]:
    """Every training implementation of (model, workload) timed once, in turn: ours for each
    matmul dtype and optimiser, the loop rows (first optimiser), then the peer (with PyTorch's
    bf16 autocast beside our bf16)."""
    out = []
    for dtype, opt in itertools.product(dtypes, optimizers):
        cfg = TrainConfig(batch_size=batch_size, grad_clip=grad_clip, **OPTIMIZERS[opt])
        kw = {} if dtype == "float32" else {"matmul_dtype": dtype}
        out.append((f"dpn-jax {opt}" + (f" {dtype}" if kw else ""),
                    measure.measure_train(model, w, cfg, steps=steps, model_kw=kw)))
    if loop is not None:
        opt = optimizers[0]
        cfg = TrainConfig(batch_size=batch_size, grad_clip=grad_clip, **OPTIMIZERS[opt])
        for k in loop.steps_per_dispatch:
            if k > 1:
                out.append((step_impl(opt, k), measure.measure_train(model, w, cfg, steps=steps, scan=k)))
        for k, dev in itertools.product(loop.steps_per_dispatch, loop.data_on_device):
            out.append((fit_impl(opt, k, dev), measure.measure_fit(
                model, loop.data, cfg.replace(steps_per_dispatch=k, data_on_device=dev))))
    if peer:
        from dpn_jax.benchmark import peer_fuxictr

        if model in peer_fuxictr.PEER_MODELS:
            for autocast in (False, True) if len(dtypes) > 1 else (False,):
                version, m = peer_fuxictr.measure_peer_train_isolated(
                    model, w, batch_size, grad_clip=grad_clip, steps=steps, autocast=autocast)
                out.append((f"fuxictr {version}" + (" bf16 autocast" if autocast else ""), m))
    for impl, m in out:
        log(f"{model:10s} {w.name:9s} {impl:36s} {m.samples_per_s:10,.0f} samples/s  "
            f"step {m.step_ms:.1f} ms  compile {m.compile_s:.1f} s  ({label})")
    return out


def run_bench(models: Sequence[str] = DEFAULT_MODELS, *, workloads: Sequence[str] | None = None,
              optimizers: Sequence[str] = ("adam", "lazy_adam"), batch_size: int = 4096,
              steps: int = 20, peer: str | None = None, grad_clip: float = 0.0,
              latency_batches: Sequence[int] = LATENCY_BATCHES, requests: int = 50,
              replicas: int = 0, scan: int = 1, matmul_dtypes: Sequence[str] = ("float32",),
              rounds: int = 1, loop: bool = False, steps_per_dispatch: Sequence[int] = (1, 8),
              data_on_device: Sequence[str] = ("false", "true"),
              log: Callable[[str], None] | None = None) -> dict:
    """Rows of measurements (see dpn_jax.benchmark.measure); ``replicas > 1`` adds a row per
    model and workload for that many vmapped replicas of the first optimiser's step; ``scan > 1``
    adds a row running that many steps per dispatch (``measure.scan_steps``). Each optimiser is
    timed with each of ``matmul_dtypes`` on the models that have the option (others: float32).
    ``loop``: ``fit`` rows of the first optimiser for each of ``steps_per_dispatch`` and
    ``data_on_device`` (an epoch of ``steps`` batches, rounded up to a multiple of each), and the
    scanned steps they are compared with. ``rounds > 1``: the training rows of a (model,
    workload), peers and loops included, are timed that many times in turn and each keeps its
    median round (ratios robust to a machine's slow spells)."""
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: expected at least 1")
    if loop:
        bad_k = [k for k in steps_per_dispatch if k < 1]
        if bad_k or not steps_per_dispatch:
            raise ConfigError(f"--steps-per-dispatch {list(steps_per_dispatch)}: expected integers >= 1")
        bad_d = [d for d in data_on_device if d not in ("false", "true")] or not data_on_device
        if bad_d:
            raise ConfigError(f"--data-on-device {list(data_on_device)}: expected false, true or both")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    unknown = [m for m in models if m not in available_models()]
    if unknown:
        raise ConfigError(f"--models: {unknown} not in the registry; see `dpn-jax models`")
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        raise ConfigError(f"--optimizers: {bad} not known; choose from {list(OPTIMIZERS)}")
    for w in workloads or ():
        get_workload(w)
    for d in matmul_dtypes:
        dense_dot_general(d)  # an unknown dtype, or MKL missing for bfloat16_mkl, fails here
    if peer not in (None, "fuxictr"):
        raise ConfigError(f"--peer {peer!r}: the only peer is fuxictr")
    if peer:
        from dpn_jax.benchmark import peer_fuxictr

        why = peer_fuxictr.available()
        if why:
            raise ConfigError(f"--peer fuxictr: {why}")
    t_start = time.perf_counter()
    rows, pipeline, datasets = [], {}, {}
    for model in models:
        for wname in workloads_for(model, workloads):
            w = get_workload(wname)
            if wname not in pipeline:
                pipeline[wname] = measure.measure_pipeline(w, batch_size)
                log(f"pipeline {wname}: {pipeline[wname]:,.0f} samples/s")
            fit_loop = None
            if loop:
                if wname not in datasets:
                    epoch_steps = math.lcm(*steps_per_dispatch) * math.ceil(steps / math.lcm(*steps_per_dispatch))
                    datasets[wname] = measure.workload_dataset(w, epoch_steps * batch_size, batch_size)
                fit_loop = Loop(tuple(steps_per_dispatch), tuple(data_on_device), datasets[wname])
            latency = measure.measure_latency(model, w, latency_batches, requests=requests)
            dtypes = [d for d in matmul_dtypes if d == "float32" or "matmul_dtype" in model_options(model)]

            # Several rounds (a noisy machine): each row keeps its median round by samples/s.
            timed = [_train_round(model, w, dtypes, optimizers, batch_size=batch_size, steps=steps,
                                  grad_clip=grad_clip, peer=peer, log=log, label=f"round {r + 1}",
                                  loop=fit_loop)
                     for r in range(rounds)]
            peer_latency = None
            for i, (impl, _) in enumerate(timed[0]):
                m = sorted((t[i][1] for t in timed), key=lambda x: x.samples_per_s)[len(timed) // 2]
                if impl.startswith("fuxictr") and peer_latency is None:
                    from dpn_jax.benchmark import peer_fuxictr

                    peer_latency = peer_fuxictr.measure_peer_latency(model, w, latency_batches,
                                                                     requests=requests)
                lat = peer_latency if impl.startswith("fuxictr") else latency
                row = {"model": model, "workload": wname, "impl": impl, **vars(m), "latency_ms": lat}
                if fit_loop is not None and " fit K=" in impl:
                    k = int(impl.split(" fit K=")[1].split()[0])
                    row.update(steps_per_dispatch=k, step_impl=step_impl(optimizers[0], k))
                rows.append(row)
            if scan > 1:
                cfg = TrainConfig(batch_size=batch_size, grad_clip=grad_clip, **OPTIMIZERS[optimizers[0]])
                m = measure.measure_train(model, w, cfg, steps=steps, scan=scan)
                rows.append({"model": model, "workload": wname,
                             "impl": f"dpn-jax {optimizers[0]} scan {scan}", **vars(m), "latency_ms": latency})
                log(f"{model:10s} {wname:9s} scan {scan} {m.samples_per_s:10,.0f} samples/s")
            if replicas > 1:
                cfg = TrainConfig(batch_size=batch_size, grad_clip=grad_clip, **OPTIMIZERS[optimizers[0]])
                m = measure.measure_replicas(model, w, cfg, replicas, steps=max(3, steps // 2))
                rows.append({"model": model, "workload": wname,
                             "impl": f"dpn-jax {optimizers[0]} x{replicas} vmapped", **vars(m),
                             "latency_ms": latency})
                log(f"{model:10s} {wname:9s} x{replicas} vmapped {m.samples_per_s:10,.0f} samples/s  "
                    f"step {m.step_ms:.1f} ms")
    return {"rows": rows, "pipeline": pipeline, "machine": machine(), "versions": _versions(),
            "peer_versions": _peer_versions() if peer else {}, "batch_size": batch_size, "rounds": rounds,
            "steps": steps, "grad_clip": grad_clip, "seconds": time.perf_counter() - t_start, "loop": loop,
            "loop_epoch_steps": {w: len(d.train["label"]) // batch_size for w, d in datasets.items()},
            "workloads": {k: WORKLOADS[k]().schema.table_size for k in pipeline}}


def _peer_versions() -> dict[str, str]:
    import torch

    return {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}


def _ratio_columns(rows: list[dict]) -> None:
    """vs peer: samples/s over FuxiCTR's default (float32) row of the same model and workload
    (its bf16 autocast row gets one too); cost vs dnn: seconds per sample over ``dnn``'s with the
    same workload and implementation."""
    by = {(r["model"], r["workload"], r["impl"]): r for r in rows}
    for r in rows:
        peer = next((v for (m, w, i), v in by.items() if m == r["model"] and w == r["workload"]
                     and i.startswith("fuxictr") and "autocast" not in i), None)
        r["vs_peer"] = r["samples_per_s"] / peer["samples_per_s"] if peer and peer is not r else None
        base = by.get(("dnn", r["workload"], r["impl"]))
        r["cost_vs_dnn"] = base["samples_per_s"] / r["samples_per_s"] if base else None
        step = by.get((r["model"], r["workload"], r.get("step_impl")))
        r["loop_vs_step"] = r["samples_per_s"] / step["samples_per_s"] if step else None


def _times(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def format_markdown(result: dict, command: str) -> str:
    rows = result["rows"]
    _ratio_columns(rows)
    lat = [b for b in LATENCY_BATCHES if rows and b in rows[0]["latency_ms"]] or \
        (sorted(rows[0]["latency_ms"]) if rows else [])
    loop = any(r.get("step_impl") for r in rows)
    head = ("| model | workload | implementation | train samples/s | step ms (± half p10-p90) | "
            + ("loop / step | " if loop else "") + "vs FuxiCTR | cost/sample vs dnn | compile s | memory MB | params | "
            + " | ".join(f"latency b{b} p50/p99 ms" for b in lat) + " |")
    sep = "|" + "---|" * (10 + loop + len(lat))
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['impl']} | {r['samples_per_s']:,.0f} | "
            f"{r['step_ms']:.2f} ± {r['step_ms_spread']:.2f} | "
            + (f"{_times(r['loop_vs_step'])} | " if loop else "")
            + f"{_times(r['vs_peer'])} | {_times(r['cost_vs_dnn'])} | "
            f"{r['compile_s']:.1f} | {r['memory_mb']:.0f} | {r['num_params']:,} | "
            + " | ".join("{:.2f} / {:.2f}".format(*r["latency_ms"][b]) for b in lat) + " |")
    pipe = " · ".join(f"{w}: {v:,.0f} samples/s" for w, v in result["pipeline"].items())
    loop_note = ("Rows `fit K=k data host|device`: the training loop (`fit` on a generated dataset of "
                 f"{_epoch_steps(result)} batches per epoch): samples/s of its median epoch after the "
                 "first, input, dispatches, loss reads and BatchNorm re-estimation included, "
                 "evaluation not; `loop / step` divides it by the step row it runs (`scan k`: k steps "
                 "per call).") if loop else ""
    rounds = (f", median of {result['rounds']} rounds (each timing every implementation of a model "
              f"and workload in turn)") if result.get("rounds", 1) > 1 else ""
    m, v = result["machine"], result["versions"]
    return "\n".join([
        f"# Benchmark: {m['platform']} ({m['device']}, {m['devices']} device(s), {m['cpu_count']} CPUs: "
        f"{m.get('cpu', 'unknown')})",
        "", f"Command: `{command}`", "",
        f"Batch {result['batch_size']}, median of {result['steps']} timed steps after compile and "
        f"warm-up{rounds}; grad clip {result['grad_clip'] or 'off'}; total {result['seconds']:.0f} s. "
        f"Versions: {v}. Peer: {result['peer_versions'] or 'not run'}" + (
            ", trained in a process of its own" if result["peer_versions"] else "") + ".", "",
        f"Input pipeline alone (shuffled batches of a numpy split to the device): {pipe}.", "",
        *([loop_note, ""] if loop_note else []), *lines, ""])


def _epoch_steps(result: dict) -> str:
    return ", ".join(f"{v} ({w})" for w, v in result.get("loop_epoch_steps", {}).items()) or "?"
