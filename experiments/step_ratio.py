"""Train-step throughput of several model configurations relative to the first, in one process.

    python experiments/step_ratio.py --data frappe --models dnn,dpn,dpn_field,dpn_field_dnn
    python experiments/step_ratio.py --workload criteo --set optimizer=lazy_adam \\
        --run dnn --run "dpn rank=1" --run "dpn rank=2" --run "dpn rank=4" --run "dpn rank=8" \\
        --out experiments/results/dpn_cost_criteo.md

Steps of all configurations are interleaved round by round, so load from other processes hits
every one alike; reports the median samples/s over rounds and the cost per sample relative to
the first. ``--data`` takes batches of a real dataset, ``--workload`` the benchmark harness's
generated shapes (dpn_jax.benchmark.workloads: criteo, frappe, behaviour).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax

from dpn_jax.benchmark.workloads import get_workload
from dpn_jax.data import batches, load_dataset
from dpn_jax.models import build_model, model_options
from dpn_jax.runner import versions
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.state import count_params, init_state, make_optimizer, make_train_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="a built-in dataset (default frappe)")
    src.add_argument("--workload", default=None, help="a generated benchmark shape instead: criteo, frappe, behaviour")
    p.add_argument("--models", default=None, help="comma-separated registry names with default options")
    p.add_argument("--run", action="append", default=[], help='"MODEL key=value ...", repeatable')
    p.add_argument("--set", dest="sets", action="append", default=[], help="a training option for every run")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="steps per model per round")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args()
    runs = args.run + [m for m in (args.models or "").split(",") if m]
    if not runs:
        runs = ["dnn", "dpn", "dpn_field", "dpn_field_dnn"]
    if args.workload:
        w = get_workload(args.workload)
        schema, rows, source = w.schema, w.rows(args.batch_size * args.steps), f"workload {args.workload}"
    else:
        data = load_dataset(args.data or "frappe")
        schema, rows, source = data.schema, data.train, args.data or "frappe"
    train_kw, _ = split_overrides(args.sets, {}, "step_ratio")
    cfg = TrainConfig(batch_size=args.batch_size, **train_kw)
    feed = [jax.device_put(b) for b in batches(rows, cfg.batch_size, shuffle=True, seed=0,
                                                epoch=0, drop_last=True)][: args.steps]
    runners = {}
    for run in runs:
        name, *sets = run.split()
        _, model_kw = split_overrides(sets, model_options(name), name)
        model = build_model(name, schema, **model_kw)
        tx = make_optimizer(cfg)
        state = init_state(model, feed[0], cfg, tx)
        step = jax.jit(make_train_step(model, cfg, tx), donate_argnums=0)
        state, loss = step(state, feed[0])
        jax.block_until_ready(loss)
        runners[run] = [step, state, count_params(state.params)]
    rates: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(args.rounds):
        for name, r in runners.items():
            t0 = time.perf_counter()
            for b in feed:
                r[1], loss = r[0](r[1], b)
            jax.block_until_ready(r[1])
            rates[name].append(len(feed) * cfg.batch_size / (time.perf_counter() - t0))
    first = next(iter(rates))
    base = statistics.median(rates[first])
    cmd = "python " + shlex.join(sys.argv)
    lines = [f"# Train-step throughput on {source}, batch {args.batch_size}", "", f"Command: `{cmd}`",
             "", f"Versions: {versions()}; training options: {train_kw or 'defaults'}", "",
             f"| run | params | samples/s (median of {args.rounds} rounds) | cost per sample vs `{first}` |",
             "|---|---|---|---|"]
    for name, rs in rates.items():
        med = statistics.median(rs)
        lines.append(f"| `{name}` | {runners[name][2]:,} | {med:,.0f} | {base / med:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
