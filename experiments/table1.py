"""Table 1: every registry model (or those named) × seeds on one dataset, one protocol.

    python experiments/table1.py --data frappe --seeds 2021,2022,2023,2024,2025

Writes ``experiments/results/table1_<data>.md`` (ranked by mean test AUC) and keeps each finished
(model, seed) in ``experiments/results/table1_<data>/runs/`` so a rerun resumes where it stopped.
Each model runs with its documented defaults under the AFN/BARS protocol (Adam 1e-3, batch 4096,
early stopping on validation AUC with patience 2); add ``--set key=value`` to change the
protocol for every model (e.g. ``--set embedding_l2=0.1``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds  # noqa: E402

from dpn_jax.models import available_models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="2021,2022,2023,2024,2025")
    p.add_argument("--models", default=",".join(available_models()))
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args(argv)
    stem = Path(__file__).resolve().parent / "results" / f"table1_{Path(args.data).stem}"
    runs = [" ".join([m, *args.sets]) for m in args.models.split(",")]
    forwarded = ["--data", args.data, "--seeds", args.seeds, "--out", str(stem)]
    if args.data_dir:
        forwarded += ["--data-dir", args.data_dir]
    for r in runs:
        forwarded += ["--run", r]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return seeds.main(forwarded, command=command)


if __name__ == "__main__":
    sys.exit(main())
