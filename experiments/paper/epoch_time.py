"""Expected prepare and epoch times of the paper's datasets, scaled from what runs here.

    python experiments/paper/epoch_time.py --rows 1000000 --models dnn,dpn

No paper dataset is on this machine, so this measures the real code path on a generated file in
Criteo's exact raw layout (label, 13 integers, 26 hashed categories, tab-separated; Zipf
categories, blanks): ``dpn-jax data prepare criteo`` (two streaming passes) and one training
epoch per model at the AFN protocol's batch 4096. It then scales linearly in rows to each paper
dataset (rows from the BARS dataset cards). Writes ``experiments/results/paper_epoch_time.md``.

What the scaling ignores, stated in the output too: embedding tables of the real data are larger
(dense Adam touches every row each step: see ``optimizer=lazy_adam``), evaluation passes, and
the accelerator. The H100 column uses the reference figure of straightforward JAX in
../shared/BENCHMARKS.md (not measured by us) as a rough scale only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results"
# Train rows of the paper datasets (BARS dataset cards; raw criteo/avazu split alike).
PAPER_TRAIN_ROWS = {"criteo_x1": 33_003_326, "avazu_x1": 28_300_276,
                    "movielens_latest_x1": 1_404_801, "frappe_x1": 202_027}  # fmt: skip
PAPER_ALL_ROWS = {"criteo_x1": 45_840_617, "avazu_x1": 40_428_967,
                  "movielens_latest_x1": 2_006_859, "frappe_x1": 288_609}  # fmt: skip
H100_DNN_SAMPLES_PER_S = 3.5e6  # ../shared/BENCHMARKS.md, straightforward JAX DNN, dense Adam


def write_criteo_like(path: Path, rows: int, seed: int = 0) -> None:
    """Criteo's raw layout with Criteo-like marginals (25% clicks, ~4% blank integers, Zipf
    categories over field vocabularies of 10 .. 200k values)."""
    rng = np.random.default_rng(seed)
    vocab = np.geomspace(10, 200_000, 26).astype(int)
    with open(path, "w") as fh:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            cols = [(rng.random(n) < 0.25).astype(int).astype(str)]
            for _ in range(13):
                x = np.floor(rng.lognormal(1.5, 2.0, n)).astype(int).astype(str)
                x[rng.random(n) < 0.04] = ""
                cols.append(x)
            for v in vocab:
                ids = np.minimum(rng.zipf(1.1, n), v) * 2654435761 % (1 << 32)
                c = np.char.mod("%08x", ids)
                c[rng.random(n) < 0.02] = ""
                cols.append(c)
            fh.write("\n".join("\t".join(r) for r in zip(*cols, strict=True)) + "\n")


def prepare_in_subprocess(data_dir: Path, cache: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``dpn-jax data prepare criteo`` in a fresh process."""
    import subprocess

    code = ("import resource, sys; from dpn_jax.cli import main; code = main(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, "data", "prepare", "criteo", "--data-dir",
                          str(data_dir), "--cache-dir", str(cache), "--no-progress"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    seconds = time.perf_counter() - t0
    rss_kb = int(next(x for x in out.splitlines() if x.startswith("MAXRSS")).split()[1])
    return seconds, rss_kb / 1024  # Linux reports KB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--models", default="dnn,dpn")
    p.add_argument("--out", default=str(RESULTS / "paper_epoch_time"))
    args = p.parse_args(argv)
    from dpn_jax.data import load_dataset
    from dpn_jax.runner import run_train, versions

    measured: dict = {"rows": args.rows, "versions": versions()}
    with tempfile.TemporaryDirectory() as tmp:
        d, cache = Path(tmp) / "data", Path(tmp) / "cache"
        (d / "criteo").mkdir(parents=True)
        t0 = time.perf_counter()
        write_criteo_like(d / "criteo" / "train.txt", args.rows)
        size = (d / "criteo" / "train.txt").stat().st_size
        print(f"generated {args.rows:,} rows ({size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        # The same rows 2 and 4 times: peak memory must not grow with the file (bounded streaming).
        for k in (2, 4):
            dk = Path(tmp) / f"data{k}"
            (dk / "criteo").mkdir(parents=True)
            with open(dk / "criteo" / "train.txt", "wb") as fh:
                for _ in range(k):
                    fh.write((d / "criteo" / "train.txt").read_bytes())
        for k in (1, 2, 4):
            key = "prepare" if k == 1 else f"prepare_{k}x"
            seconds, rss_mb = prepare_in_subprocess(d if k == 1 else Path(tmp) / f"data{k}", cache)
            measured[key] = {"rows": k * args.rows, "seconds": seconds, "max_rss_mb": rss_mb}
            print(f"{key}: {seconds:.1f} s, peak RSS {rss_mb:.0f} MB")
        measured["prepare_rows_per_s"] = args.rows / measured["prepare"]["seconds"]
        measured["bytes_per_row"] = size / args.rows
        ds = load_dataset("criteo", data_dir=d, cache_dir=cache, progress=False)
        measured["table_rows"] = ds.schema.table_size
        print(ds.summary())
        measured["models"] = {}
        for m in args.models.split(","):
            r = run_train(m, "criteo", data_dir=str(d), cache_dir=str(cache),
                          sets=["max_epochs=1", "batch_size=4096"], progress=False, log=lambda s: None)  # fmt: skip
            measured["models"][m] = {"samples_per_s": r["train_samples_per_s"],
                                     "epoch_s": r["train_seconds"], "test_auc": r["test_auc"]}  # fmt: skip
            print(f"{m}: {r['train_samples_per_s']:,.0f} samples/s")
    models = list(measured["models"])
    lines = [
        "# Expected prepare and epoch times of the paper datasets (scaled from this machine)", "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`", "",
        f"Measured here (2 CPU cores, {measured['versions']['backend']}): a generated {args.rows:,}-row "
        f"file in Criteo's raw layout ({measured['bytes_per_row']:.0f} bytes/row, "
        f"{measured['table_rows']:,} embedding rows after the min-count-10 cut): prepare "
        f"{measured['prepare_rows_per_s']:,.0f} rows/s (both passes); peak RSS of the prepare "
        "process for the same rows once, twice and four times: "
        + ", ".join(f"{measured[k]['max_rss_mb']:,.0f} MB ({measured[k]['rows']:,} rows, "
                    f"{measured[k]['seconds']:.0f} s)" for k in ("prepare", "prepare_2x", "prepare_4x"))
        + "; train "
        + ", ".join(f"{m} {measured['models'][m]['samples_per_s']:,.0f} samples/s" for m in models)
        + " at batch 4096.", "",
        "| dataset | rows | train rows | prepare (CPU here) | "
        + " | ".join(f"{m} epoch (CPU here)" for m in models) + " | dnn epoch (H100 reference) |",
        "|---|---|---|---|" + "---|" * len(models) + "---|",
    ]
    for name, n_train in PAPER_TRAIN_ROWS.items():
        n_all = PAPER_ALL_ROWS[name]
        cells = [f"{n_train / measured['models'][m]['samples_per_s'] / 60:.1f} min" for m in models]
        lines.append(f"| {name} | {n_all:,} | {n_train:,} | "
                     f"{n_all / measured['prepare_rows_per_s'] / 60:.1f} min | " + " | ".join(cells)
                     + f" | {n_train / H100_DNN_SAMPLES_PER_S:.1f} s |")  # fmt: skip
    lines += ["", "Linear scaling in rows. Not included: evaluation passes (valid each epoch), "
              "larger embedding tables on the real data (dense Adam updates every row each step; "
              "`--set optimizer=lazy_adam` updates only the rows of the batch), and disk speed. The "
              "H100 column scales the straightforward-JAX DNN reference figure of "
              "../shared/BENCHMARKS.md (3.5M samples/s, not measured by us); a DPN epoch costs "
              "more (see dpn_cost_criteo.md for the CPU ratio)."]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps(measured, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
