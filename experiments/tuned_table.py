"""Models under equal tuning budgets: the tuned table and seed-paired verdicts.

    python experiments/tuned_table.py \
        --tune experiments/results/tune_frappe_dnn --tune experiments/results/tune_frappe_dpn \
        --untuned experiments/results/table1_frappe.json \
        --pair dpn:dnn --out experiments/results/tuned_table1_frappe

Each ``--tune`` is a folder written by ``dpn-jax tune`` (its ``tune.json``). All tunes must share
their final seeds, so the selected configurations' test AUCs pair by seed. ``--untuned`` (a
``table1.py`` or ``table45.py`` JSON) adds each model's untuned mean for reference. Each ``--pair
A:B`` gives the seed-paired test-AUC difference of the two tuned models with a 95% percentile-
bootstrap interval (:mod:`dpn_jax.analysis.paired`) and a verdict; ``B`` may be ``best-baseline``:
the tuned model with the highest mean test AUC among those not named in ``--dpn`` (default: every
model whose name starts with ``dpn``).
Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import mean_std  # noqa: E402

from dpn_jax.analysis.paired import paired_difference  # noqa: E402
from dpn_jax.atomic import write_text  # noqa: E402
from dpn_jax.runner import versions  # noqa: E402


def read_tune(folder: Path) -> dict:
    path = folder / "tune.json"
    if not path.exists():
        raise SystemExit(f"--tune {folder}: no tune.json (has `dpn-jax tune --out {folder}` finished?)")
    r = json.loads(path.read_text())
    final = {int(x["seed"]): float(x["test_auc"]) for x in r["final"]["replicas"]
             if x["test_auc"] == x["test_auc"]}
    trials = r["trials"]
    return {"folder": str(folder), "model": r["model"], "data": r["data"],
            "configuration": r["selected"]["configuration"] or "defaults",
            "valid_auc": r["selected"]["valid_auc_mean"], "trials": len(trials),
            "replica_runs": sum(len(t["seeds"]) for t in trials),
            "final": final, "test_auc_mean": statistics.mean(final.values()),
            "command": r.get("command", "")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tune", action="append", required=True, type=Path)
    p.add_argument("--untuned", type=Path, help="a table1.py or table45.py JSON (its rows' test AUCs)")
    p.add_argument("--pair", action="append", default=[], help="A:B, B may be best-baseline")
    p.add_argument("--dpn", default="", help="comma-separated DPN models (default: dpn*)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    tunes = {t["model"]: t for t in map(read_tune, args.tune)}
    seed_sets = {tuple(sorted(t["final"])) for t in tunes.values()}
    if len(seed_sets) != 1:
        raise SystemExit(f"the tunes' final seeds differ ({sorted(seed_sets)}): nothing pairs")
    untuned = {}
    if args.untuned:
        for row in json.loads(args.untuned.read_text())["rows"]:
            untuned[row["run"]] = row["test_auc"]
    dpn = set(args.dpn.split(",")) if args.dpn else {m for m in tunes if m.startswith("dpn")}
    baselines = [m for m in tunes if m not in dpn]
    best = max(baselines, key=lambda m: tunes[m]["test_auc_mean"]) if baselines else None

    command = "python experiments/tuned_table.py " + " ".join(
        shlex.quote(str(a)) for a in (argv if argv is not None else sys.argv[1:]))
    data = {t["data"] for t in tunes.values()}
    lines = [f"# Equal tuning budgets on {', '.join(sorted(data))}", "",
             f"Command: `{command}`", "", f"Versions: {json.dumps(versions())}", "",
             "Each model tuned by `dpn-jax tune` with the same budget (its family's default space, "
             "the same number of random trials and seeds; the commands are in each tune folder's "
             "tune.md), selected on mean validation AUC only, then retrained on fresh seeds "
             f"{', '.join(map(str, sorted(next(iter(seed_sets)))))}: the test AUC below.", "",
             "| model | selected configuration | trials (replica runs) | selection valid AUC | "
             "tuned test AUC | untuned test AUC | tuning gain |", "|---|---|---:|---:|---:|---:|---:|"]
    order = sorted(tunes, key=lambda m: -tunes[m]["test_auc_mean"])
    for m in order:
        t = tunes[m]
        tuned = list(t["final"].values())
        before = untuned.get(m)
        gain = f"{t['test_auc_mean'] - statistics.mean(before):+.4f}" if before else "-"
        lines.append(f"| `{m}` | `{t['configuration']}` | {t['trials']} ({t['replica_runs']}) | "
                     f"{t['valid_auc']:.4f} | {mean_std(tuned)} | {mean_std(before) if before else '-'} | {gain} |")
    lines += ["", "Mean ± sample standard deviation over the final seeds; the untuned column is "
              "the same model with its defaults on the seeds of the untuned table ("
              + (f"`{args.untuned}`" if args.untuned else "none given") + ")."]
    rows = []
    if args.pair:
        lines += ["", "## Seed-paired differences of the tuned models", "",
                  "A − B per final seed, mean ± std of the differences, 95% percentile-bootstrap "
                  "interval of the mean (10,000 resamples); A wins / loses when the interval excludes "
                  "0, else ties." + (f" Best baseline: `{best}`." if best else ""), "",
                  "| A | B | A − B | 95% CI | seeds A > B | verdict | per seed |",
                  "|---|---|---:|---|---:|---|---|"]
        done = set()
        for pair in args.pair:
            a, sep, b = pair.partition(":")
            b = best if b == "best-baseline" else b
            if not sep or a not in tunes or b not in tunes:
                raise SystemExit(f"--pair {pair!r}: expected A:B among the tuned models {sorted(tunes)}")
            if (a, b) in done:  # best-baseline named a model already paired
                continue
            done.add((a, b))
            r = paired_difference(tunes[a]["final"], tunes[b]["final"])
            rows.append({"a": a, "b": b, **r._asdict(), "verdict": r.verdict})
            lines.append(f"| `{a}` | `{b}` | {r.mean:+.4f} ± {r.std:.4f} | [{r.low:+.4f}, {r.high:+.4f}] | "
                         f"{r.wins}/{len(r.seeds)} | {a} {r.verdict} | "
                         + ", ".join(f"{d:+.4f}" for d in r.diffs) + " |")
    text = "\n".join(lines) + "\n"
    write_text(args.out.with_suffix(".md"), text)
    write_text(args.out.with_suffix(".json"),
               json.dumps({"command": command, "tunes": tunes, "best_baseline": best, "pairs": rows},
                          indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
