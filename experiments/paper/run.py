"""Run one paper config (Table 1 setting, AFN protocol) on a GPU machine, with its published context.

    dpn-jax data download criteo_x1 --to DATA
    python experiments/paper/run.py experiments/paper/criteo_x1.yaml --data-dir DATA
    python experiments/paper/run.py experiments/paper/criteo_x1.yaml --dry-run   # the plan only

Every (model, seed) is trained by ``experiments/seeds.py`` (the seeds of one model as one vmapped
sweep) and kept under ``experiments/results/paper_<data>/runs/``, so an interrupted run resumes.
The table goes to ``experiments/results/paper_<data>.md`` followed by the published numbers the
config names (BARS leaderboard, the DPN paper's stated margins) for comparison.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

KEYS = ("data", "download", "seeds", "models", "protocol", "published")


def load_config(path: str | Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or set(cfg) - set(KEYS) or not {"data", "models", "seeds"} <= set(cfg):
        raise SystemExit(f"{path}: expected the keys {list(KEYS)} (data, models, seeds required)")
    return cfg


def published_section(cfg: dict) -> str:
    pub = cfg.get("published") or {}
    lines = ["", "## Published context (not run here)", "", f"Source: {pub.get('source', '-')}", ""]
    if pub.get("auc"):
        lines += ["| model | published test AUC |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in pub["auc"].items()]
    if pub.get("paper"):
        lines += ["", f"DPN paper: {pub['paper']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--data-dir", default=None, help="where `dpn-jax data download` put the files")
    p.add_argument("--seeds", default=None, help="override the config's seeds, e.g. 2021,2022")
    p.add_argument("--models", default=None, help="override the config's models, e.g. dnn,dpn")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the seeds.py call only")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    seeds_arg = args.seeds or ",".join(str(s) for s in cfg["seeds"])
    models = args.models.split(",") if args.models else list(cfg["models"])
    out = HERE.parent / "results" / f"paper_{cfg['data']}"
    forwarded = ["--data", cfg["data"], "--seeds", seeds_arg, "--out", str(out)]
    for s in cfg.get("protocol", []):
        forwarded += ["--protocol", s]
    if args.data_dir:
        forwarded += ["--data-dir", args.data_dir]
    for m in models:
        forwarded += ["--run", m]
    print(f"{cfg['data']}: {len(models)} models x {len(seeds_arg.split(','))} seeds; files: "
          f"{cfg.get('download', '-')}")
    print("python experiments/seeds.py " + " ".join(shlex.quote(a) for a in forwarded))
    if args.dry_run:
        print(published_section(cfg))
        return 0
    import seeds

    code = seeds.main(forwarded, command="python " + " ".join(shlex.quote(a) for a in sys.argv))
    with open(f"{out}.md", "a", encoding="utf-8") as fh:
        fh.write(published_section(cfg))
    return code


if __name__ == "__main__":
    sys.exit(main())
