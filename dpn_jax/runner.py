"""``run_train``: the one function behind ``dpn-jax train`` (also ``dpn_jax.train_model(...)``)."""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
from flax import serialization

from dpn_jax._version import __version__
from dpn_jax.data import load_dataset
from dpn_jax.data.encode import bucket_notes
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.train.backend import check_options_for_backend
from dpn_jax.train.checkpoint import MAY_CHANGE
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.loop import fit
from dpn_jax.train.sharding import describe as describe_mesh
from dpn_jax.train.sharding import make_mesh


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

    return {"dpn_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "backend": jax.default_backend()}


def _checkpoint_dir(checkpoint_dir, out, resume: bool, log, same_bundle: bool = False) -> Path | None:
    """``checkpoint_dir``, else ``out/checkpoints``. A fresh run replaces the default one's earlier
    checkpoints (as it replaces the bundle beside them); an explicit directory is never cleared.
    ``same_bundle``: ``out`` holds this run's earlier bundle (:func:`_check_out`), said in one line."""
    bundle_note = (f"note  {out} holds this run's earlier bundle (same model, data and settings): it is "
                   "replaced when training ends")
    if checkpoint_dir is not None or out is None:
        if checkpoint_dir is None and resume:
            raise ConfigError("--resume needs --checkpoint-dir DIR or --out DIR (checkpoints in DIR/checkpoints)")
        if same_bundle:
            log(bundle_note)
        return None if checkpoint_dir is None else Path(checkpoint_dir)
    path = Path(out) / "checkpoints"
    if not resume and path.is_dir() and any(path.iterdir()):
        if not all(p.is_dir() and p.name.split(".")[0].isdigit() for p in path.iterdir()):
            raise ConfigError(f"{path} holds files that are not checkpoints; move them, or pass --checkpoint-dir")
        log(f"note  replacing the checkpoints of an earlier run in {path}"
            + (" and, when training ends, its bundle (same model, data and settings)" if same_bundle else "")
            + " (pass --resume to continue it)")
        shutil.rmtree(path)
    elif same_bundle:
        log(bundle_note)
    return path


def _short(v: Any, n: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _out_diffs(recorded: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k, "(absent)"), now.get(k, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _out_diffs(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} in the bundle, {_short(b)} now")
    return out


def _check_out(out, run: dict, *, overwrite: bool, resume: bool, log) -> bool:
    """Refuse to write the bundle over what is not this run's own earlier bundle; True when ``out``
    holds that bundle (it is replaced at the end).

    "This run" means the same model, data (name or spec path), seed and every model and training
    option as recorded in the bundle's model.json; with ``resume`` the options a resume may change
    (``train.checkpoint.MAY_CHANGE``, e.g. max_epochs) may differ. A folder holding only
    ``checkpoints/`` is an unfinished run's and is used as it is. ``overwrite`` allows anything."""
    d = Path(out)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d} is a file; the model bundle is a folder: choose another --out")
    entries = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    if not entries or entries == ["checkpoints"] or overwrite:
        if entries and overwrite:
            log(f"note  --overwrite: the bundle files in {d} are replaced when training ends")
        return False
    from dpn_jax.serving.bundle import BUNDLE_FILES, recorded_run

    recorded = recorded_run(d)
    if recorded is None:
        clash = [n for n in entries if n in BUNDLE_FILES]
        held = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(f"--out {d} exists and is not a dpn-jax model bundle (it holds {held}); choose "
                          f"another --out, or pass --overwrite to write the bundle into it"
                          + (f" (replacing its {', '.join(clash)})" if clash else ""))
    now = json.loads(json.dumps(run))  # tuples -> lists, as the bundle's JSON holds them
    if resume:
        for side in (recorded, now):
            side["train"] = {k: v for k, v in side["train"].items() if k not in MAY_CHANGE}
    diffs = _out_diffs(recorded, now)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; ... and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ConfigError(f"--out {d} holds the bundle of another run ({shown}); choose another --out, "
                          "or pass --overwrite to replace it")
    return True


def run_train(model: str, data: str, *, seed: int = 2021, sets: Sequence[str] = (),
              out: str | Path | None = None, data_dir: str | None = None,
              cache_dir: str | None = None, progress: bool | None = None,
              log: Callable[[str], None] | None = None, checkpoint_dir: str | Path | None = None,
              resume: bool = False, mesh: str | None = None, out_of_core: str | Path | None = None,
              memory_budget_mb: float = 512, overwrite: bool = False) -> dict[str, Any]:
    """Load ``data``, build ``model`` with ``--set`` overrides, fit, and write the model bundle
    ``out/`` (see :mod:`dpn_jax.serving.bundle`; load it with ``dpn_jax.load(out)``).

    An existing ``out`` must hold this same run's earlier bundle (same model, data, seed and
    options), an unfinished run's ``checkpoints/`` only, or nothing; ``overwrite`` lifts that.
    The bundle appears complete or not at all; checkpoints beside it are kept.

    Checkpoints go to ``checkpoint_dir``, by default ``out/checkpoints``; ``resume`` continues the
    newest one there (see :mod:`dpn_jax.train.checkpoint`).

    ``mesh`` (``"data=4,model=2"``) trains on a device mesh (:mod:`dpn_jax.train.sharding`);
    ``out_of_core`` streams the train split from ``.npy`` shards in that directory within
    ``memory_budget_mb`` (:mod:`dpn_jax.data.out_of_core`).

    Returns the results dict (also written to ``out/results.json``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    opts = model_options(model)
    train_kw, model_kw = split_overrides(list(sets), opts, model)  # validate before loading data
    cfg = TrainConfig(seed=seed, **train_kw)
    check_options_for_backend(cfg, model_kw)  # a CPU-only kernel on a GPU/TPU fails here
    same_bundle = False
    if out is not None:
        from dpn_jax.serving.bundle import data_id

        same_bundle = _check_out(out, {"model": model, "data": data_id(data), "seed": seed,
                                       "model_config": _jsonable({**opts, **model_kw}),
                                       "train": dataclasses.asdict(cfg)},
                                 overwrite=overwrite, resume=resume, log=log)
    checkpoint_dir = _checkpoint_dir(checkpoint_dir, out, resume, log, same_bundle)
    device_mesh = make_mesh(mesh) if mesh is not None else None  # a bad --mesh fails before loading data
    if device_mesh is not None:
        log(f"mesh  {describe_mesh(device_mesh)} over {device_mesh.size} {jax.devices()[0].platform} devices"
            + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    t0 = time.perf_counter()
    dataset = load_dataset(data, data_dir=data_dir, cache_dir=cache_dir)
    log(f"data  {dataset.summary()}  (loaded in {time.perf_counter() - t0:.1f}s)")
    for line in bucket_notes(dataset.meta):
        log(line)
    for split, counts in (dataset.meta.get("oov_counts") or {}).items():
        unseen = {k: int(v) for k, v in counts.items() if v}
        if unseen:
            log(f"note  {split}: values unseen in train mapped to OOV: {unseen}")
    if out_of_core is not None:
        from dpn_jax.data.out_of_core import shard_split

        dataset.train = shard_split(dataset.train, out_of_core, memory_budget_mb=memory_budget_mb)
        log(f"data  train streamed from {out_of_core}/ ({len(dataset.train.bounds)} shards, "
            f"memory budget {memory_budget_mb:g} MB)")
    net = build_model(model, dataset.schema, **model_kw)
    log(f"model {model} {model_kw or ''}  train {dataclasses.asdict(cfg)}")
    t1 = time.perf_counter()
    result = fit(net, dataset, cfg, log=log, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume,
                 mesh=device_mesh)
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
    if device_mesh is not None:
        results["mesh"] = describe_mesh(device_mesh)
    if out is not None and jax.process_index() == 0:  # one writer in a multi-process run
        from dpn_jax.serving.bundle import write_bundle

        params_bytes = serialization.to_bytes({"params": result.params, "batch_stats": result.batch_stats})
        out = write_bundle(out, model=model, model_config=results["config"]["model"],
                           train_config=results["config"]["train"], seed=seed,
                           params_bytes=params_bytes, dataset=dataset, data=str(data), results=results)
        log(f"wrote model bundle {out}/ (results.json, params.msgpack, encoders.json, ...; "
            f"score with `dpn-jax predict --model {out}`)")
    return results
