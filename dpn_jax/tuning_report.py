"""``tune.md`` and ``tune.png``: every trial of a :func:`dpn_jax.tuning.run_tune` report, the
selected configuration and its fresh-seed results."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpn_jax.atomic import save_figure
from dpn_jax.tune_spaces import space_yaml

LOG_SCALE = ("lr", "min_lr")  # with every *_l2 option: searched over decades


def _ms(mean: float, std: float, n: int = 2) -> str:
    """``mean ± std``; a single seed's value alone (it has no spread)."""
    if mean != mean:
        return "-"
    return f"{mean:.4f}" if n < 2 else f"{mean:.4f} ± {std:.4f}"


def _seeds(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def render_markdown(report: dict[str, Any]) -> str:
    sel, final, rows = report["selected"], report["final"], report["trials"]
    k = report["select_seeds"]
    n_sel = len(report["seeds"])
    nf = sum(r["test_auc"] == r["test_auc"] for r in final["replicas"])
    lines = [f"# tune: {report['model']} on {report['data']}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    how = (f"{len(rows)} trials drawn at random (--search-seed {report['search_seed']})"
           if report["search"] == "random" else f"a grid of {len(rows)} trials")
    stages = (f"every trial on the first {k} of the tuning seeds {_seeds(report['seeds'])}, the "
              f"{report['select_top']} best of them on all" if k else
              f"every trial on the tuning seeds {_seeds(report['seeds'])}")
    lines += [f"Search: {how} from the {report['space_source']} space; {stages}"
              + (f"; fixed: `{' '.join(report['sets'])}`" if report["sets"] else "") + ".", "",
              "Selection: the trial with the highest **mean validation AUC** over the tuning seeds. "
              "Test AUC is listed for reference only: it was **not used for selection**.", "",
              f"## Selected: trial {sel['trial']}, `{sel['configuration'] or 'defaults'}`", "",
              f"Mean validation AUC over the tuning seeds: {_ms(sel['valid_auc_mean'], sel['valid_auc_std'], n_sel)}. "
              f"Alone: `dpn-jax train --model {report['model']} --data {report['data']} "
              + "".join(f"--set {x} " for x in [*report["sets"], *sel["configuration"].split()])
              + f"--seed {final['seeds'][0]}`.", "",
              f"Retrained on fresh seeds {_seeds(final['seeds'])}: **test AUC "
              f"{_ms(final['test_auc']['mean'], final['test_auc']['std'], nf)}**, test logloss "
              f"{_ms(final['test_logloss']['mean'], final['test_logloss']['std'], nf)} (mean ± sample std)"
              + (f"; {final['diverged']} seed(s) diverged" if final["diverged"] else "") + ".", "",
              "| seed | test AUC | test logloss | valid AUC | valid logloss | best epoch | epochs | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in final["replicas"]:
        lines.append(f"| {r['seed']} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | {r['valid_auc']:.4f} | "
                     f"{r['valid_logloss']:.4f} | {r['best_epoch']} | {r['epochs']} | {r['status']} |")
    lines.append(f"| mean ± std | {_ms(final['test_auc']['mean'], final['test_auc']['std'], nf)} | "
                 f"{_ms(final['test_logloss']['mean'], final['test_logloss']['std'], nf)} | "
                 f"{_ms(final['valid_auc']['mean'], final['valid_auc']['std'], nf)} | "
                 f"{_ms(final['valid_logloss']['mean'], final['valid_logloss']['std'], nf)} | | | |")
    lines += ["", "## Every trial, by mean validation AUC", "",
              "| trial | configuration | seeds | valid AUC | valid logloss | test AUC (not used for "
              "selection) | best epochs | diverged | program |", "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(range(len(rows)), key=lambda i: (not rows[i]["complete"],
                                                    -(rows[i]["valid_auc_mean"] if rows[i]["valid_auc_mean"]
                                                      == rows[i]["valid_auc_mean"] else -1.0), i))
    for i in order:
        r = rows[i]
        mark = " **(selected)**" if r["selected"] else ""
        n = len([x for x in r["valid_auc"] if x == x])
        lines.append(f"| {r['trial']}{mark} | `{r['configuration'] or 'defaults'}` | {len(r['seeds'])} | "
                     f"{_ms(r['valid_auc_mean'], r['valid_auc_std'], n)} | "
                     f"{_ms(r['valid_logloss_mean'], r['valid_logloss_std'], n)} | "
                     f"{_ms(r['test_auc_mean'], r['test_auc_std'], n)} | {', '.join(map(str, r['best_epoch']))} | "
                     f"{r['diverged']} | {r['group']} |")
    lines += ["", "Mean ± sample standard deviation over the seeds each trial ran on"
              + (f" (a trial with {k} seed{'s' * (k > 1)} stopped after the first stage)" if k else "")
              + ". Trials "
              "with a diverged seed are listed last and cannot be selected. Each stage's replicas, "
              "learning curves included, are in " + ("`stage1/`, `stage2/`" if k else "`search/`")
              + " and `final/` (`sweep.json`).", "", "## Space", "", "```yaml",
              space_yaml(report["space"]).rstrip(), "```", "", f"Versions: {json.dumps(report['versions'])}"]
    return "\n".join(lines) + "\n"


def _log_scaled(name: str) -> bool:
    return name in LOG_SCALE or name.endswith("_l2") or name.endswith("_std")


def plot_tune(report: dict[str, Any], path: str | Path,
              log: Callable[[str], None] = print) -> Path | None:
    """Mean validation AUC (error bar: std over seeds) against each searched option, one panel
    each; the selected trial in red. None (with one note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"note  matplotlib is not installed (pip install -e '.[dev]'): skipped the plot {path}")
        return None
    names = list(report["space"])
    rows = [r for r in report["trials"] if r["valid_auc_mean"] == r["valid_auc_mean"]]
    cols = min(3, max(1, len(names)))
    nrows = math.ceil(max(1, len(names)) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = [r["options"][name] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:  # widths, strings, booleans: one position per distinct value
            cats = sorted({json.dumps(v) for v in values})
            xs = [cats.index(json.dumps(v)) for v in values]
            ax.set_xticks(range(len(cats)), [",".join(map(str, json.loads(c))) if c.startswith("[")
                                             else str(json.loads(c)) for c in cats], fontsize=7)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        for x, r in zip(xs, rows):
            color = "tab:red" if r["selected"] else ("tab:blue" if r["complete"] else "tab:gray")
            ax.errorbar(x, r["valid_auc_mean"], yerr=r["valid_auc_std"], fmt="o", color=color,
                        ms=4, capsize=2, alpha=0.8)
        if numeric and _log_scaled(name):
            positive = [x for x in xs if x > 0]
            if positive and min(xs) > 0:
                ax.set_xscale("log")
            elif positive:  # 0 among the values: linear around it, decades above
                ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(name)
        ax.set_ylabel("validation AUC")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{report['model']} on {report['data']}: mean validation AUC per trial, error bar: "
                 "std over seeds (red: selected; grey: not selectable, fewer seeds or diverged)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
