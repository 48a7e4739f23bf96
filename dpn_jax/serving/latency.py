"""``dpn-jax bench --latency``: per-request latency of scoring, in-process jit vs exported.

A request is one call with ``batch`` already-encoded rows (numpy in, numpy probabilities out:
host -> device -> host included, encoding excluded). Each (model, batch, path) cell is warmed up,
then timed over ``requests`` calls; p50/p99 are of those wall times. The caller supplies the
predictors (a bundle's, or :func:`fresh_predictor`'s: default options, freshly initialised
parameters -- latency does not depend on their values) and the requests' rows
(``dpn-jax bench --latency`` makes them up: :func:`dpn_jax.benchmark.harness.run_latency`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.serving.exported import ExportedModel
from dpn_jax.serving.predictor import Predictor, model_inputs, rebuild_model


def fresh_predictor(name: str, schema: Schema, seed: int = 0) -> Predictor:
    """A Predictor of model ``name`` on ``schema`` around freshly initialised parameters (no
    bundle on disk)."""
    model = rebuild_model(name, {}, schema)
    example = {n: np.zeros((1, w), t) for n, t, w in model_inputs(schema)}
    variables = jax.jit(lambda k: model.init(k, example, train=False))(jax.random.PRNGKey(seed))
    return Predictor(name, model, variables, schema)


def time_requests(call: Callable[[], np.ndarray], requests: int, warmup: int = 10) -> np.ndarray:
    for _ in range(warmup):
        call()
    times = np.empty(requests)
    for i in range(requests):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times


def check_request_sizes(batches: Sequence[int], requests: int) -> None:
    if requests < 1 or not batches or min(batches) < 1:
        raise ConfigError(f"need requests >= 1 and batch sizes >= 1, got requests={requests}, batches={list(batches)}")


def bench_latency(predictors: Sequence[Predictor], batches: Sequence[int], requests: int,
                  make_batch: Callable[[Schema, int], dict[str, np.ndarray]],
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows ``{model, batch, path, p50_ms, p99_ms, rows_per_s}`` for paths "jit" and "exported";
    each request is ``make_batch(schema, rows)``: encoded rows of the predictor's schema."""
    from jax import export

    from dpn_jax.serving.export import export_program, serialize

    log = log or (lambda s: None)
    check_request_sizes(batches, requests)
    rows = []
    for p in predictors:
        # The loader's path: serialise, deserialise, jit the call (for this backend only).
        exported = export.deserialize(bytearray(serialize(export_program(p, (jax.default_backend(),)))))
        served = ExportedModel(exported, [{"name": n, "dtype": t, "width": w} for n, t, w in p.inputs])
        for b in batches:
            batch = make_batch(p.schema, b)
            paths = {"jit": lambda p=p, batch=batch, b=b: p.predict_encoded(batch, batch_size=b),
                     "exported": lambda served=served, batch=batch, b=b: served.predict_encoded(batch, batch_size=b)}
            for path, call in paths.items():
                t = time_requests(call, requests)
                p50, p99 = np.percentile(t, [50, 99]) * 1e3
                rows.append({"model": p.model_name, "batch": b, "path": path, "p50_ms": float(p50),
                             "p99_ms": float(p99), "rows_per_s": float(b / np.median(t))})
                log(f"{p.model_name:6s} batch {b:4d} {path:8s} p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = "| model | batch | path | p50 ms | p99 ms | rows/s |\n|---|---:|---|---:|---:|---:|"
    lines = [f"| {r['model']} | {r['batch']} | {r['path']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
             f"{r['rows_per_s']:,.0f} |" for r in rows]
    return "\n".join([head, *lines])


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform} ({getattr(d, 'device_kind', '')}, {jax.device_count()} device(s))"
