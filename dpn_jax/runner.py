"""``run_train``: the one function behind ``dpn-jax train`` (also ``dpn_jax.train(...)``)."""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
from flax import serialization

import dpn_jax
from dpn_jax.data import load_dataset
from dpn_jax.models import build_model, model_options
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.loop import fit


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def versions() -> dict[str, str]:
    import optax

    return {"dpn_jax": dpn_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "backend": jax.default_backend()}


def run_train(model: str, data: str, *, seed: int = 2021, sets: Sequence[str] = (),
              out: str | Path | None = None, data_dir: str | None = None,
              cache_dir: str | None = None, progress: bool | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load ``data``, build ``model`` with ``--set`` overrides, fit, and write the model bundle
    ``out/`` (see :mod:`dpn_jax.serving.bundle`; load it with ``dpn_jax.load(out)``).

    Returns the results dict (also written to ``out/results.json``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    opts = model_options(model)
    train_kw, model_kw = split_overrides(list(sets), opts, model)  # validate before loading data
    cfg = TrainConfig(seed=seed, **train_kw)
    t0 = time.perf_counter()
    dataset = load_dataset(data, data_dir=data_dir, cache_dir=cache_dir)
    log(f"data  {dataset.summary()}  (loaded in {time.perf_counter() - t0:.1f}s)")
    for split, counts in (dataset.meta.get("oov_counts") or {}).items():
        unseen = {k: int(v) for k, v in counts.items() if v}
        if unseen:
            log(f"note  {split}: values unseen in train mapped to OOV: {unseen}")
    net = build_model(model, dataset.schema, **model_kw)
    log(f"model {model} {model_kw or ''}  train {dataclasses.asdict(cfg)}")
    t1 = time.perf_counter()
    result = fit(net, dataset, cfg, log=log, progress=progress)
    wall = time.perf_counter() - t1
    log(f"test  auc {result.test['auc']:.4f}  logloss {result.test['logloss']:.4f}  "
        f"(best epoch {result.best_epoch}, {wall:.0f}s, {result.train_samples_per_s:,.0f} samples/s)")
    results = {
        "model": model, "data": data, "seed": seed,
        "test_auc": result.test["auc"], "test_logloss": result.test["logloss"],
        "valid_auc": result.valid["auc"], "valid_logloss": result.valid["logloss"],
        "best_epoch": result.best_epoch, "epochs": result.epochs,
        "train_seconds": wall, "train_step_seconds": result.train_seconds,
        "compile_seconds": result.compile_seconds,
        "train_samples_per_s": result.train_samples_per_s, "num_params": result.num_params,
        "config": {"model": {**opts, **model_kw}, "train": dataclasses.asdict(cfg)},
        "history": result.history, "dataset": dataset.summary(), "versions": versions(),
    }
    if "bayes_auc" in dataset.meta:
        results["bayes_test_auc"] = dataset.meta["bayes_auc"]["test"]
    results = _jsonable(results)
    if out is not None:
        from dpn_jax.serving.bundle import write_bundle

        params_bytes = serialization.to_bytes({"params": result.params, "batch_stats": result.batch_stats})
        out = write_bundle(out, model=model, model_config=results["config"]["model"],
                           train_config=results["config"]["train"], seed=seed,
                           params_bytes=params_bytes, dataset=dataset, data=str(data), results=results)
        log(f"wrote model bundle {out}/ (results.json, params.msgpack, encoders.json, ...; "
            f"score with `dpn-jax predict --model {out}`)")
    return results
