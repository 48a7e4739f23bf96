"""The ``dpn-jax`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpn_jax.errors import DpnError

RESULT_KEYS = ("model", "data", "seed", "test_auc", "test_logloss", "valid_auc", "valid_logloss",
               "best_epoch", "epochs", "train_seconds", "train_samples_per_s", "num_params", "config")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpn-jax", description="Dynamic Parameterized Networks for CTR prediction.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model on one dataset and report test AUC/logloss")
    t.add_argument("--model", required=True, help="a registry name (see `dpn-jax models`)")
    t.add_argument("--data", required=True,
                   help="a built-in name (synthetic, frappe) or a dataset spec file (.yaml)")
    t.add_argument("--data-dir", default=None,
                   help="where built-in datasets live (default: $DPN_DATA_DIR, then ../shared/data)")
    t.add_argument("--cache-dir", default=None,
                   help="encoded-split cache (default: $DPN_CACHE_DIR or ~/.cache/dpn_jax)")
    t.add_argument("--seed", type=int, default=2021, help="model seed: init, dropout, data order")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training or model option, e.g. --set lr=3e-4 --set dropout=0.2")
    t.add_argument("--out", default=None, help="write results.json and the best parameters here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("models", help="list the model registry and each model's options")
    return p


def _cmd_train(args) -> int:
    from dpn_jax.runner import run_train

    results = run_train(args.model, args.data, seed=args.seed, sets=args.sets, out=args.out,
                        data_dir=args.data_dir, cache_dir=args.cache_dir,
                        progress=False if args.no_progress else None)
    print(json.dumps({k: results[k] for k in RESULT_KEYS if k in results}), flush=True)
    return 0


def _cmd_models(args) -> int:
    from dpn_jax.models import available_models, model_options, model_summary

    for name in available_models():
        opts = ", ".join(f"{k}={v}" for k, v in model_options(name).items())
        print(f"{name:14s} {model_summary(name)}\n{'':14s} options: {opts or '(none)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dpn_jax.train import xla_cache

    xla_cache.enable(Path(args.cache_dir) / "xla" if getattr(args, "cache_dir", None) else None)
    try:
        return {"train": _cmd_train, "models": _cmd_models}[args.command](args)
    except DpnError as err:
        print(f"dpn-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpn-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
