"""Train model configurations over several seeds and write a mean ± std table.

    python experiments/seeds.py --data frappe --seeds 2021,2022,2023 \
        --run "dnn" --run "dnn embedding_l2=0.1 dropout=0.3 reduce_lr_factor=0.1" \
        --out experiments/results/frappe_dnn

Each ``--run`` is a model name followed by ``key=value`` overrides. Every finished (run, seed)
is kept as ``<out>/runs/<slug>-<seed>.json``; a rerun skips those, so an interrupted sweep
resumes; the seeds training together checkpoint every epoch under ``<out>/checkpoints/`` (deleted
once their results are written), so a rerun continues a killed sweep at its last epoch. Each
epoch logs the replicas' validation AUC to stderr. The table goes to ``<out>.md`` (and ``<out>.json``) with the command that made it.

The missing seeds of one run train together as one vmapped sweep (``dpn_jax.train.sweep``:
each replica equals its sequential run up to float rounding); ``--sequential`` trains them one
by one with ``run_train`` instead.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from dpn_jax.data import load_dataset
from dpn_jax.runner import run_train, versions
from dpn_jax.sweep_runner import train_seeds
from dpn_jax.train import xla_cache


def slug(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", run.strip()).strip("_")


def mean_std(xs: list[float], spec: str = ".4f", sign: bool = False) -> str:
    """``mean ± std`` over seeds in ``spec`` (the mean signed with ``sign``); one seed's value alone."""
    fmt = ("+" if sign else "") + spec
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), spec)}"


def train_bundle(model: str, data: str, seed: int, sets: list[str], work: Path,
                 data_dir: str | None, cache_dir: str | None = None,
                 progress: bool = False) -> tuple[Path, bool]:
    """The bundle of (model, seed) in ``work``, trained unless already there (a killed training
    resumes from its checkpoints); (path, trained)."""
    out = work / f"{slug(' '.join([model, *sets]))}-{seed}"
    if (out / "bundle.json").is_file():
        print(f"{model} seed {seed}: reusing {out}", file=sys.stderr, flush=True)
        return out, False
    t0 = time.perf_counter()
    r = run_train(model, data, seed=seed, sets=sets, out=out, data_dir=data_dir, cache_dir=cache_dir,
                  progress=progress, log=lambda s: None, resume=(out / "checkpoints").is_dir())
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # per-epoch state: not part of the bundle
    print(f"{model} seed {seed}: test auc {r['test_auc']:.4f} (best epoch {r['best_epoch']}, "
          f"{time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    return out, True


def _number(text: str) -> int | float | None:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None


def number_options(p: argparse.ArgumentParser, flag: str, pairs: list[str]) -> dict:
    """``["rows=60000", "noise=0.5"]`` -> ``{"rows": 60000, "noise": 0.5}`` (ints stay ints)."""
    out = {}
    for kv in pairs:
        key, sep, value = kv.partition("=")
        number = _number(value) if sep else None
        if not key or number is None:
            p.error(f"{flag} expects KEY=NUMBER, got {kv!r}")
        out[key] = number
    return out


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--run", action="append", required=True, help='"MODEL key=value ..."')
    p.add_argument("--out", required=True, help="output stem: <out>.md, <out>.json, <out>/runs/")
    p.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                   help="a training option applied to every run (stated once in the table header)")
    p.add_argument("--sequential", action="store_true", help="one run per seed instead of a vmapped sweep")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table from the finished (run, seed) files (n per row)")
    p.add_argument("--synthetic", default="", metavar="KEY=V,...",
                   help="options of the synthetic generator, e.g. rows=60000,vocab=10,contextual=3")
    p.add_argument("--data-option", dest="data_options", action="append", default=[],
                   metavar="KEY=VALUE", help="a load_dataset option of a built-in dataset, e.g. "
                   "max_users=15000 for a behaviour log (stated in the table header)")
    args = p.parse_args(argv)
    # --synthetic (comma separated) and --data-option: one route into load_dataset's options
    synthetic = number_options(p, "--synthetic", [kv for kv in args.synthetic.split(",") if kv])
    if synthetic and args.data != "synthetic":
        p.error("--synthetic needs --data synthetic")
    data_options = {**synthetic, **number_options(p, "--data-option", args.data_options)}
    if data_options and args.sequential:
        p.error("--synthetic / --data-option need the vmapped sweep (no --sequential)")
    xla_cache.enable()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    dataset = None
    for run in args.run:
        model, *sets = run.split()
        sets = [*args.protocol, *sets]
        name = slug(" ".join([model, *sets]))
        paths = {seed: out / "runs" / f"{name}-{seed}.json" for seed in seeds}
        missing = [seed for seed in seeds if not paths[seed].exists()]
        t0 = time.perf_counter()
        fresh, ckpt = [], None
        if args.report_only:
            missing = []
        if missing and args.sequential:
            fresh = [run_train(model, args.data, seed=seed, sets=sets, data_dir=args.data_dir,
                               progress=False, log=lambda s: None) for seed in missing]
        elif missing:
            if dataset is None:
                dataset = load_dataset(args.data, data_dir=args.data_dir, **data_options)
            ckpt = out / "checkpoints" / f"{name}-{'_'.join(map(str, missing))}"
            fresh = train_seeds(model, dataset, missing, sets, data_name=args.data, progress=False,
                                log=lambda s, run=run: print(f"{run}: {s}", file=sys.stderr, flush=True),
                                checkpoint_dir=ckpt)
        for r in fresh:
            r.pop("history", None)
            paths[r["seed"]].write_text(json.dumps(r, indent=1))
            print(f"{run} seed {r['seed']}: test auc {r['test_auc']:.4f} logloss {r['test_logloss']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s for {len(missing)} seeds)", file=sys.stderr, flush=True)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)  # every seed's result is written
        done = [seed for seed in seeds if paths[seed].exists()]
        if not done:
            continue
        results = [json.loads(paths[seed].read_text()) for seed in done]
        rows.append({
            "run": run, "seeds": done,
            "test_auc": [r["test_auc"] for r in results],
            "test_logloss": [r["test_logloss"] for r in results],
            "best_epoch": [r["best_epoch"] for r in results],
            "num_params": results[0]["num_params"],
            "train_samples_per_s": [r["train_samples_per_s"] for r in results],
        })
    command = command or "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# {args.data}: test AUC / logloss over seeds {args.seeds}", "",
             *([f"Synthetic generator: `{args.synthetic}`", ""] if synthetic else []),
             *([f"Data options: `{' '.join(args.data_options)}`", ""] if args.data_options else []),
             f"Command: `{command}`", "",
             *([f"Protocol for every run: `{' '.join(args.protocol)}`", ""] if args.protocol else []),
             f"Versions: {json.dumps(versions())}", "",
             "| run | test AUC | test logloss | seeds | best epoch | params | train samples/s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -statistics.mean(r["test_auc"])):
        lines.append(f"| `{r['run']}` | {mean_std(r['test_auc'])} | {mean_std(r['test_logloss'])} | "
                     f"{len(r['seeds'])} | {', '.join(map(str, r['best_epoch']))} | {r['num_params']:,} | "
                     f"{statistics.mean(r['train_samples_per_s']):,.0f} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Samples/s: jitted train steps only "
              "(compilation excluded), on the machine named in the versions line, per replica when the "
              "seeds trained as one vmapped sweep; compare throughput only between rows of one table."]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{out}.json").write_text(json.dumps({"command": command, "protocol": args.protocol, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
