"""Tables 4-5 of the DPN paper in spirit: behaviour-sequence models × seeds on the Amazon builders.

    python experiments/table45.py --data amazon_instruments --seeds 2021,2022,2023,2024,2025
    python experiments/table45.py --data amazon_grocery --table 5

Table 5 (``--table 5``): the attention baselines DIN, DIEN, KFAtt and the Transformer (``bst``)
against their DPO-armed forms (``din_dpo``, ``dien_dpo``), the paper's sDPN (``bst_dpo``) and
DyJoint.  Table 4 (``--table 4``): the Transformer's encoder × decoder grid, multi-head
self-attention (``mhsa``), the homogeneous DPO (``dpo``, a dynamic convolution) or both, times a
target-attention, heterogeneous-DPO or combined decoder.

Protocol (stated in each table's header): every model with its documented defaults, Adam 1e-3,
batch 1024 (a behaviour dataset has far fewer rows than Criteo: 4096 would leave 3 steps per
epoch on amazon_instruments), early stopping with patience 2 on validation AUC - logloss and the
learning rate divided by 10 at each epoch without gain (the Table 1 protocol).  Each table goes
to ``experiments/results/table{4,5}_<data>.md`` (+ ``.json``) with mean ± std test AUC and
logloss, the best epoch, parameters and train samples/s; finished (run, seed) pairs are kept under
``experiments/results/table{4,5}_<data>/runs/`` and skipped when the command is run again.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds  # noqa: E402

PROTOCOL = ("monitor=auc-logloss", "reduce_lr_factor=0.1", "batch_size=1024")
TABLES: dict[str, list[str]] = {
    "5": ["din", "din_dpo", "dien", "dien_dpo", "kfatt", "bst", "bst_dpo", "dyjoint"],
    "4": [f"bst_dpo encoder={e} decoder={d}" for e in ("mhsa", "dpo", "mhsa+dpo")
          for d in ("attention", "dpo", "attention+dpo")],
}


def runs_for(table: str, models: str | None) -> list[str]:
    runs = TABLES[table]
    if models:
        wanted = models.split(",")
        runs = [r for r in runs if r.split()[0] in wanted or r in wanted]
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a behaviour dataset: built-in name or spec")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", default="2021,2022,2023,2024,2025")
    p.add_argument("--table", action="append", choices=sorted(TABLES), default=None)
    p.add_argument("--models", default=None, help="only these models (comma separated)")
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="protocol override for every run, e.g. --set batch_size=4096")
    p.add_argument("--max-users", type=int, default=None,
                   help="a seeded random subset of this many users of the log (results go to "
                        "table{4,5}_<data>_users<N>)")
    p.add_argument("--sequential", action="store_true", help="one run per seed, not a vmapped sweep")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables from the finished (run, seed) files")
    args = p.parse_args(argv)
    name = Path(args.data).stem
    overridden = {s.split("=", 1)[0] for s in args.sets}
    protocol = [*(s for s in PROTOCOL if s.split("=", 1)[0] not in overridden), *args.sets]
    rc = 0
    for table in args.table or ["5", "4"]:
        runs = runs_for(table, args.models)
        if not runs:
            continue
        suffix = f"_users{args.max_users}" if args.max_users else ""
        stem = Path(__file__).resolve().parent / "results" / f"table{table}_{name}{suffix}"
        forwarded = ["--data", args.data, "--seeds", args.seeds, "--out", str(stem)]
        if args.max_users:
            forwarded += ["--data-option", f"max_users={args.max_users}"]
        for s in protocol:
            forwarded += ["--protocol", s]
        if args.data_dir:
            forwarded += ["--data-dir", args.data_dir]
        if args.sequential:
            forwarded.append("--sequential")
        report = [*forwarded, "--report-only"]
        if args.report_only:
            forwarded.append("--report-only")
        for r in runs:
            forwarded += ["--run", r]
        command = table_command(args, table)
        rc = seeds.main(forwarded, command=command) or rc
        if args.models and not args.report_only:
            # The table lists every finished run of the table, not only the ones trained now.
            for r in TABLES[table]:
                report += ["--run", r]
            rc = seeds.main(report, command=command) or rc
    return rc


def table_command(args: argparse.Namespace, table: str) -> str:
    """The command that reproduces the whole table (trains what is missing, tables every run),
    written in its header whichever subset (--models) or --report-only call wrote it."""
    parts = ["python", "experiments/table45.py", "--data", args.data]
    if args.data_dir:
        parts += ["--data-dir", args.data_dir]
    if args.max_users:
        parts += ["--max-users", str(args.max_users)]
    parts += ["--seeds", args.seeds, "--table", table]
    for s in args.sets:
        parts += ["--set", s]
    if args.sequential:
        parts.append("--sequential")
    return " ".join(shlex.quote(a) for a in parts)


if __name__ == "__main__":
    sys.exit(main())
