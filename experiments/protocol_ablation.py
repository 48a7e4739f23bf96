"""Which of FuxiCTR's protocol defaults matter: an ablation of our DNN against FuxiCTR's own DNN.

    python experiments/protocol_ablation.py --data frappe,synthetic,amazon_grocery \
        --seeds 2021-2025 --out experiments/results/protocol_ablation

Every row trains ``dnn`` (FuxiCTR's DNN architecture: embeddings 10, 400-400-400 + BatchNorm +
ReLU) over the seeds as one vmapped sweep, with every protocol option spelled out, so a row means
the same thing whatever the library's defaults are:

- ``base``: no learning-rate cut, no clip, BatchNorm statistics re-estimated before each
  evaluation, no ``min_delta``, the model's own dense init (truncated normal),
- one row per FuxiCTR default turned on alone, one with all of them (``protocol=fuxictr``), and
  one per default left out of all (which piece the others cannot replace),
- ``fuxictr-peer``: FuxiCTR 2.3.10's DNN trained by FuxiCTR's ``BaseModel.fit`` on the same
  encoded arrays (:mod:`dpn_jax.benchmark.peer_accuracy`, one child process per seed).

Each finished (dataset, row, seed) is kept under ``<out>/runs/``; a rerun skips those. Writes
``<out>.md`` and ``<out>.json`` with the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from dpn_jax.benchmark.peer_accuracy import train_isolated
from dpn_jax.data import load_dataset
from dpn_jax.runner import versions
from dpn_jax.sweep_runner import parse_seeds, train_seeds
from dpn_jax.train import xla_cache

# FuxiCTR's value of each protocol option, and ours before the change this ablation informs.
FUXICTR = {"reduce_lr_factor": "0.1", "grad_clip": "10", "bn_recalibrate": "false",
           "min_delta": "1e-6", "dense_init": "xavier_normal"}
BASE = {"reduce_lr_factor": "0", "grad_clip": "0", "bn_recalibrate": "true", "min_delta": "0",
        "dense_init": "model"}
LABELS = {"reduce_lr_factor": "LR x0.1 on plateau", "grad_clip": "clip 10",
          "bn_recalibrate": "running BN statistics", "min_delta": "min_delta 1e-6",
          "dense_init": "xavier-normal Dense init"}


def rows() -> dict[str, dict[str, str]]:
    out = {"base": dict(BASE)}
    for k in FUXICTR:
        out[f"+ {LABELS[k]}"] = {**BASE, k: FUXICTR[k]}
    out["all FuxiCTR defaults"] = dict(FUXICTR)
    # the two pieces that carry over, together: the library's defaults since this ablation
    out["clip 10 + LR x0.1 (new defaults)"] = {**BASE, "grad_clip": "10", "reduce_lr_factor": "0.1"}
    for k in FUXICTR:
        out[f"all but {LABELS[k]}"] = {**FUXICTR, k: BASE[k]}
    return out


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{xs[0]:.4f}" if len(xs) == 1 else f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def run_ours(data: str, dataset, row: str, sets: dict, seeds: list[int], runs: Path, log) -> list[dict]:
    slug = row.replace(" ", "_").replace("+", "plus").replace("/", "_").replace("(", "").replace(")", "")
    paths = {s: runs / f"{data}-{slug}-{s}.json" for s in seeds}
    missing = [s for s in seeds if not paths[s].exists()]
    if missing:
        t0 = time.perf_counter()
        fresh = train_seeds("dnn", dataset(), missing, [f"{k}={v}" for k, v in sets.items()],
                            data_name=data, progress=False, log=lambda s: log(f"{data} {row}: {s}"),
                            checkpoint_dir=runs.parent / "checkpoints" / f"{data}-{slug}")
        for r in fresh:
            r.pop("history", None)
            paths[r["seed"]].write_text(json.dumps(r, indent=1))
        log(f"{data} {row}: {len(missing)} seeds in {time.perf_counter() - t0:.0f}s")
    return [json.loads(paths[s].read_text()) for s in seeds]


def run_peer(data: str, seeds: list[int], runs: Path, data_dir, log) -> list[dict]:
    out = []
    for s in seeds:
        path = runs / f"{data}-fuxictr_peer-{s}.json"
        if not path.exists():
            t0 = time.perf_counter()
            r = train_isolated(data, s, data_dir=data_dir)
            path.write_text(json.dumps(r, indent=1))
            log(f"{data} fuxictr-peer seed {s}: test auc {r['test_auc']:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
        out.append(json.loads(path.read_text()))
    return out


def summarise(results: list[dict]) -> dict:
    return {"seeds": [r["seed"] for r in results], "test_auc": [r["test_auc"] for r in results],
            "test_logloss": [r["test_logloss"] for r in results],
            "best_epoch": [r["best_epoch"] for r in results], "epochs": [r["epochs"] for r in results]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="frappe,synthetic,amazon_grocery", help="comma-separated datasets")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="2021-2025")
    p.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--no-peer", action="store_true", help="skip FuxiCTR's own DNN")
    p.add_argument("--out", default="experiments/results/protocol_ablation")
    args = p.parse_args(argv)
    xla_cache.enable()
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    wanted = rows()
    if args.rows:
        wanted = {k: v for k, v in wanted.items() if k in args.rows.split(",")}

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    table: dict[str, dict[str, dict]] = {}
    for data in [d for d in args.data.split(",") if d]:
        cache: dict = {}

        def dataset(data=data, cache=cache):
            if "d" not in cache:
                cache["d"] = load_dataset(data, data_dir=args.data_dir)
            return cache["d"]

        table[data] = {}
        for row, sets in wanted.items():
            table[data][row] = {"sets": sets, **summarise(run_ours(data, dataset, row, sets, seeds, runs, log))}
        if not args.no_peer:
            table[data]["fuxictr-peer"] = {"sets": {}, **summarise(run_peer(data, seeds, runs, args.data_dir, log))}

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Protocol ablation: our DNN under each of FuxiCTR's defaults, and FuxiCTR's own DNN", "",
             f"Command: `{command}`", "", f"Versions: {json.dumps(versions())}", "",
             f"Seeds {args.seeds}; test AUC and logloss as mean ± sample std over seeds; Δ = mean test "
             "AUC minus the `base` row's, and minus FuxiCTR's own DNN's (`fuxictr-peer`).", ""]
    for data, by_row in table.items():
        base = statistics.mean(by_row["base"]["test_auc"]) if "base" in by_row else None
        peer = statistics.mean(by_row["fuxictr-peer"]["test_auc"]) if "fuxictr-peer" in by_row else None
        lines += [f"## {data}", "", "| row | options | test AUC | Δ base | Δ FuxiCTR | test logloss | best epochs |",
                  "|---|---|---|---|---|---|---|"]
        for row, r in by_row.items():
            m = statistics.mean(r["test_auc"])
            opts = " ".join(f"{k}={v}" for k, v in r["sets"].items()) or "FuxiCTR BaseModel.fit"
            lines.append(f"| {row} | `{opts}` | {mean_std(r['test_auc'])} | "
                         f"{'' if base is None else f'{m - base:+.4f}'} | {'' if peer is None else f'{m - peer:+.4f}'} | "
                         f"{mean_std(r['test_logloss'])} | {', '.join(map(str, r['best_epoch']))} |")
        lines.append("")
    Path(f"{out}.md").write_text("\n".join(lines))
    Path(f"{out}.json").write_text(json.dumps({"command": command, "table": table}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
