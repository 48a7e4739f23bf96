"""Table 1: every registry model (or those named) × seeds on one dataset, one protocol.

    python experiments/table1.py --data frappe --seeds 2021,2022,2023,2024,2025

Writes ``experiments/results/table1_<data>.md`` (ranked by mean test AUC) and keeps each finished
(model, seed) in ``experiments/results/table1_<data>/runs/`` so a rerun resumes where it stopped.
Each model runs with its documented defaults under the library's training defaults (Adam 1e-3,
batch 4096, at most 100 epochs, gradient-norm clip 10, the learning rate divided by 10 at each
epoch without gain: FuxiCTR's BaseModel protocol, kept where the protocol ablation found it helps,
docs/results/protocol.md) with early stopping on validation AUC - logloss (the monitor of BARS's
configs) with patience 2. The AUC-only monitor stopped
FM on Frappe after 4 epochs at logloss 0.65 (its AUC wobbles while the pairwise term wakes up from
its 1e-4 initialisation), so AUC alone is not a fair stopping rule for slow starters.
Add ``--set key=value`` to change the protocol for every model (e.g. ``--set embedding_l2=0.1``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds  # noqa: E402

from dpn_jax.models import available_models  # noqa: E402

PROTOCOL = ("monitor=auc-logloss",)
# Behaviour-sequence models (issue 5) have their own tables; on data without histories they
# degrade to an MLP and would only blur this one.
SEQUENCE_MODELS = ("din", "din_dpo", "dien", "dien_dpo", "kfatt", "bst", "bst_dpo", "dyjoint")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="2021,2022,2023,2024,2025")
    p.add_argument("--models", default=",".join(m for m in available_models() if m not in SEQUENCE_MODELS))
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="protocol override for every model, e.g. --set monitor=auc")
    p.add_argument("--report-only", action="store_true", help="write the table from finished runs only")
    args = p.parse_args(argv)
    stem = Path(__file__).resolve().parent / "results" / f"table1_{Path(args.data).stem}"
    runs = args.models.split(",")
    forwarded = ["--data", args.data, "--seeds", args.seeds, "--out", str(stem)]
    overridden = {s.split("=", 1)[0] for s in args.sets}
    for s in [*(p for p in PROTOCOL if p.split("=", 1)[0] not in overridden), *args.sets]:
        forwarded += ["--protocol", s]
    if args.data_dir:
        forwarded += ["--data-dir", args.data_dir]
    for r in runs:
        forwarded += ["--run", r]
    if args.report_only:
        forwarded.append("--report-only")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rc = seeds.main(forwarded, command=command)
    note_missing(stem, runs, len(args.seeds.split(",")))
    return rc


def note_missing(stem: Path, models: list[str], n_seeds: int) -> None:
    """Say in the table which of its models have fewer finished seeds than asked (none silently)."""
    table = stem.with_suffix(".md")
    if not table.exists():
        return
    finished = [json.loads(f.read_text()).get("model") for f in (stem / "runs").glob("*.json")]
    done = {m: finished.count(m) for m in models}
    missing = [m for m, n in done.items() if n < n_seeds]
    if missing:
        line = ("Not in the table yet (fewer finished seeds than asked; a rerun of the command "
                f"resumes them): {', '.join(f'`{m}` ({done[m]})' for m in missing)}.")
        text = table.read_text()
        head, sep, rest = text.partition("\n| run |")
        table.write_text(f"{head}\n{line}\n\n{sep.lstrip(chr(10))}{rest}" if sep else text + line + "\n")


if __name__ == "__main__":
    sys.exit(main())
