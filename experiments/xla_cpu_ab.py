"""A/B of dpn-jax's XLA:CPU default (YNNPACK dot fusions off, dpn_jax/xla_flags.py) against
jaxlib's own default, on the DNN train step of the Criteo workload.

    python experiments/xla_cpu_ab.py --rounds 3 --out experiments/results/xla_cpu_ab.md

Each (round, setting) is a fresh process (XLA flags are read once per process), settings
alternate within a round so machine load hits both alike; median samples/s over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from dpn_jax.benchmark.measure import measure_train
from dpn_jax.benchmark.workloads import get_workload
from dpn_jax.train.config import TrainConfig
out = {}
for opt in ("adam", "lazy_adam"):
    out[opt] = measure_train("dnn", get_workload("criteo"), TrainConfig(optimizer=opt), steps=12).samples_per_s
print(json.dumps(out))
"""

SETTINGS = {"jaxlib default (YNNPACK dots)": {"DPN_JAX_XLA_DEFAULTS": "0"},
            "dpn-jax default (Eigen dots)": {}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    got: dict[str, dict[str, list[float]]] = {s: {"adam": [], "lazy_adam": []} for s in SETTINGS}
    for r in range(args.rounds):
        for name, env in SETTINGS.items():
            res = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env},
                                 capture_output=True, text=True, check=True)
            for opt, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
                got[name][opt].append(v)
            print(f"round {r + 1} {name}: {got[name]['adam'][-1]:,.0f} / {got[name]['lazy_adam'][-1]:,.0f}",
                  file=sys.stderr, flush=True)
    base = statistics.median(got[next(iter(SETTINGS))]["adam"])
    lines = ["# XLA:CPU dot backend A/B: dnn train step, Criteo workload, batch 4096", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             f"Median samples/s over {args.rounds} rounds (each a fresh process; settings alternate).", "",
             "| setting | dense adam | lazy_adam | dense adam vs jaxlib default | runs (adam) |",
             "|---|---:|---:|---:|---|"]
    for name, d in got.items():
        a, lz = statistics.median(d["adam"]), statistics.median(d["lazy_adam"])
        lines.append(f"| {name} | {a:,.0f} | {lz:,.0f} | {a / base:.2f}x | "
                     + ", ".join(f"{x:,.0f}" for x in d["adam"]) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
