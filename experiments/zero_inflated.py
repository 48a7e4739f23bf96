"""Zero-inflated numeric columns, bucketised: test AUC of ``lr`` and ``dnn`` over seeds.

    python experiments/zero_inflated.py --label after

generates a CSV dataset (three columns that are 0 in 92% of rows and log-uniform over 100..99999
in the rest, one column with a mass point at 500 in the middle of its range, two categorical
columns; the label depends on all of them), writes it with a YAML spec (``buckets: 10`` on every
numeric column) into ``--work``, trains each model over the seeds with the sweep machinery
(``dpn_jax.sweep_runner.run_sweep``: the seeds of a model train together, vmapped), and records
mean ± std test AUC under ``--label`` in ``<out>.json``, then rewrites ``<out>.md`` from every
label recorded there. The dpn-jax that runs is whatever ``import dpn_jax`` finds, so the same
script measures an older encoder with ``PYTHONPATH=<a checkout of it>``; each label keeps its
command and that checkout's commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import dpn_jax
from dpn_jax.data import load_dataset
from dpn_jax.sweep_runner import parse_seeds, run_sweep

ZERO_INFLATED = ("clicks", "spend", "views")
SPEC = """\
name: zero_inflated
format: csv
train: train.csv
label: y
split: {{valid: 0.1, test: 0.1, seed: 7}}
fields:
{fields}
"""


def make_data(rows: int, seed: int) -> dict[str, np.ndarray]:
    """The columns and a label that depends on the size of the non-zero values, on the mass
    point and on the position of the mid-range column, and on the categories."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    logit = np.full(rows, -1.2)
    for name in ZERO_INFLATED:
        rest = np.exp(rng.uniform(np.log(100), np.log(99999), rows)).round()
        x = np.where(rng.random(rows) < 0.92, 0.0, rest)
        size = (np.log10(np.maximum(x, 1)) - 2) / 3  # 0 at 100, 1 at 99999
        logit += np.where(x > 0, 3.0 * size - 0.5, 0.0)  # small values lower the odds, large raise
        cols[name] = x
    mid = np.where(rng.random(rows) < 0.3, 500.0, rng.uniform(0, 1000, rows).round(1))
    logit += np.where(mid == 500.0, 0.8, 1.2 * (mid / 1000 - 0.5))
    cols["mid"] = mid
    for name, k in (("site", 30), ("device", 4)):
        effect = rng.normal(0, 0.5, k)
        v = rng.integers(0, k, rows)
        logit += effect[v]
        cols[name] = np.array([f"{name}{i}" for i in v])
    cols["y"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return cols


def write_dataset(work: Path, rows: int, seed: int) -> Path:
    cols = make_data(rows, seed)
    work.mkdir(parents=True, exist_ok=True)
    names = list(cols)
    with open(work / "train.csv", "w") as fh:
        fh.write(",".join(names) + "\n")
        for row in zip(*(cols[n].tolist() for n in names), strict=True):
            fh.write(",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row) + "\n")
    fields = [f"  - {{name: {n}, type: numeric, buckets: 10}}" for n in (*ZERO_INFLATED, "mid")]
    fields += [f"  - {{name: {n}, type: categorical}}" for n in ("site", "device")]
    spec = work / "spec.yaml"
    spec.write_text(SPEC.format(fields="\n".join(fields)))
    return spec


def commit_of(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def render(doc: dict) -> str:
    labels = list(doc["runs"])
    models = list(dict.fromkeys(m for r in doc["runs"].values() for m in r["models"]))
    lines = ["# Zero-inflated numeric columns, bucketised (`buckets: 10`)", "",
             "Generated data (`experiments/zero_inflated.py`): three columns 0 in 92% of rows and "
             "log-uniform over 100..99999 in the rest, one column with 30% of its rows at 500 "
             "(uniform 0..1000 otherwise), two categorical columns; the label depends on all of "
             "them. Test AUC, mean ± sample std over seeds (the seeds of a model train together, "
             "vmapped).", "",
             "| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for m in models:
        cells = [mean_std(doc["runs"][lab]["models"][m]["test_auc"]) if m in doc["runs"][lab]["models"]
                 else "-" for lab in labels]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Buckets fitted per numeric field (train split):", "",
              "| field | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    fields = list(dict.fromkeys(f for r in doc["runs"].values() for f in r["buckets"]))
    for f in fields:
        lines.append(f"| {f} | " + " | ".join(str(doc["runs"][lab]["buckets"].get(f, "-"))
                                              for lab in labels) + " |")
    for lab in labels:
        r = doc["runs"][lab]
        lines += ["", f"**{lab}** (dpn-jax at `{r['dpn_jax']}`, commit {r['commit']}; "
                  f"{r['rows']:,} rows, seeds {r['seeds']}, `{' '.join(r['sets'])}`, "
                  f"{r['wall_seconds']:.0f} s):", "", f"    {r['command']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="name of this measurement, e.g. before / after")
    p.add_argument("--rows", type=int, default=80_000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", default="2021-2025")
    p.add_argument("--models", default="lr,dnn")
    p.add_argument("--set", dest="sets", action="append", default=None, metavar="KEY=VALUE",
                   help="training options (default: max_epochs=10 batch_size=512)")
    p.add_argument("--work", type=Path, default=None, help="data, cache and sweep outputs (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/zero_inflated"))
    args = p.parse_args(argv)
    sets = args.sets or ["max_epochs=10", "batch_size=512"]
    seeds = parse_seeds(args.seeds)
    pythonpath = os.environ.get("PYTHONPATH")
    command = (f"PYTHONPATH={pythonpath} " if pythonpath else "") + "python " + shlex.join(
        [os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])
    work = args.work or Path(tempfile.mkdtemp(prefix="zero_inflated-"))
    spec = write_dataset(work, args.rows, args.data_seed)
    cache_dir = work / f"cache-{args.label}"
    ds = load_dataset(spec, cache_dir=cache_dir)
    buckets = {k: max(len(v) - 1, 1) for k, v in ds.meta["bucket_edges"].items()}
    print(f"{args.label}: buckets per field {buckets}", file=sys.stderr)
    t0 = time.perf_counter()
    models = {}
    for model in args.models.split(","):
        summary = run_sweep(model, str(spec), seeds=seeds, sets=sets, out=work / f"sweep-{args.label}-{model}",
                            cache_dir=str(cache_dir), progress=False, command=command)
        aucs = summary["rows"][0]["test_auc"]
        models[model] = {"test_auc": aucs, "mean": statistics.mean(aucs),
                         "std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0}
        print(f"{args.label}: {model} test AUC {mean_std(aucs)}", file=sys.stderr)
    root = Path(dpn_jax.__file__).resolve().parent.parent
    out_json = args.out.with_suffix(".json")
    doc = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}}
    doc["runs"][args.label] = {
        "command": command, "dpn_jax": str(root), "commit": commit_of(root), "rows": args.rows,
        "data_seed": args.data_seed, "seeds": seeds, "sets": sets, "buckets": buckets,
        "models": models, "wall_seconds": time.perf_counter() - t0,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(doc))
    print(f"wrote {out_json} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
