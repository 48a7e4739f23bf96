"""Seed-paired differences of test AUC between runs of one results folder, with bootstrap CIs.

    python experiments/paired.py --runs experiments/results/table1_frappe \
        --pair dpn:dnn --pair dpn_field_dnn:dnn --out experiments/results/table1_frappe_paired

``--runs`` is a folder written by ``seeds.py`` (or ``table1.py``): its ``runs/<run>-<seed>.json``.
A run is named by its slug (the file name without ``-<seed>.json``), by its ``--run`` text
(``"dpn hidden=128,64"``) or, when the model has one run, by its model name. Each pair ``A:B`` gives A - B per shared seed, their mean and std, the 95%
percentile-bootstrap interval of the mean (:mod:`dpn_jax.analysis.paired`) and a verdict: A wins
or loses when the interval excludes 0, else ties. Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds  # noqa: E402  (the run slugs seeds.py writes)

from dpn_jax.analysis.paired import paired_difference  # noqa: E402
from dpn_jax.atomic import write_text  # noqa: E402


def load_runs(folder: Path, metric: str) -> tuple[dict[str, dict[int, float]], dict[str, set[str]]]:
    """seed -> metric per run slug, and the slugs of each model name."""
    runs: dict[str, dict[int, float]] = defaultdict(dict)
    by_model: dict[str, set[str]] = defaultdict(set)
    for f in sorted((folder / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("status", "done") != "done":
            continue
        slug = f.stem.rsplit("-", 1)[0]
        runs[slug][int(r["seed"])] = float(r[metric])
        by_model[r["model"]].add(slug)
    return runs, by_model


def resolve(name: str, runs: dict[str, dict[int, float]], by_model: dict[str, set[str]]) -> dict[int, float]:
    """A run by its slug, by its model name when that model has one run, or as seeds.py's --run
    text (``"dpn hidden=128,64"``: the model's run whose slug ends with the options)."""
    for key in (name, seeds.slug(name)):
        if key in runs:
            return runs[key]
    model, _, options = name.strip().partition(" ")
    found = by_model.get(model, set())
    if options:
        found = {s for s in found if s.endswith("_" + seeds.slug(options))}
    if len(found) == 1:
        return runs[next(iter(found))]
    raise SystemExit(f"--pair: no single run named {name!r} (runs: {', '.join(sorted(runs))})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True, type=Path, help="a folder with runs/<run>-<seed>.json")
    p.add_argument("--pair", action="append", required=True, help="A:B (A - B per seed)")
    p.add_argument("--metric", default="test_auc")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    runs, by_model = load_runs(args.runs, args.metric)
    rows = []
    for pair in args.pair:
        a, sep, b = pair.partition(":")
        if not sep:
            raise SystemExit(f"--pair {pair!r}: expected A:B")
        r = paired_difference(resolve(a, runs, by_model), resolve(b, runs, by_model))
        rows.append({"a": a, "b": b, **r._asdict(), "verdict": r.verdict})
    command = "python " + " ".join(shlex.quote(x) for x in ["experiments/paired.py", *(argv or sys.argv[1:])])
    lines = [f"# Seed-paired {args.metric} differences: {args.runs.name}", "",
             f"Command: `{command}`", "",
             "A - B per shared seed; mean ± sample std of the differences; 95% percentile-bootstrap "
             "interval of the mean over seeds (10,000 resamples); A wins / loses when the interval "
             "excludes 0, else ties. With 5 seeds the interval is coarse.", "",
             "| A | B | seeds | A - B | 95% CI | seeds A > B | verdict | per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{d:+.4f}" for d in r["diffs"])
        lines.append(f"| `{r['a']}` | `{r['b']}` | {len(r['seeds'])} | {r['mean']:+.4f} ± {r['std']:.4f} "
                     f"| [{r['low']:+.4f}, {r['high']:+.4f}] | {r['wins']}/{len(r['seeds'])} "
                     f"| {r['verdict']} | {per} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_text(args.out.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
