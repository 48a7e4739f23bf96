"""Paper Table 3 in spirit: does DPN help on INFREQUENT users? AUC per bucket of how often the
test row's user occurs in the training split, ``dnn`` vs ``dpn``, over seeds.

    python experiments/by_frequency.py --seeds 3

Trains each model with the committed Table-1 Frappe settings (each model's documented defaults,
``monitor=auc-logloss reduce_lr_factor=0.1``: see ``experiments/table1.py``) into a bundle under
``--work-dir`` (kept, so a rerun only re-evaluates), then scores the test split with
``dpn_jax.analysis.evaluate.evaluate_bundle`` (what ``dpn-jax evaluate --by-frequency`` runs).
Writes ``experiments/results/by_frequency_<data>_<field>.{md,json,png}``: mean ± std AUC per
bucket and model over seeds, rows per bucket, and a paired bootstrap over the bucket's test rows
for the difference of the two models' seed-mean AUCs (the seed std alone ignores that a bucket of
a few hundred rows is a small sample).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seeds import train_bundle  # noqa: E402
from table1 import PROTOCOL  # noqa: E402

from dpn_jax.analysis.by_frequency import (  # noqa: E402
    ALL,
    parse_buckets,
    plot_auc_by_bucket,
    render_comparison,
    summarize_seeds,
    training_counts,
)
from dpn_jax.analysis.evaluate import evaluate_bundle  # noqa: E402
from dpn_jax.data import load_dataset  # noqa: E402
from dpn_jax.metrics import auc  # noqa: E402
from dpn_jax.runner import versions  # noqa: E402
from dpn_jax.train import xla_cache  # noqa: E402

# Frappe's users: 878 in train, median 14 training rows per user, but the test rows are dominated
# by heavy users (half of them belong to users with >= 180 training rows). These edges keep
# >= ~1,500 test rows in every bucket but the unseen one: 0 (OOV, 54 rows), 1-20 (users seen
# rarely), 21-100, 101-250, 251+ (the heaviest users).
FRAPPE_USER_BUCKETS = "0,1-20,21-100,101-250,251+"
RESULTS = Path(__file__).resolve().parent / "results"


def parse_seeds(text: str) -> list[int]:
    """``3`` -> 2021, 2022, 2023 (K seeds from 2021); ``2021,2030`` -> those seeds."""
    if "," not in text and text.isdigit() and int(text) < 1000:
        return list(range(2021, 2021 + int(text)))
    return [int(s) for s in text.split(",") if s]


def bootstrap_delta(reports: dict[str, list[dict]], names: list[str], rows_of: dict[str, np.ndarray],
                    n_boot: int, seed: int = 0) -> dict[str, tuple[float, float] | None]:
    """95% interval of (seed-mean AUC of names[1]) - (of names[0]) per bucket, resampling the
    bucket's test rows (the same resample for every model and seed: a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    labels = reports[names[0]][0]["labels"]
    out = {}
    for bucket, idx in rows_of.items():
        y = labels[idx]
        if idx.size == 0 or y.min() == y.max():
            out[bucket] = None
            continue
        deltas = []
        for _ in range(n_boot):
            take = idx[rng.integers(0, idx.size, idx.size)]
            if labels[take].min() == labels[take].max():
                continue
            means = [statistics.mean(auc(labels[take], r["logits"][take]) for r in reports[m]) for m in names]
            deltas.append(means[1] - means[0])
        out[bucket] = (float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5)))
    return out


def reading(summ: dict[str, list[dict]], names: list[str], ci: dict, seeds: list[int]) -> list[str]:
    """A plain account of what the numbers show, generated from them (so a rerun stays honest)."""
    a, b = names
    lines = []
    rows = [(ra, rb) for ra, rb in zip(summ[a], summ[b]) if ra["auc_mean"] is not None and rb["auc_mean"] is not None]
    overall = next((ra, rb) for ra, rb in rows if ra["bucket"] == ALL)
    d_all = overall[1]["auc_mean"] - overall[0]["auc_mean"]
    lines.append(f"- Overall, `{b}` − `{a}` = {d_all:+.4f} AUC over {len(seeds)} seeds "
                 f"(95% bootstrap interval over test rows {_ci(ci.get(ALL))}).")
    sig = []
    for ra, rb in rows:
        if ra["bucket"] == ALL:
            continue
        c = ci.get(ra["bucket"])
        d = rb["auc_mean"] - ra["auc_mean"]
        excl = c is not None and (c[0] > 0 or c[1] < 0)
        sig.append((ra["bucket"], d, excl, ra["rows"]))
    parts = [f"`{bk}` {d:+.4f}{' (interval excludes 0)' if excl else ''}" for bk, d, excl, _ in sig]
    lines.append(f"- Per bucket (`{b}` − `{a}`, train count of the user): " + "; ".join(parts) + ".")
    rare = [s for s in sig if s[3] > 0][:2]
    frequent = [s for s in sig if s[3] > 0][-2:]
    d_rare = statistics.mean(s[1] for s in rare)
    d_freq = statistics.mean(s[1] for s in frequent)
    noise = ("some bucket differences exceed test-row sampling noise" if any(s[2] for s in sig) else
             "no bucket difference exceeds test-row sampling noise (every interval contains 0)")
    rare_beyond_noise = any(s[2] and s[1] > 0 for s in rare)
    if d_rare > max(d_freq, 0) and rare_beyond_noise:
        claim = "is consistent with this run"
    elif d_rare > max(d_freq, 0):
        claim = "points the same way here, but not beyond the test-row noise of the rare buckets"
    else:
        claim = f"is not supported by this run (`{b}`'s gain is not larger for rare users)"
    lines.append(f"- Mean Δ in the two rarest buckets ({', '.join(s[0] for s in rare)}): {d_rare:+.4f}; "
                 f"in the two most frequent ({', '.join(s[0] for s in frequent)}): {d_freq:+.4f}. "
                 f"On this split {noise}; the paper's claim (a larger gain for infrequent users) {claim}.")
    stds = {m: summ[m][-1]["auc_std"] for m in names}
    if all(v is not None for v in stds.values()):
        within = sum(abs(s[1]) < max(stds.values()) for s in sig)
        lines.append(f"- Seed-to-seed spread of the overall AUC: `{a}` ± {stds[a]:.4f}, `{b}` ± {stds[b]:.4f}; "
                     f"{within} of the {len(sig)} per-bucket Δ are smaller than the larger of the two.")
    spans = []
    for m in names:
        have = [r for r in summ[m] if r["bucket"] != ALL and r["auc_mean"] is not None]
        lo, hi = min(have, key=lambda r: r["auc_mean"]), max(have, key=lambda r: r["auc_mean"])
        spans.append(f"`{m}` from {lo['auc_mean']:.4f} (bucket {lo['bucket']}) to {hi['auc_mean']:.4f} "
                     f"(bucket {hi['bucket']})")
    lines.append(f"- AUC across buckets (the same test rows for both models): {'; '.join(spans)}.")
    lines.append("- Caveats: the seed std covers training randomness only; the intervals cover the "
                 "test rows only (seed-mean AUCs, one fixed split). The unseen bucket (OOV users) is "
                 "one shared embedding row and few test rows. Frappe here is the small NFM split "
                 "(docs/guide/datasets.md: train = the validation file minus 10%), not the paper's data, and the "
                 "models ran untuned with Table-1 defaults.")
    return lines


def _ci(c: tuple[float, float] | None) -> str:
    return "-" if c is None else f"[{c[0]:+.4f}, {c[1]:+.4f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="frappe")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--field", default="user")
    p.add_argument("--models", default="dnn,dpn", help="two models compare with a Δ column (default dnn,dpn)")
    p.add_argument("--seeds", default="3", help="K (seeds 2021..2020+K) or a comma list (default 3)")
    p.add_argument("--buckets", default=None, help=f"default for frappe/user: {FRAPPE_USER_BUCKETS}")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--work-dir", default=None,
                   help="bundles (kept for reruns; default $DPN_CACHE_DIR or ~/.cache/dpn_jax, /by_frequency)")
    args = p.parse_args(argv)
    xla_cache.enable()
    seeds = parse_seeds(args.seeds)
    names = args.models.split(",")
    buckets = args.buckets or (FRAPPE_USER_BUCKETS if (args.data, args.field) == ("frappe", "user") else None)
    bucket_list = parse_buckets(buckets)
    work = Path(args.work_dir or Path(os.environ.get("DPN_CACHE_DIR", "~/.cache/dpn_jax")) / "by_frequency")
    work = work.expanduser() / Path(args.data).stem
    sets = list(PROTOCOL)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    # The distribution the edges were chosen from.
    ds = load_dataset(args.data, data_dir=args.data_dir)
    f = ds.schema.field(args.field)
    train_ids = ds.train["cat"][:, f.column]
    per_value = np.unique(train_ids[train_ids != f.oov_id], return_counts=True)[1]
    test_counts = training_counts(train_ids, ds.test["cat"][:, f.column], oov_id=f.oov_id)
    q = np.percentile(per_value, [25, 50, 75, 90])
    qt = np.percentile(test_counts, [10, 25, 50, 75])
    distribution = (f"{per_value.size:,} `{args.field}` values in train, training rows per value: quartiles "
                    f"{q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f}, 90th percentile {q[3]:.0f}, max {per_value.max():,}; "
                    f"per TEST row (the train count of its {args.field}): 10th/25th/50th/75th percentiles "
                    f"{qt[0]:.0f} / {qt[1]:.0f} / {qt[2]:.0f} / {qt[3]:.0f}, unseen (OOV) "
                    f"{int((test_counts == 0).sum()):,} of {test_counts.size:,} rows.")
    del ds

    reports: dict[str, list[dict]] = {m: [] for m in names}
    t0 = time.perf_counter()
    trained = 0
    for m in names:
        for seed in seeds:
            bundle, fresh = train_bundle(m, args.data, seed, sets, work, args.data_dir)
            trained += fresh
            rep = evaluate_bundle(bundle, args.field, data_dir=args.data_dir, buckets=bucket_list, arrays=True)
            if rep["rows"][-1]["auc"] != rep["recorded_auc"]:
                print(f"warning: {m} seed {seed}: overall AUC {rep['rows'][-1]['auc']} differs from the "
                      f"bundle's recorded {rep['recorded_auc']}", file=sys.stderr)
            reports[m].append(rep)
    wall = time.perf_counter() - t0
    per_model = {m: [r["rows"] for r in reports[m]] for m in names}
    summ = {m: summarize_seeds(per_model[m]) for m in names}
    counts = reports[names[0]][0]["counts"]
    rows_of = {b.label: np.flatnonzero(b.mask(counts)) for b in bucket_list}
    rows_of[ALL] = np.arange(counts.size)
    ci = bootstrap_delta(reports, names, rows_of, args.bootstrap) if len(names) == 2 else {}
    extra = {}
    if ci:
        extra[f"95% interval of Δ ({args.bootstrap} paired bootstraps of test rows)"] = [
            _ci(ci.get(r["bucket"])) for r in summ[names[0]]]
    table = render_comparison(per_model, args.field, extra=extra)
    stem = RESULTS / f"by_frequency_{Path(args.data).stem}_{args.field}"
    overall = {m: [r["rows"][-1]["auc"] for r in reports[m]] for m in names}
    recorded_equal = all(r["rows"][-1]["auc"] == r["recorded_auc"] for m in names for r in reports[m])
    lines = [f"# {args.data}: test AUC by how often the `{args.field}` was seen in training "
             f"({', '.join(f'`{m}`' for m in names)}; paper Table 3 in spirit)", "",
             f"Command: `{command}`", "",
             f"Protocol: the committed Table-1 {args.data} settings: each model's documented defaults, "
             f"`{' '.join(sets)}`; seeds {', '.join(map(str, seeds))}; test split. Evaluated with "
             f"`dpn-jax evaluate BUNDLE --by-frequency {args.field} --buckets {','.join(b.label for b in bucket_list)}`"
             f" per bundle. This invocation: {trained} runs trained, {len(names) * len(seeds) - trained} "
             f"reused from `--work-dir`, {wall / 60:.1f} min.", "",
             f"Versions: {json.dumps(versions())}", "",
             f"Buckets (train count of the `{args.field}` of a test row = training rows with the same "
             f"`{args.field}`; 0 = unseen in train, i.e. OOV): `{','.join(b.label for b in bucket_list)}`. "
             f"Distribution: {distribution}", "",
             table, "",
             "AUC: mean ± sample std over seeds. Rows, distinct values and positive rate are the test "
             "rows of the bucket (the same for every run). Per-seed overall test AUC ("
             + ("equal to each bundle's recorded test AUC" if recorded_equal else
                "NOT equal to every bundle's recorded test AUC: see the warnings") + "): "
             + "; ".join(f"`{m}` " + ", ".join(f"{x:.4f}" for x in overall[m]) for m in names) + ".", ""]
    if len(names) == 2:
        lines += ["## Reading", "", *reading(summ, names, ci, seeds), ""]
    png = plot_auc_by_bucket(per_model, stem.with_suffix(".png"),
                             title=f"{args.data}: test AUC by train count of {args.field} "
                                   f"(mean ± std over {len(seeds)} seeds)", field=args.field,
                             log=lambda s: print(s, file=sys.stderr))
    if png:
        lines += [f"Plot: `{png.relative_to(RESULTS.parent.parent)}`", ""]
    stem.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    skip = ("markdown", "logits", "labels", "counts", "ids")
    stem.with_suffix(".json").write_text(json.dumps({
        "command": command, "protocol": sets, "seeds": seeds, "data": args.data, "field": args.field,
        "buckets": [b.label for b in bucket_list], "distribution": distribution,
        "summary": summ, "delta_interval_95": ci, "bootstrap": args.bootstrap, "wall_seconds": wall,
        "runs": {m: [{k: v for k, v in r.items() if k not in skip} for r in reports[m]] for m in names},
        "versions": versions(),
    }, indent=1), encoding="utf-8")  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
