"""Train-step throughput of several models relative to the first, measured in one process.

    python experiments/step_ratio.py --data frappe --models dnn,dpn,dpn_field,dpn_field_dnn

Steps of all models are interleaved round by round, so load from other processes hits every
model alike; reports the median samples/s over rounds and the ratio to the first model. A
stopgap until the benchmark harness (issue 7) exists.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

from dpn_jax.data import batches, load_dataset
from dpn_jax.models import build_model
from dpn_jax.runner import versions
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.state import init_state, make_optimizer, make_train_step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="frappe")
    p.add_argument("--models", default="dnn,dpn,dpn_field,dpn_field_dnn")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="steps per model per round")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args()
    data = load_dataset(args.data)
    cfg = TrainConfig(batch_size=args.batch_size)
    feed = [jax.device_put(b) for b in batches(data.train, cfg.batch_size, shuffle=True, seed=0,
                                                epoch=0, drop_last=True)][: args.steps]
    runners = {}
    for name in args.models.split(","):
        model = build_model(name, data.schema)
        tx = make_optimizer(cfg)
        state = init_state(model, feed[0], cfg, tx)
        step = jax.jit(make_train_step(model, cfg, tx), donate_argnums=0)
        state, loss = step(state, feed[0])
        jax.block_until_ready(loss)
        runners[name] = [step, state]
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
    cmd = "python " + " ".join(sys.argv)
    lines = [f"# Train-step throughput on {args.data}, batch {args.batch_size}", "", f"Command: `{cmd}`",
             "", f"Versions: {versions()}", "", "| model | samples/s (median) | cost per sample vs "
             f"{first} |", "|---|---|---|"]
    for name, rs in rates.items():
        med = statistics.median(rs)
        lines.append(f"| {name} | {med:,.0f} | {base / med:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
