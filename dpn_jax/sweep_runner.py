"""``run_sweep``: the function behind ``dpn-jax sweep`` — seeds × a hyper-parameter grid.

Configurations are the product of the ``--grid`` values; each is trained once per seed. Replicas
whose options differ only in data (``dpn_jax.train.sweep.SWEEPABLE`` and the model's ``dropout``)
share one compiled program; other options (rank, width, batch size, ...) split the sweep into
one program per distinct value, automatically. Finished programs are saved under
``out/groups/`` and the running one checkpoints every epoch under ``out/checkpoints/``, so an
interrupted sweep resumes where it stopped (at the epoch after its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpn_jax.atomic import write_text
from dpn_jax.data import load_dataset
from dpn_jax.data.encode import bucket_notes
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model, model_options
from dpn_jax.runner import _jsonable, versions
from dpn_jax.train.backend import check_options_for_backend
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.sweep import fit_sweep, static_key


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``2021-2025`` or ``2021,2023`` (or a mix: ``1,5-7``) -> sorted unique seeds."""
    seeds: set[int] = set()
    try:
        for part in (p.strip() for p in str(text).split(",") if p.strip()):
            if "-" in part:
                lo, hi = part.split("-", 1)
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.update(range(lo_i, hi_i + 1))
            else:
                seeds.add(int(part))
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected a range like 2021-2025 or a list like 2021,2022") from None
    if not seeds:
        raise ConfigError(f"{flag}: no seeds given")
    return sorted(seeds)


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["lr=1e-3,3e-4", "dropout=0,0.2"]`` -> ``{"lr": ["1e-3", "3e-4"], ...}`` (order kept)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid lr=1e-3,3e-4")
        key, values = (s.strip() for s in item.split("=", 1))
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"--grid {key}: no values given")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid")
        if key == "seed":
            raise ConfigError("--grid seed: use --seeds 2021-2025 for seeds")
        grid[key] = vals
    return grid


@dataclasses.dataclass
class Configuration:
    label: str  # "lr=1e-3 dropout=0.2" (grid values only; "defaults" without a grid)
    train_kw: dict[str, Any]
    model_kw: dict[str, Any]


def configuration(model: str, pairs: Sequence[str], sets: Sequence[str] = (), *,
                  flag: str = "--grid") -> Configuration:
    """One configuration: the ``key=value`` ``pairs`` over the fixed ``sets`` (a pair wins over a
    ``--set`` of the same key), typed and range-checked (errors name ``flag``)."""
    opts = model_options(model)
    fixed_train, fixed_model = split_overrides(list(sets), opts, model)
    own_train, own_model = split_overrides(list(pairs), opts, model, flag=flag)
    train_kw, model_kw = {**fixed_train, **own_train}, {**fixed_model, **own_model}
    check_options_for_backend(TrainConfig(**train_kw), model_kw)
    return Configuration(" ".join(pairs) or "defaults", train_kw, model_kw)


def configurations(model: str, grid: dict[str, list[str]], sets: Sequence[str]) -> list[Configuration]:
    """The product of the ``grid``'s values, each over the fixed ``sets``."""
    return [configuration(model, [f"{k}={v}" for k, v in zip(grid, values)], sets)
            for values in itertools.product(*grid.values())]


def _group_key(model: str, conf: Configuration, swept_dropout: bool) -> str:
    model_kw = {k: v for k, v in conf.model_kw.items() if not (swept_dropout and k == "dropout")}
    cfg = TrainConfig(**conf.train_kw)
    text = json.dumps([model, sorted(model_kw.items()), static_key(cfg)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    if len(xs) == 1:  # one seed has no spread: its value alone, not "± 0.0000"
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def run_sweep(model: str, data, *, seeds: Sequence[int], grid: dict[str, list[str]] | None = None,
              sets: Sequence[str] = (), confs: Sequence[Configuration] | None = None,
              out: str | Path | None = None, data_dir: str | None = None,
              cache_dir: str | None = None, progress: bool | None = None,
              max_replicas: int | None = None, command: str | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train every (configuration, seed) replica; returns the summary (also ``out/sweep.{md,json}``).

    ``data``: a built-in name or spec path, or an already loaded ``Dataset`` (e.g. a custom
    ``make_synthetic(...)``). The configurations are the product of ``grid`` over ``sets``, or
    ``confs``: an explicit list (from :func:`configuration`; labels unique), e.g. the trials of
    :func:`dpn_jax.tuning.run_tune`."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dataset = None if isinstance(data, (str, Path)) else data
    if dataset is not None:
        data = dataset.name
    grid = dict(grid or {})
    if confs is None:
        confs = configurations(model, grid, sets)  # validate before loading data
    else:
        if grid or sets:
            raise ConfigError("run_sweep: give either confs or grid/sets (the configurations "
                              "already hold their fixed options)")
        confs = list(confs)
        labels = [c.label for c in confs]
        if not confs or len(set(labels)) < len(labels):
            raise ConfigError(f"run_sweep: expected configurations with distinct labels, got {labels}")
    seeds = list(seeds)
    opts = model_options(model)
    dropout_values = {c.model_kw.get("dropout", opts.get("dropout")) for c in confs}
    swept_dropout = "dropout" in opts and len(dropout_values) > 1
    groups: dict[str, list[Configuration]] = {}
    for c in confs:
        groups.setdefault(_group_key(model, c, swept_dropout), []).append(c)
    log(f"sweep {model}: {len(confs)} configurations × {len(seeds)} seeds = {len(confs) * len(seeds)} "
        f"replicas in {len(groups)} program{'s' * (len(groups) > 1)}")
    out = Path(out) if out is not None else None
    if out is not None:
        (out / "groups").mkdir(parents=True, exist_ok=True)

    replicas: list[dict] = []
    for gi, (key, members) in enumerate(groups.items(), 1):
        saved = out / "groups" / f"{key}.json" if out is not None else None
        if saved is not None and saved.exists():
            rows = json.loads(saved.read_text())["replicas"]
            _check_saved_group(saved, rows, members, seeds)
            replicas += rows
            log(f"group {gi}/{len(groups)}: done before, read {saved}")
            continue
        if dataset is None:
            dataset = load_dataset(data, data_dir=data_dir, cache_dir=cache_dir)
            log(f"data  {dataset.summary()}")
            for line in bucket_notes(dataset.meta):
                log(line)
        first = members[0]
        model_kw = {k: v for k, v in first.model_kw.items() if not (swept_dropout and k == "dropout")}
        net = build_model(model, dataset.schema, **model_kw)
        cfgs, dropouts, labels = [], [], []
        for c in members:
            for s in seeds:
                cfgs.append(TrainConfig(**{**c.train_kw, "seed": s}))
                dropouts.append(c.model_kw.get("dropout", opts.get("dropout", 0.0)))
                labels.append(c.label)
        log(f"group {gi}/{len(groups)}: {len(cfgs)} replicas of {model} {model_kw or ''}")
        t0 = time.perf_counter()
        ckpt_dir = out / "checkpoints" / key if out is not None else None  # an interrupted group continues
        results = fit_sweep(net, dataset, cfgs, log=log, progress=progress, max_replicas=max_replicas,
                            dropouts=dropouts if swept_dropout else None, checkpoint_dir=ckpt_dir, resume=True)
        wall = time.perf_counter() - t0
        group_rows = []
        for label, cfg, rate, r in zip(labels, cfgs, dropouts, results):
            res = r.result
            group_rows.append(_jsonable({
                "configuration": label, "seed": cfg.seed, "status": r.status, "message": r.message,
                "test_auc": res.test["auc"] if res else float("nan"),
                "test_logloss": res.test["logloss"] if res else float("nan"),
                "valid_auc": res.valid["auc"] if res else float("nan"),
                "valid_logloss": res.valid["logloss"] if res else float("nan"),
                "best_epoch": res.best_epoch if res else 0, "epochs": res.epochs if res else 0,
                "num_params": res.num_params if res else 0, "group": key, "group_wall_seconds": wall,
                "train_samples_per_s": res.train_samples_per_s if res else float("nan"),
                "config": {"train": dataclasses.asdict(cfg), "model": {**opts, **model_kw, **(
                    {"dropout": rate} if swept_dropout else {})}},
                "history": res.history if res else [],
            }))
        replicas += group_rows
        if saved is not None:
            write_text(saved, json.dumps({"replicas": group_rows}, indent=1))
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # the group's results are kept: its checkpoints are not needed
    summary = summarise(model, data, confs, replicas, command=command)
    if out is not None:
        write_text(out / "sweep.md", summary["markdown"])
        write_text(out / "sweep.json", json.dumps({k: v for k, v in summary.items() if k != "markdown"},
                                                  indent=1))
        log(f"wrote {out}/sweep.md and sweep.json")
    return summary


def _check_saved_group(path: Path, rows: list[dict], members: list[Configuration],
                       seeds: list[int]) -> None:
    """A finished group read back must hold this sweep's replicas: an ``out`` reused for another
    grid or other seeds would otherwise report the old sweep's results as the new one's."""
    want = sorted((c.label, s) for c in members for s in seeds)
    have = sorted((r["configuration"], r["seed"]) for r in rows)
    if have != want:
        raise ConfigError(f"{path} holds another sweep's results (other configurations or seeds "
                          f"than this one's); use a fresh --out or remove {path.parent}")


def summarise(model: str, data: str, confs: list[Configuration], replicas: list[dict],
              command: str | None = None) -> dict[str, Any]:
    rows = []
    for c in confs:
        mine = [r for r in replicas if r["configuration"] == c.label]
        rows.append({
            "configuration": c.label, "seeds": [r["seed"] for r in mine],
            "test_auc": [r["test_auc"] for r in mine], "test_logloss": [r["test_logloss"] for r in mine],
            "best_epoch": [r["best_epoch"] for r in mine],
            "diverged": sum(r["status"] != "done" for r in mine),
            "wall_seconds": mine[0]["group_wall_seconds"] if mine else float("nan"),
            "group": mine[0]["group"] if mine else "",
        })
    rows.sort(key=lambda r: -statistics.mean([x for x in r["test_auc"] if x == x] or [0.0]))
    lines = [f"# sweep: {model} on {data}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Versions: {json.dumps(versions())}", "",
              "| configuration | test AUC | test logloss | best epoch | diverged | program | program wall s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['configuration']}` | {mean_std(r['test_auc'])} | {mean_std(r['test_logloss'])} | "
                     f"{', '.join(map(str, r['best_epoch']))} | {r['diverged']} | {r['group']} | "
                     f"{r['wall_seconds']:.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Replicas of one program trained "
              "together (vmapped); its wall time covers all of them, compilation included."]
    return {"model": model, "data": data, "command": command, "rows": rows, "replicas": replicas,
            "versions": versions(), "markdown": "\n".join(lines) + "\n"}


def train_seeds(model: str, dataset, seeds: Sequence[int], sets: Sequence[str] = (), *,
                data_name: str | None = None, progress: bool | None = None,
                log: Callable[[str], None] | None = None,
                checkpoint_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One configuration over ``seeds`` as one vmapped sweep; a results dict per seed with the
    keys of ``run_train``'s (``train_samples_per_s`` per replica: the sweep's total / K).
    ``checkpoint_dir``: checkpoints after every epoch, continued when the call is repeated after
    an interruption (``train_seconds`` then counts this call's wall time only)."""
    opts = model_options(model)
    train_kw, model_kw = split_overrides(list(sets), opts, model)
    check_options_for_backend(TrainConfig(**train_kw), model_kw)
    net = build_model(model, dataset.schema, **model_kw)
    cfgs = [TrainConfig(**{**train_kw, "seed": s}) for s in seeds]
    t0 = time.perf_counter()
    results = fit_sweep(net, dataset, cfgs, log=log or (lambda s: None), progress=progress,
                        checkpoint_dir=checkpoint_dir, resume=True)
    wall = time.perf_counter() - t0
    out = []
    for cfg, r in zip(cfgs, results):
        res = r.result
        if res is None:
            raise ConfigError(f"{model} seed {cfg.seed}: {r.message}")
        out.append(_jsonable({
            "model": model, "data": data_name or dataset.name, "seed": cfg.seed, "status": r.status,
            "test_auc": res.test["auc"], "test_logloss": res.test["logloss"],
            "valid_auc": res.valid["auc"], "valid_logloss": res.valid["logloss"],
            "best_epoch": res.best_epoch, "epochs": res.epochs, "train_seconds": wall,
            "train_step_seconds": res.train_seconds, "compile_seconds": res.compile_seconds,
            "train_samples_per_s": res.train_samples_per_s / len(cfgs), "sweep_replicas": len(cfgs),
            "num_params": res.num_params,
            "config": {"model": {**opts, **model_kw}, "train": dataclasses.asdict(cfg)},
            "history": res.history, "dataset": dataset.summary(), "versions": versions(),
        }))
    return out
