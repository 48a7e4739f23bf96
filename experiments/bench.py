"""The benchmark harness: training throughput, input pipeline, compile time, memory and latency
of the default models, beside FuxiCTR's PyTorch layers (``--peer fuxictr``), in one run.

    python experiments/bench.py --peer fuxictr --out experiments/results/bench_cpu

Same as ``dpn-jax bench``; see dpn_jax/benchmark for what is timed and how.
"""

from __future__ import annotations

import sys

from dpn_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
