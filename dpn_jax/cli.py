"""The ``dpn-jax`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpn_jax.cli_data import add_data_parser, cmd_data
from dpn_jax.errors import DpnError

RESULT_KEYS = ("model", "data", "seed", "test_auc", "test_logloss", "valid_auc", "valid_logloss",
               "best_epoch", "epochs", "train_seconds", "train_samples_per_s", "num_params", "config")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpn-jax", description="Dynamic Parameterized Networks for CTR prediction.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one model on one dataset and report test AUC/logloss")
    t.add_argument("--model", required=True, help="a registry name (see `dpn-jax models`)")
    t.add_argument("--data", required=True,
                   help="a built-in name (synthetic, frappe, criteo, criteo_x1, avazu_x1, "
                        "movielens_latest_x1, amazon_grocery, amazon_electronics, ...; `dpn-jax data "
                        "list` and the README) or a dataset spec file (.yaml)")
    t.add_argument("--data-dir", default=None,
                   help="where built-in datasets live (default: $DPN_DATA_DIR, then ../shared/data)")
    t.add_argument("--cache-dir", default=None,
                   help="encoded-split cache (default: $DPN_CACHE_DIR or ~/.cache/dpn_jax)")
    t.add_argument("--seed", type=int, default=2021, help="model seed: init, dropout, data order")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training or model option, e.g. --set lr=3e-4 --set dropout=0.2")
    t.add_argument("--out", default=None,
                   help="write the model bundle here (results.json, parameters, encoders; see `predict`); "
                        "an existing OUT must hold this same run's earlier bundle (see --overwrite)")
    t.add_argument("--overwrite", action="store_true",
                   help="let --out replace a folder that is not this run's bundle (another run's "
                        "bundle, or a folder of other files: its results.json, model.json, ... are replaced)")
    t.add_argument("--checkpoint-dir", default=None,
                   help="write checkpoints here after every epoch (default: OUT/checkpoints with --out)")
    t.add_argument("--resume", action="store_true",
                   help="continue the newest checkpoint in --checkpoint-dir (or OUT/checkpoints)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scale_out_args(t)
    sub.add_parser("models", help="list the model registry and each model's options")
    _add_serving_parsers(sub)
    _add_sweep_parser(sub)
    _add_tune_parser(sub)
    add_data_parser(sub)
    _add_evaluate_parser(sub)
    return p


def _add_scale_out_args(t) -> None:
    g = t.add_argument_group("scaling out (README: Scaling out)")
    g.add_argument("--mesh", default=None, metavar="data=N,model=M",
                   help="train on a device mesh: batches split over data, embedding tables over model "
                        "(sizes multiply to the device count; default: one device)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's address and a free port (with --num-processes, --process-id)")
    g.add_argument("--num-processes", type=int, default=None, help="multi-process run: how many processes")
    g.add_argument("--process-id", type=int, default=None, help="multi-process run: this process, 0 .. P-1")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (TPU pod slices, SLURM, Open MPI detect the rest)")
    g.add_argument("--out-of-core", default=None, metavar="DIR",
                   help="stream the train split from .npy shards in DIR (written there on first use)")
    g.add_argument("--memory-budget-mb", type=float, default=512,
                   help="with --out-of-core: memory for the shuffle window and prefetched batches (default 512)")


def _cmd_train(args) -> int:
    from dpn_jax.train.distributed import initialize

    # Before anything touches a device: jax.distributed must come first.
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    from dpn_jax.runner import run_train

    results = run_train(args.model, args.data, seed=args.seed, sets=args.sets, out=args.out,
                        data_dir=args.data_dir, cache_dir=args.cache_dir,
                        progress=False if args.no_progress else None,
                        checkpoint_dir=args.checkpoint_dir, resume=args.resume, mesh=args.mesh,
                        out_of_core=args.out_of_core, memory_budget_mb=args.memory_budget_mb,
                        overwrite=args.overwrite)
    print(json.dumps({k: results[k] for k in RESULT_KEYS if k in results}), flush=True)
    return 0


def _cmd_models(args) -> int:
    from dpn_jax.models import available_models, model_options, model_summary

    for name in available_models():
        opts = ", ".join(f"{k}={v}" for k, v in model_options(name).items())
        print(f"{name:14s} {model_summary(name)}\n{'':14s} options: {opts or '(none)'}")
    return 0


# ----------------------------------------------------------------------------- serving


def _add_serving_parsers(sub) -> None:
    p = sub.add_parser("predict", help="score a csv/parquet file with a model bundle (streaming)")
    p.add_argument("--model", required=True, help="a bundle directory written by `train --out`")
    p.add_argument("--input", required=True, help="csv or parquet file with the spec's raw columns")
    p.add_argument("--output", required=True, help="output file: .csv or .parquet (by extension)")
    p.add_argument("--id-column", default=None, help="copy this input column to the output")
    p.add_argument("--batch-size", type=int, default=4096, help="rows read and scored at a time")
    p.add_argument("--sep", default=None, help="csv delimiter (default: the dataset spec's)")
    p.add_argument("--columns", default=None, metavar="NAMES",
                   help="the input csv has no header line: its columns, comma separated, '...' "
                        "for the model's raw columns in order (Criteo's train.txt: label,...)")
    e = sub.add_parser("export", help="serialise a bundle's scoring function with jax.export")
    e.add_argument("--model", required=True, help="a bundle directory written by `train --out`")
    e.add_argument("--out", required=True, help="output directory (load with dpn_jax.serving.load_exported)")
    e.add_argument("--platforms", default="cpu,cuda", help="comma-separated: cpu, cuda, rocm, tpu")
    b = sub.add_parser("bench", help="throughput/compile/memory/latency harness (with --peer fuxictr); "
                                     "--latency: serving latency, jit vs exported")
    b.add_argument("--latency", action="store_true", help="per-request latency, jit vs exported")
    b.add_argument("--models", default=None,
                   help="registry names (default: dnn,dpn,dpn_field,dcnv2,din,dien; dnn,dpn with --latency)")
    b.add_argument("--workloads", default=None, help="criteo, frappe, behaviour (default: each model's own)")
    b.add_argument("--optimizers", default="adam,lazy_adam",
                   help="adam, lazy_adam, lazy_adam_native (lazy_adam_kernel=native)")
    b.add_argument("--batch-size", type=int, default=4096, help="training batch")
    b.add_argument("--steps", type=int, default=20, help="timed train steps per row")
    b.add_argument("--grad-clip", type=float, default=0.0, help="global-norm clip in both libraries")
    b.add_argument("--peer", default=None, choices=["fuxictr"], help="time FuxiCTR's PyTorch layers too")
    b.add_argument("--replicas", type=int, default=0, help="also time this many vmapped replicas")
    b.add_argument("--scan", type=int, default=1, help="also time this many train steps per dispatch (lax.scan)")
    b.add_argument("--matmul-dtypes", default="float32",
                   help="also time the models that have the option with these Dense products: "
                        "float32, bfloat16, bfloat16_mkl (comma separated)")
    b.add_argument("--rounds", type=int, default=1,
                   help="time the training rows this many times in turn; each keeps its median")
    b.add_argument("--loop", action="store_true",
                   help="also time the training loop (fit on a generated dataset of --steps batches "
                        "per epoch) beside the step it runs")
    b.add_argument("--steps-per-dispatch", default="1,8", metavar="K,...",
                   help="--loop: train steps per dispatch to time (comma separated)")
    b.add_argument("--data-on-device", default="false,true", metavar="false,true",
                   help="--loop: data placements to time: false (host, put ahead), true (on the device)")
    b.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    b.add_argument("--bundle", default=None, help="--latency: this bundle's model instead of --models")
    b.add_argument("--batches", default=None, help="request sizes (default 1,64,4096; 1,16,256 with --latency)")
    b.add_argument("--requests", type=int, default=None, help="timed requests per cell (default 50; 300 with --latency)")
    a = b.add_argument_group("accuracy (--peer fuxictr --accuracy): our DNN and FuxiCTR's on the same arrays")
    a.add_argument("--accuracy", action="store_true",
                   help="train both DNNs to early stopping on --data and compare test AUC per seed")
    a.add_argument("--data", default=None, help="--accuracy: a built-in dataset or a spec file")
    a.add_argument("--data-dir", default=None, help="--accuracy: where built-in datasets live")
    a.add_argument("--seeds", default="2021-2023", help="--accuracy: seeds, e.g. 2021-2025")
    a.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="--accuracy: an option of our dnn (e.g. --set protocol=fuxictr)")
    a.add_argument("--peer-set", dest="peer_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="--accuracy: an option of FuxiCTR's DNN (lr, patience, embedding_l2, ...)")


def _cmd_predict(args) -> int:
    from dpn_jax.serving.predictor import load
    from dpn_jax.serving.stream import predict_file

    summary = predict_file(load(args.model), args.input, args.output, id_column=args.id_column,
                           batch_size=args.batch_size, sep=args.sep, columns=args.columns)
    print(json.dumps(summary), flush=True)
    return 0


def _cmd_export(args) -> int:
    from dpn_jax.serving.export import export_bundle

    meta = export_bundle(args.model, args.out, [x for x in args.platforms.split(",") if x])
    print(json.dumps({"out": args.out, "model": meta["model"], "platforms": meta["platforms"],
                      "program_bytes": meta["program_bytes"]}), flush=True)
    return 0


def _csv(text: str | None, default: str) -> list[str]:
    return [x for x in (text or default).split(",") if x]


def _ints(text: str, flag: str) -> list[int]:
    from dpn_jax.errors import ConfigError

    try:
        return [int(x) for x in _csv(text, "")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers like 1,8") from None


def _cmd_bench(args) -> int:
    from dpn_jax.errors import ConfigError

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        batches = [int(x) for x in _csv(args.batches, "1,16,256" if args.latency else "1,64,4096")]
    except ValueError:
        raise ConfigError(f"--batches {args.batches!r}: expected comma-separated integers like 1,16,256") from None
    if args.accuracy:
        return _bench_accuracy(args, log)
    if args.latency:
        from dpn_jax.benchmark.harness import machine, run_latency
        from dpn_jax.serving.latency import device_name, format_table

        requests = args.requests or 300
        rows = run_latency(_csv(args.models, "dnn,dpn"), batches, requests, args.bundle, log=log)
        text = f"latency per request on {device_name()}, {requests} requests per cell\n{format_table(rows)}"
        print(text)
        if args.out:
            command, host = _bench_command(), machine()
            _write_out(args.out, f"# Serving latency\n\nCommand: `{command}`\n\nMachine: {host}\n\n{text}\n",
                       {"rows": rows, "machine": host, "requests": requests, "command": command})
        return 0
    from dpn_jax.benchmark.harness import DEFAULT_MODELS, format_markdown, run_bench

    if args.bundle:
        raise ConfigError("--bundle goes with --latency; the harness builds fresh models (--models)")
    result = run_bench(_csv(args.models, ",".join(DEFAULT_MODELS)),
                       workloads=_csv(args.workloads, "") or None, optimizers=_csv(args.optimizers, "adam"),
                       batch_size=args.batch_size, steps=args.steps, peer=args.peer,
                       grad_clip=args.grad_clip, latency_batches=batches, requests=args.requests or 50,
                       replicas=args.replicas, scan=args.scan,
                       matmul_dtypes=_csv(args.matmul_dtypes, "float32"), rounds=args.rounds,
                       loop=args.loop, steps_per_dispatch=_ints(args.steps_per_dispatch, "--steps-per-dispatch"),
                       data_on_device=_csv(args.data_on_device, "false,true"), log=log)
    return _report(args.out, result, format_markdown)


def _bench_accuracy(args, log) -> int:
    from dpn_jax.benchmark import peer_fuxictr
    from dpn_jax.benchmark.accuracy import compare_accuracy, format_accuracy
    from dpn_jax.errors import ConfigError
    from dpn_jax.sweep_runner import parse_seeds

    if args.peer != "fuxictr" or not args.data:
        raise ConfigError("--accuracy compares with a peer on data: add --peer fuxictr --data NAME")
    why = peer_fuxictr.available()
    if why:
        raise ConfigError(f"--peer fuxictr: {why}")
    result = compare_accuracy(args.data, parse_seeds(args.seeds), sets=args.sets, peer_sets=args.peer_sets,
                              data_dir=args.data_dir, log=log)
    return _report(args.out, result, format_accuracy)


def _report(out: str | None, result: dict, format_fn) -> int:
    """Print a bench result as Markdown headed by its command; with ``--out`` also write
    ``OUT.md`` and ``OUT.json``."""
    command = _bench_command()
    text = format_fn(result, command)
    print(text)
    if out:
        _write_out(out, text, {**result, "command": command})
    return 0


def _bench_command() -> str:
    """The command line that ran, as written into the results."""
    return "dpn-jax " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "python " + " ".join(sys.argv)


def _write_out(out: str, markdown: str, record: dict) -> None:
    """``OUT.md`` and ``OUT.json`` (suffixes appended: ``OUT`` may hold a dot, as in ``lr1e-3.5``)."""
    from dpn_jax.atomic import write_text

    out_path = Path(out)
    write_text(f"{out_path}.md", markdown)
    write_text(f"{out_path}.json", json.dumps(record, indent=1, default=str))
    print(f"wrote {out_path}.md and {out_path}.json", file=sys.stderr)


SERVING_COMMANDS = {"predict": _cmd_predict, "export": _cmd_export, "bench": _cmd_bench}


# ----------------------------------------------------------------------------- sweeps


def _add_sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="train seeds × a hyper-parameter grid as vmapped replicas")
    s.add_argument("--model", required=True, help="a registry name (see `dpn-jax models`)")
    s.add_argument("--data", required=True, help="a built-in name or a dataset spec file (.yaml)")
    s.add_argument("--seeds", default="2021-2025", help="e.g. 2021-2025 or 2021,2022 (default 2021-2025)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to sweep, e.g. --grid lr=1e-3,3e-4 --grid embedding_l2=0,1e-5; "
                        "lr, embedding_l2, net_l2, grad_clip and dropout share one program")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an option fixed for every replica")
    s.add_argument("--out", default=None, help="write sweep.md / sweep.json here (and resume from it)")
    s.add_argument("--max-replicas", type=int, default=None, help="at most this many replicas per program")
    s.add_argument("--data-dir", default=None, help="where built-in datasets live")
    s.add_argument("--cache-dir", default=None, help="encoded-split cache")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_sweep(args) -> int:
    import shlex

    from dpn_jax.sweep_runner import parse_grid, parse_seeds, run_sweep

    command = "dpn-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    summary = run_sweep(args.model, args.data, seeds=parse_seeds(args.seeds), grid=parse_grid(args.grid),
                        sets=args.sets, out=args.out, data_dir=args.data_dir, cache_dir=args.cache_dir,
                        progress=False if args.no_progress else None, max_replicas=args.max_replicas,
                        command=command)
    print(summary["markdown"], flush=True)
    return 0


def _add_tune_parser(sub) -> None:
    t = sub.add_parser("tune", help="the same tuning budget for any model: search on validation AUC "
                                    "over tuning seeds, report the best on fresh seeds' test")
    t.add_argument("--model", required=True, help="a registry name (see `dpn-jax models`)")
    t.add_argument("--data", default=None, help="a built-in name or a dataset spec file (.yaml)")
    t.add_argument("--space", default=None, metavar="YAML",
                   help="the search space (docs/guide/sweeps.md); default: the model family's "
                        "(print it with --show-space)")
    t.add_argument("--show-space", action="store_true", help="print the model's default space as YAML and exit")
    t.add_argument("--search", default="random", choices=["random", "grid"],
                   help="random (default): --trials draws; grid: every combination of values lists")
    t.add_argument("--trials", type=int, default=None, help="random search: how many trials (default 20)")
    t.add_argument("--search-seed", type=int, default=0, help="seed of the random draws (default 0)")
    t.add_argument("--seeds", default="2021-2023", help="tuning seeds, each trial trains on all (default 2021-2023)")
    t.add_argument("--select-seeds", type=int, default=None, metavar="K",
                   help="cheaper: every trial on the first K tuning seeds, the best --select-top on the rest")
    t.add_argument("--select-top", type=int, default=None, metavar="N",
                   help="with --select-seeds: trials that go on (default: a quarter, at least 2)")
    t.add_argument("--final-seeds", default=None,
                   help="fresh seeds for the selected configuration (default: the 5 after --seeds)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an option fixed for every trial (a space option of the same key wins)")
    t.add_argument("--out", default=None,
                   help="write tune.md / tune.json / tune.png and the stages here (rerun to resume)")
    t.add_argument("--max-replicas", type=int, default=None, help="at most this many replicas per program")
    t.add_argument("--data-dir", default=None, help="where built-in datasets live")
    t.add_argument("--cache-dir", default=None, help="encoded-split cache")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_tune(args) -> int:
    import shlex

    from dpn_jax.errors import ConfigError
    from dpn_jax.sweep_runner import parse_seeds

    if args.show_space:
        from dpn_jax.tune_spaces import default_space, families, space_yaml

        print(f"# default space of {args.model} (families: {', '.join(families(args.model))})")
        print(space_yaml(default_space(args.model)), end="", flush=True)
        return 0
    missing = [flag for flag, v in (("--data", args.data), ("--out", args.out)) if v is None]
    if missing:
        raise ConfigError(f"tune needs {' and '.join(missing)} (the tune's results and its resume "
                          "state live in --out)")
    from dpn_jax.tuning import run_tune

    command = "dpn-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["tune"] else None
    final = parse_seeds(args.final_seeds, "--final-seeds") if args.final_seeds else None
    report = run_tune(args.model, args.data, out=args.out, space=args.space, search=args.search,
                      trials=args.trials, search_seed=args.search_seed, seeds=parse_seeds(args.seeds),
                      select_seeds=args.select_seeds, select_top=args.select_top, final_seeds=final,
                      sets=args.sets, data_dir=args.data_dir, cache_dir=args.cache_dir,
                      progress=False if args.no_progress else None, max_replicas=args.max_replicas,
                      command=command)
    print(report["markdown"], flush=True)
    return 0


# ----------------------------------------------------------------------------- evaluation


def _add_evaluate_parser(sub) -> None:
    v = sub.add_parser("evaluate", help="score a bundle on its data's test split: AUC per frequency "
                                        "bucket of a field (--by-frequency; paper Table 3), or "
                                        "with the DPO's dynamic part knocked out (--knockout dpo)")
    v.add_argument("bundle", help="a bundle directory written by `train --out`")
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("--by-frequency", metavar="FIELD",
                      help="a categorical field: rows are bucketed by how often their value occurs in train")
    what.add_argument("--knockout", choices=["dpo"],
                      help="dpo: rescore with every DPO layer reduced to its static part (its generated "
                           "weights zeroed); prints AUC/logloss with and without, the mean |Δ logit| "
                           "and each DPO layer's dynamic share")
    v.add_argument("--buckets", default=None, metavar="SPEC",
                   help="training-count buckets, e.g. 0,1-5,6-20,21+ (default 0,1-5,6-20,21-50,51+; "
                        "0 = unseen in train or OOV)")
    v.add_argument("--split", default="test", choices=["test", "valid"], help="split to score (default test)")
    v.add_argument("--data", default=None,
                   help="a built-in name or a dataset spec (.yaml) (default: the bundle's own data)")
    v.add_argument("--data-dir", default=None, help="where built-in datasets live")
    v.add_argument("--cache-dir", default=None, help="encoded-split cache")
    v.add_argument("--out", default=None,
                   help="write by_frequency.md, .json and .png (knockout.md, .json) here")


def _cmd_evaluate(args) -> int:
    import shlex

    from dpn_jax.analysis.evaluate import evaluate_bundle, render_report, write_report

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report = evaluate_bundle(args.bundle, args.by_frequency, data=args.data, data_dir=args.data_dir,
                             cache_dir=args.cache_dir, split=args.split, buckets=args.buckets, log=log)
    if sys.argv[1:2] == ["evaluate"]:
        report["markdown"] = render_report(report, "dpn-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(report["markdown"], flush=True)
    if args.out:
        for path in write_report(report, args.out, log=log):
            log(f"wrote {path}")
    return 0


def _cmd_knockout(args) -> int:
    import shlex

    from dpn_jax.analysis.knockout import knockout_report, render_report, write_report
    from dpn_jax.errors import ConfigError

    if args.buckets is not None:
        raise ConfigError("--buckets applies to --by-frequency only, not to --knockout")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report = knockout_report(args.bundle, args.split, args.knockout, data=args.data,
                             data_dir=args.data_dir, cache_dir=args.cache_dir, log=log)
    if sys.argv[1:2] == ["evaluate"]:
        report["markdown"] = render_report(report, "dpn-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(report["markdown"], flush=True)
    if args.out:
        for path in write_report(report, args.out):
            log(f"wrote {path}")
    return 0


def _cmd_evaluate_any(args) -> int:
    return _cmd_knockout(args) if args.knockout else _cmd_evaluate(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dpn_jax.train import xla_cache

    if args.command not in ("bench", "data"):  # bench reports compile time; data compiles nothing
        xla_cache.enable(Path(args.cache_dir) / "xla" if getattr(args, "cache_dir", None) else None)
    try:
        return {"train": _cmd_train, "models": _cmd_models, **SERVING_COMMANDS,
                "sweep": _cmd_sweep, "tune": _cmd_tune, "data": cmd_data, "evaluate": _cmd_evaluate_any}[args.command](args)
    except DpnError as err:
        print(f"dpn-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpn-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
