"""Table 2 ablations of the DPN paper, 3 seeds each, on one dataset.

    python experiments/table2.py --data frappe            # or --data synthetic
    python experiments/table2.py --data synthetic --group generator

Groups (paper Table 2 / docs/dpo_math.md, §'Weight generators', §'Feature-based DPO' and §'Field-based DPO'): ``generator`` (weight-generate instantiations in the first
DPO layer), ``rank`` (the low-rank generator's ``l``: quality against cost), ``layers`` (DPO in
the first / second / all layers of a 2-layer MLP), ``context`` (whole input, other fields, one
named field; raw or LayerNorm-ed), ``aggregation`` (field DPO: self / sum / attentive / concat,
with and without the context LayerNorm). Each group writes
``experiments/results/table2_<data>_<group>.md`` with mean ± std test AUC and logloss,
parameters and train samples/s; finished runs are kept and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds  # noqa: E402

GROUPS: dict[str, list[str]] = {
    "generator": ["dnn"] + [f"dpn generator={g}" for g in
                            ("lowrank", "hyperdense", "multihead heads=2", "mixture", "diagonal", "rank1")],
    "layers": ["dnn hidden=400,400"] + [f"dpn hidden=400,400 dpo_layers={w}" for w in ("first", "second", "all")],
    "context": ["dpn context=input", "dpn context=other_fields", "dpn context={field}",
                "dpn context_norm=true", "dpn context={field} context_norm=true"],
    "rank": ["dnn"] + [f"dpn rank={r}" for r in (1, 2, 4, 8)],
    "aggregation": [f"dpn_field aggregation={a}{norm}" for norm in ("", " context_norm=false")
                    for a in ("self", "sum", "attentive", "concat")],
}
CONTEXT_FIELD = {"frappe": "item", "synthetic": "f0"}  # synthetic plants its context in f0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--group", action="append", choices=sorted(GROUPS), default=None)
    p.add_argument("--context-field", default=None, help="field for the 'named field' context")
    args = p.parse_args(argv)
    name = Path(args.data).stem
    field = args.context_field or CONTEXT_FIELD.get(name)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    for group in args.group or list(GROUPS):
        runs = [r.format(field=field) for r in GROUPS[group] if field or "{field}" not in r]
        stem = Path(__file__).resolve().parent / "results" / f"table2_{name}_{group}"
        forwarded = ["--data", args.data, "--seeds", args.seeds, "--out", str(stem)]
        for r in runs:
            forwarded += ["--run", r]
        seeds.main(forwarded, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
