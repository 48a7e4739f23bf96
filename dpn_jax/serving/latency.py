"""``dpn-jax bench --latency``: per-request latency of scoring, in-process jit vs exported.

A request is one call with ``batch`` already-encoded rows (numpy in, numpy probabilities out:
host -> device -> host included, encoding excluded). Each (model, batch, path) cell is warmed up,
then timed over ``requests`` calls; p50/p99 are of those wall times. Without a bundle, each model
is built with its default options on a Frappe-shaped schema (10 categorical fields, 5,382
embedding rows) with freshly initialised parameters -- latency does not depend on their values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from dpn_jax.data.schema import FieldInfo, Schema
from dpn_jax.errors import ConfigError
from dpn_jax.serving.exported import ExportedModel
from dpn_jax.serving.predictor import Predictor, model_inputs, rebuild_model

FRAPPE_VOCAB = (957, 4082, 7, 7, 2, 3, 2, 9, 80, 233)  # values per field (+ pad and OOV rows)


def frappe_like_schema() -> Schema:
    fields, offset = [], 0
    for i, v in enumerate(FRAPPE_VOCAB):
        fields.append(FieldInfo(f"f{i}", "cat", column=i, offset=offset, vocab_size=v + 2))
        offset += v + 2
    return Schema(fields=tuple(fields), table_size=offset)


# An Amazon-Grocery-like behaviour schema (user, target item and category, their histories of 50)
BEHAVIOUR_VOCAB = {"user": 14_681, "item": 8_714, "cate": 1_000}
BEHAVIOUR_MAX_LEN = 50


def behaviour_like_schema() -> Schema:
    fields, offset = [], 0
    for i, (name, v) in enumerate(BEHAVIOUR_VOCAB.items()):
        fields.append(FieldInfo(name, "cat", column=i, offset=offset, vocab_size=v + 2))
        offset += v + 2
    for target in ("item", "cate"):
        t = next(f for f in fields if f.name == target)
        fields.append(FieldInfo(f"hist_{target}", "seq", offset=t.offset, vocab_size=t.vocab_size,
                                max_len=BEHAVIOUR_MAX_LEN, share_vocab=target))
    return Schema(fields=tuple(fields), table_size=offset)


def is_behaviour_model(name: str) -> bool:
    """Models that pool behaviour histories (they all have the ``attention_groups`` option)."""
    from dpn_jax.models import model_options

    return "attention_groups" in model_options(name)


def fresh_predictor(name: str, schema: Schema | None = None, seed: int = 0) -> Predictor:
    """A Predictor around freshly initialised parameters (no bundle on disk); behaviour models
    get the Amazon-like behaviour schema, the others a Frappe-shaped one."""
    schema = schema or (behaviour_like_schema() if is_behaviour_model(name) else frappe_like_schema())
    model = rebuild_model(name, {}, schema)
    example = {n: np.zeros((1, w), t) for n, t, w in model_inputs(schema)}
    variables = jax.jit(lambda k: model.init(k, example, train=False))(jax.random.PRNGKey(seed))
    return Predictor(name, model, variables, schema)


def random_batch(schema: Schema, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype, width in model_inputs(schema):
        if name == "cat":
            cols = sorted(schema.cat_fields, key=lambda f: f.column)
            out[name] = np.stack([f.offset + rng.integers(2, f.vocab_size, rows) for f in cols], 1).astype(dtype) \
                if cols else np.zeros((rows, 0), dtype)
        elif name == "num":
            out[name] = rng.standard_normal((rows, width)).astype(dtype)
        else:
            f = schema.field(name[4:])  # right-padded histories of random lengths 1..width
            ids = f.offset + rng.integers(2, f.vocab_size, (rows, width))
            keep = np.arange(width)[None] < rng.integers(1, width + 1, (rows, 1))
            out[name] = np.where(keep, ids, f.pad_id).astype(dtype)
    return out


def time_requests(call: Callable[[], np.ndarray], requests: int, warmup: int = 10) -> np.ndarray:
    for _ in range(warmup):
        call()
    times = np.empty(requests)
    for i in range(requests):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times


def bench_latency(models: Sequence[str] = ("dnn", "dpn"), batches: Sequence[int] = (1, 16, 256),
                  requests: int = 300, bundle: str | Path | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Rows ``{model, batch, path, p50_ms, p99_ms, rows_per_s}`` for paths "jit" and "exported"."""
    from jax import export

    from dpn_jax.serving.export import export_program, serialize
    from dpn_jax.serving.predictor import load

    log = log or (lambda s: None)
    if requests < 1 or not batches or min(batches) < 1:
        raise ConfigError(f"need requests >= 1 and batch sizes >= 1, got requests={requests}, batches={list(batches)}")
    predictors = [load(bundle)] if bundle is not None else [fresh_predictor(m) for m in models]
    rows = []
    for p in predictors:
        # The loader's path: serialise, deserialise, jit the call (for this backend only).
        exported = export.deserialize(bytearray(serialize(export_program(p, (jax.default_backend(),)))))
        served = ExportedModel(exported, [{"name": n, "dtype": t, "width": w} for n, t, w in p.inputs])
        for b in batches:
            batch = random_batch(p.schema, b)
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
