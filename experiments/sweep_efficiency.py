"""Sweep efficiency: K seeds as one vmapped program vs one run, same model, data and epochs.

    python experiments/sweep_efficiency.py --data frappe --model dnn --replicas 8 --epochs 3

Every run trains exactly ``--epochs`` epochs (no early stopping) so the work is K times one
run's. Measured in one process with a fresh persistent compilation cache (as the CLI uses): one
run cold (compiles), one run warm (programs from the cache, as runs 2..K of a sequential sweep
get them), then the K-replica sweep cold. K separate runs cost ``cold + (K-1) * warm``. Writes
``experiments/results/sweep_efficiency_<data>_<model>.md`` with the command, the device, and the
ratios: a sweep/one-run ratio below K means the sweep beats K separate runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import jax

from dpn_jax.data import load_dataset
from dpn_jax.models import build_model
from dpn_jax.runner import versions
from dpn_jax.train import xla_cache
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit
from dpn_jax.train.sweep import fit_sweep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="frappe")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="dnn")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    quiet = {"log": lambda s: None, "progress": False}
    cache = tempfile.TemporaryDirectory()
    xla_cache.enable(Path(cache.name))
    ds = load_dataset(args.data, data_dir=args.data_dir)
    model = build_model(args.model, ds.schema)
    cfg = TrainConfig(max_epochs=args.epochs, patience=args.epochs + 1, batch_size=args.batch_size,
                      bn_recalibrate=True)
    cfgs = [cfg.replace(seed=2021 + k) for k in range(args.replicas)]

    t0 = time.perf_counter()
    one = fit(model, ds, cfgs[0], **quiet)
    one_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = fit(model, ds, cfgs[1 % len(cfgs)], **quiet)
    warm_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = fit_sweep(model, ds, cfgs, **quiet)
    sweep_wall = time.perf_counter() - t0
    sweep_steps = many[0].result.train_seconds
    k = args.replicas
    separate = one_wall + (len(cfgs) - 1) * warm_wall
    rows = [
        ("one run, cold compile", one_wall, one.train_seconds, one.compile_seconds, one.train_samples_per_s),
        ("one run, warm compilation cache", warm_wall, warm.train_seconds, warm.compile_seconds,
         warm.train_samples_per_s),
        (f"{k} replicas, one sweep", sweep_wall, sweep_steps, many[0].result.compile_seconds,
         many[0].result.train_samples_per_s),
    ]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {jax.device_count()} device)"
    lines = [f"# Sweep efficiency: {args.model} on {args.data}, {args.epochs} epochs, batch {args.batch_size}", "",
             f"Command: `{command}`", "", f"Device: {device}", "", f"Versions: {json.dumps(versions())}", "",
             "| what | wall s (with compile) | train-step s | compile s | train samples/s (all replicas) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {w:.1f} | {s:.1f} | {c:.1f} | {r:,.0f} |" for n, w, s, c, r in rows]
    lines += ["", f"Sweep of {k} / one cold run: wall {sweep_wall / one_wall:.2f}x, train steps "
              f"{sweep_steps / one.train_seconds:.2f}x (K separate runs: {k}x in steps). "
              f"{k} separate runs (1 cold + {k - 1} warm) take {separate:.1f} s: the sweep takes "
              f"{sweep_wall / separate:.2f} of that.",
              "", "Replica 0 of the sweep and the single run use the same seed: test AUC "
              f"{many[0].result.test['auc']:.5f} vs {one.test['auc']:.5f}."]
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results"
                                           / f"sweep_efficiency_{Path(args.data).stem}_{args.model}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
