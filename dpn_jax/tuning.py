"""``run_tune``: the function behind ``dpn-jax tune`` — one tuning budget, the same for every model.

BARS' protocol for comparing models: each model gets the same search over its hyper-parameters,
each trial is trained on a few tuning seeds, the trial with the best MEAN VALIDATION AUC over
those seeds is selected (test is never looked at), and the selected configuration is retrained
on fresh seeds and reported on test (mean ± std).

The trials are configurations of :func:`dpn_jax.sweep_runner.run_sweep`, so options that are data
(lr, L2, grad_clip, dropout) share one vmapped program and the others split into one program per
value. Each stage is a sweep in its own folder of ``out`` (``search/``, or ``stage1/`` and
``stage2/`` with ``select_seeds``; then ``final/``) and resumes as a sweep does: a rerun of the
same command reads finished programs back and continues the running one from its checkpoint.
Trials are drawn from ``search_seed`` alone, so a rerun draws the same ones; ``out/tune-plan.json``
refuses a rerun with other settings.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.atomic import write_text
from dpn_jax.data import load_dataset
from dpn_jax.data.encode import bucket_notes
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.options import shown
from dpn_jax.runner import _jsonable, versions
from dpn_jax.sweep_runner import Configuration, configuration, run_sweep
from dpn_jax.tune_spaces import Dimension, parse_space, space_record
from dpn_jax.tuning_report import plot_tune, render_markdown

SEARCHES = ("random", "grid")
DEFAULT_TRIALS = 20
FINAL_SEEDS = 5


def draw_trials(dims: Sequence[Dimension], search: str = "random", trials: int | None = None,
                search_seed: int = 0) -> list[dict[str, Any]]:
    """The trials' options (typed values, in the space's order): every combination of a grid,
    or ``trials`` distinct draws seeded by ``search_seed`` alone (the same on every call)."""
    if search not in SEARCHES:
        raise ConfigError(f"--search {search}: choose one of {', '.join(SEARCHES)}")
    if search == "grid":
        ranged = [d.name for d in dims if not d.discrete]
        if ranged:
            raise ConfigError(f"--search grid: {', '.join(ranged)} {'is' if len(ranged) == 1 else 'are'} "
                              "searched over a range; a grid needs values lists (or use --search random)")
        combos = [dict(zip((d.name for d in dims), vals))
                  for vals in itertools.product(*(d.candidates for d in dims))]
        if trials is not None and trials != len(combos):
            raise ConfigError(f"--trials {trials}: a grid trains every combination of the space "
                              f"({len(combos)}); drop --trials or use --search random")
        return combos
    n = DEFAULT_TRIALS if trials is None else trials
    if n < 1:
        raise ConfigError(f"--trials {n}: expected at least 1")
    sizes = [d.size() for d in dims]
    if all(s is not None for s in sizes) and math.prod(sizes) < n:
        raise ConfigError(f"--trials {n}: the space holds only {math.prod(sizes)} distinct "
                          "configurations; use --search grid or fewer trials")
    rng = np.random.default_rng(search_seed)
    out: dict[str, dict[str, Any]] = {}
    for _ in range(1000 * n):
        trial = {d.name: d.draw(rng) for d in dims}
        out.setdefault(label_of(trial), trial)
        if len(out) == n:
            return list(out.values())
    raise ConfigError(f"--trials {n}: drew only {len(out)} distinct configurations in {1000 * n} "
                      "tries; widen the space or ask for fewer trials")


def label_of(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={shown(v)}" for k, v in options.items())


def trial_configurations(model: str, trials: Sequence[dict[str, Any]],
                         sets: Sequence[str] = ()) -> list[Configuration]:
    """One sweep configuration per trial: its options over the fixed ``--set`` ones."""
    return [configuration(model, [f"{k}={shown(v)}" for k, v in t.items()], sets, flag="trial")
            for t in trials]


def _finite(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if x == x]


def _mean(xs: Sequence[float]) -> float:
    xs = _finite(xs)
    return statistics.mean(xs) if xs else float("nan")


def _std(xs: Sequence[float]) -> float:
    xs = _finite(xs)
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else float("nan"))


def trial_rows(confs: Sequence[Configuration], options: Sequence[dict[str, Any]],
               replicas: Sequence[dict], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Per trial (in order) its replicas' results, seed by seed, and their means; ``complete``:
    it ran on every one of ``seeds`` and none diverged (only complete trials can be selected)."""
    rows = []
    for i, (conf, opts) in enumerate(zip(confs, options)):
        mine = sorted((r for r in replicas if r["configuration"] == conf.label), key=lambda r: r["seed"])
        row: dict[str, Any] = {"trial": i + 1, "configuration": conf.label, "options": opts,
                               "seeds": [r["seed"] for r in mine],
                               "diverged": sum(r["status"] != "done" for r in mine),
                               "group": mine[0]["group"] if mine else ""}
        for key in ("valid_auc", "valid_logloss", "test_auc", "test_logloss"):
            row[key] = [r.get(key, float("nan")) for r in mine]
            row[f"{key}_mean"], row[f"{key}_std"] = _mean(row[key]), _std(row[key])
        row["best_epoch"] = [r["best_epoch"] for r in mine]
        row["epochs"] = [r["epochs"] for r in mine]
        row["complete"] = (row["seeds"] == sorted(seeds) and row["diverged"] == 0
                           and all(x == x for x in row["valid_auc"]))
        rows.append(row)
    return rows


def rank_trials(rows: Sequence[dict]) -> list[int]:
    """Indices of the complete trials, best mean validation AUC first (ties: the earlier trial).
    Test results are not consulted."""
    done = [i for i, r in enumerate(rows) if r["complete"]]
    return sorted(done, key=lambda i: (-rows[i]["valid_auc_mean"], i))


def select_trial(rows: Sequence[dict]) -> int:
    """The index of the trial with the best mean validation AUC over the tuning seeds."""
    ranked = rank_trials(rows)
    if not ranked:
        raise DpnError("tune: every trial diverged on some tuning seed (or has no validation AUC); "
                       "lower the learning rates of the space or set grad_clip")
    return ranked[0]


def _check_plan(path: Path, plan: dict[str, Any]) -> None:
    """``out`` holds this tune's earlier stages, or no tune yet."""
    if path.exists():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if differ:
            raise ConfigError(f"{path.parent} holds another tune (it differs in {', '.join(differ)}); "
                              "use a fresh --out or rerun that tune's own command")


def run_tune(model: str, data, *, out: str | Path, space: dict | str | Path | None = None,
             search: str = "random", trials: int | None = None, search_seed: int = 0,
             seeds: Sequence[int] = (2021, 2022, 2023), select_seeds: int | None = None,
             select_top: int | None = None, final_seeds: Sequence[int] | None = None,
             sets: Sequence[str] = (), data_dir: str | None = None, cache_dir: str | None = None,
             progress: bool | None = None, max_replicas: int | None = None,
             command: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Search ``space`` (a YAML file, a mapping, or None: the model family's default,
    :mod:`dpn_jax.tune_spaces`) on the tuning ``seeds``, select on mean validation AUC, retrain the
    selected configuration on ``final_seeds`` (default: the 5 seeds after the tuning ones) and
    report it on test. ``select_seeds`` K: every trial on the first K tuning seeds, then the
    ``select_top`` best (default: a quarter of the trials, at least 2) on the rest. Writes
    ``out/tune.md``, ``tune.json`` and ``tune.png``; returns the report."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    seeds = sorted(set(seeds))
    if not seeds:
        raise ConfigError("--seeds: no tuning seeds given")
    final_seeds = sorted(set(final_seeds)) if final_seeds else list(range(seeds[-1] + 1, seeds[-1] + 1 + FINAL_SEEDS))
    shared = sorted(set(seeds) & set(final_seeds))
    if shared:
        raise ConfigError(f"--final-seeds shares {', '.join(map(str, shared))} with the tuning --seeds; "
                          "the selected configuration must be reported on fresh seeds")
    # Everything is checked before any data is read or anything trains.
    dims = parse_space(model, space)
    drawn = draw_trials(dims, search, trials, search_seed)
    confs = trial_configurations(model, drawn, sets)
    if select_seeds is not None and not 1 <= select_seeds < len(seeds):
        raise ConfigError(f"--select-seeds {select_seeds}: expected 1 to {len(seeds) - 1} (fewer than "
                          f"the {len(seeds)} tuning seeds)")
    if select_top is not None and select_seeds is None:
        raise ConfigError("--select-top goes with --select-seeds (the trials kept for the second stage)")
    if select_seeds is not None:
        select_top = select_top if select_top is not None else max(2, math.ceil(len(confs) / 4))
        if select_top < 1:
            raise ConfigError(f"--select-top {select_top}: expected at least 1")
        select_top = min(select_top, len(confs))
    dataset = None if isinstance(data, (str, Path)) else data
    data_name = dataset.name if dataset is not None else str(data)
    out = Path(out)
    plan = _jsonable({"model": model, "data": data_name, "space": space_record(dims), "search": search,
                      "search_seed": search_seed, "trials": [c.label for c in confs], "seeds": seeds,
                      "select_seeds": select_seeds, "select_top": select_top,
                      "final_seeds": final_seeds, "sets": list(sets)})
    _check_plan(out / "tune-plan.json", plan)
    log(f"tune {model}: {len(confs)} trials ({search}"
        f"{f', --search-seed {search_seed}' if search == 'random' else ''}) on tuning seeds "
        f"{', '.join(map(str, seeds))}; the best on fresh seeds {', '.join(map(str, final_seeds))}")
    if dataset is None:
        dataset = load_dataset(data, data_dir=data_dir, cache_dir=cache_dir)
        log(f"data  {dataset.summary()}")
        for line in bucket_notes(dataset.meta):
            log(line)
    # written once the data loaded: a mistyped --data is corrected without a fresh --out
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tune-plan.json", json.dumps(plan, indent=1))
    quiet = {"progress": progress, "max_replicas": max_replicas, "log": log}

    if select_seeds is None:
        replicas = run_sweep(model, dataset, seeds=seeds, confs=confs, out=out / "search", **quiet)["replicas"]
    else:
        first = run_sweep(model, dataset, seeds=seeds[:select_seeds], confs=confs, out=out / "stage1", **quiet)
        top = rank_trials(trial_rows(confs, drawn, first["replicas"], seeds[:select_seeds]))[:select_top]
        if not top:
            raise DpnError(f"tune: every trial diverged on the first {select_seeds} tuning seed(s); "
                           "lower the learning rates of the space or set grad_clip")
        log(f"tune: trials {', '.join(str(i + 1) for i in top)} go on to seeds "
            f"{', '.join(map(str, seeds[select_seeds:]))}")
        rest = run_sweep(model, dataset, seeds=seeds[select_seeds:], confs=[confs[i] for i in top],
                         out=out / "stage2", **quiet)
        replicas = first["replicas"] + rest["replicas"]
    rows = trial_rows(confs, drawn, replicas, seeds)
    best = select_trial(rows)
    for i, r in enumerate(rows):
        r["selected"] = i == best
    log(f"tune: selected trial {best + 1} ({confs[best].label or 'defaults'}), mean validation AUC "
        f"{rows[best]['valid_auc_mean']:.4f} over the tuning seeds")
    final = run_sweep(model, dataset, seeds=final_seeds, confs=[confs[best]], out=out / "final", **quiet)
    final_rows = sorted(final["replicas"], key=lambda r: r["seed"])
    summary = {key: {"mean": _mean([r.get(key, float("nan")) for r in final_rows]),
                     "std": _std([r.get(key, float("nan")) for r in final_rows])}
               for key in ("test_auc", "test_logloss", "valid_auc", "valid_logloss")}
    report = _jsonable({
        "model": model, "data": data_name, "command": command, "search": search,
        "search_seed": search_seed, "space": space_record(dims),
        "space_source": str(space) if isinstance(space, (str, Path)) else
        ("default" if space is None else "given"),
        "seeds": seeds, "select_seeds": select_seeds, "select_top": select_top,
        "final_seeds": final_seeds, "sets": list(sets),
        "selection": "mean validation AUC over the tuning seeds; test AUC is reported, never used to select",
        "trials": rows,
        "selected": {"trial": best + 1, "configuration": confs[best].label, "options": drawn[best],
                     "valid_auc_mean": rows[best]["valid_auc_mean"], "valid_auc_std": rows[best]["valid_auc_std"]},
        "final": {"seeds": final_seeds, **summary, "diverged": sum(r["status"] != "done" for r in final_rows),
                  "replicas": [{k: r.get(k) for k in ("seed", "status", "test_auc", "test_logloss",
                                                      "valid_auc", "valid_logloss", "best_epoch", "epochs")}
                               for r in final_rows]},
        "versions": versions(),
    })
    report["markdown"] = render_markdown(report)
    write_text(out / "tune.md", report["markdown"])
    write_text(out / "tune.json", json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1))
    written = [out / "tune.md", out / "tune.json"]
    if plot_tune(report, out / "tune.png", log=log) is not None:
        written.append(out / "tune.png")
    log(f"wrote {', '.join(map(str, written))}")
    return report
