"""The knock-out table: what each trained DPO model's dynamic part contributes, over seeds.

    python experiments/knockout_table.py --data frappe --seeds 2021,2022,2023 \
        --run dpn --run "dpn context_norm=true" --run dpn_field --run dpn_field_dnn \
        --out experiments/results/knockout_frappe

Each ``--run`` is a model name followed by ``key=value`` overrides (as in ``seeds.py``). Every
(run, seed) is trained once into a bundle under ``<out>/checkpoints/bundles/`` (not committed;
``dpn-jax evaluate BUNDLE --knockout dpo`` reruns one) and knocked out on the test split with
:func:`dpn_jax.analysis.knockout.knockout_report`: every DPO layer reduced to its static part,
the rest of the trained network unchanged. The per-seed reports are kept as
``<out>/runs/<slug>-<seed>.json``; a rerun skips those, so an interrupted table resumes.

The table (``<out>.md`` and ``<out>.json``, with the command) gives, mean ± std over seeds: the
trained test AUC, the AUC with the dynamic part knocked out, their seed-paired difference, the
mean |Δ logit| as a share of the logits' std, and each DPO layer's dynamic share (the generated
part's output norm over the static part's, on the layer's own inputs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seeds  # noqa: E402  (run slugs, mean ± std, bundles)

from dpn_jax import atomic  # noqa: E402
from dpn_jax.analysis.knockout import knockout_report  # noqa: E402
from dpn_jax.runner import versions  # noqa: E402


def one(run: str, seed: int, args, out: Path) -> dict:
    """The knock-out report of ``run`` at ``seed`` (trained and scored unless on record)."""
    record = out / "runs" / f"{seeds.slug(run)}-{seed}.json"
    if record.exists():
        return json.loads(record.read_text())
    model, *sets = run.split()
    bundle, _ = seeds.train_bundle(model, args.data, seed, sets, out / "checkpoints" / "bundles",
                                   args.data_dir, args.cache_dir, progress=not args.no_progress)
    report = knockout_report(bundle, data_dir=args.data_dir, cache_dir=args.cache_dir,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
    report = {k: v for k, v in report.items() if k != "markdown"}
    report.update(run=run, seed=seed)
    atomic.write_text(record, json.dumps(report, indent=1))
    return report


def summarise(run: str, reports: list[dict]) -> dict:
    trained = [r["with"]["auc"] for r in reports]
    knocked = [r["without"]["auc"] for r in reports]
    shift = [r["mean_abs_delta_logit"] / r["logit_std"] for r in reports]
    layers: dict[str, list[float]] = {}
    for r in reports:
        for layer in r["layers"]:
            layers.setdefault(f"{layer['layer']} ({layer['kind']})", []).append(layer["share"])
    return {"run": run, "seeds": [r["seed"] for r in reports], "trained_auc": trained,
            "knocked_out_auc": knocked, "delta_auc": [b - a for a, b in zip(trained, knocked)],
            "shift_over_std": shift, "dynamic_share": layers}


def render(rows: list[dict], command: str, data: str) -> str:
    lines = [f"# Knock-out of the DPO's dynamic part on {data}, over seeds", "",
             f"Command: `{command}`", "",
             f"Versions: {json.dumps(versions())}", "",
             "Each model trained under the current defaults (plus the run's options), then its DPO "
             "layers reduced to their static parts (generated weights zeroed) with the rest of the "
             "trained network unchanged, and the test split rescored. Δ AUC = knocked out − "
             "trained, paired by seed (positive: better without the dynamic part). Logit shift: "
             "mean |Δ logit| over the logits' std. Dynamic share: ‖generated part's output‖ / "
             "‖static part's output‖ per DPO layer, mean over test rows.", "",
             "| run | seeds | test AUC | knocked out | Δ AUC | logit shift | dynamic share per layer |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        shares = "; ".join(f"`{k}` {seeds.mean_std(v, '.3f')}" for k, v in r["dynamic_share"].items())
        lines.append(f"| `{r['run']}` | {len(r['seeds'])} | {seeds.mean_std(r['trained_auc'])} | "
                     f"{seeds.mean_std(r['knocked_out_auc'])} | {seeds.mean_std(r['delta_auc'], '.5f', sign=True)} | "
                     f"{seeds.mean_std([100 * s for s in r['shift_over_std']], '.1f')}% | {shares} |")
    lines += ["", "Mean ± sample standard deviation over seeds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--run", action="append", required=True, help="model [key=value ...]")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--cache-dir")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    seed_list = [int(s) for s in args.seeds.split(",")]
    rows = [summarise(run, [one(run, s, args, out) for s in seed_list]) for run in args.run]
    command = "python experiments/knockout_table.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = render(rows, command, args.data)
    atomic.write_text(out.with_suffix(".md"), text)
    atomic.write_text(out.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
