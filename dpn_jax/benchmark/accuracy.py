"""The accuracy side of the harness: our DNN and FuxiCTR's, same encoded arrays, same seeds, one run.

    dpn-jax bench --peer fuxictr --accuracy --data frappe --seeds 2021-2023 --out results/parity

Ours trains as one vmapped sweep over the seeds (:func:`dpn_jax.sweep_runner.train_seeds`, with
the library's defaults plus any ``--set``); FuxiCTR's DNN trains by its own ``BaseModel.fit`` in a
child process per seed (:mod:`dpn_jax.benchmark.peer_accuracy`), on the dataset loaded exactly as
``dpn-jax train --data`` loads it. The table gives each seed's test AUC for both, the paired
difference, and mean ± std.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from dpn_jax.benchmark.peer_accuracy import FUXICTR_DEFAULTS, train_isolated
from dpn_jax.data import load_dataset
from dpn_jax.errors import ConfigError
from dpn_jax.train.config import parse_value


def peer_options(sets: Sequence[str]) -> dict[str, Any]:
    """``["patience=3"]`` -> FuxiCTR peer options (keys of :data:`FUXICTR_DEFAULTS`), typed."""
    out = {}
    for item in sets:
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep or key not in FUXICTR_DEFAULTS:
            raise ConfigError(f"--peer-set {item!r}: expected key=value with key one of "
                              f"{sorted(FUXICTR_DEFAULTS)}")
        out[key] = parse_value(text, FUXICTR_DEFAULTS[key], key, "--peer-set")
    return out


def _mean_std(xs: Sequence[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def compare_accuracy(data: str, seeds: Sequence[int], *, sets: Sequence[str] = (),
                     peer_sets: Sequence[str] = (), data_dir: str | None = None,
                     log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Train ``dnn`` (ours, ``sets``) and FuxiCTR's DNN (``peer_sets``) on ``data`` for ``seeds``."""
    from dpn_jax.sweep_runner import train_seeds

    peer_kw = peer_options(peer_sets)
    dataset = load_dataset(data, data_dir=data_dir)
    log(f"data  {dataset.summary()}")
    ours = train_seeds("dnn", dataset, list(seeds), list(sets), data_name=data, progress=False,
                       log=lambda s: log(f"dpn-jax: {s}"))
    peer = []
    for seed in seeds:
        r = train_isolated(data, seed, data_dir=data_dir, **peer_kw)
        log(f"fuxictr seed {seed}: test auc {r['test_auc']:.4f} (best epoch {r['best_epoch']} of {r['epochs']})")
        peer.append(r)
    rows = [{"seed": s, "dpn_jax": o["test_auc"], "fuxictr": p["test_auc"],
             "diff": o["test_auc"] - p["test_auc"], "dpn_jax_best_epoch": o["best_epoch"],
             "fuxictr_best_epoch": p["best_epoch"], "dpn_jax_logloss": o["test_logloss"],
             "fuxictr_logloss": p["test_logloss"]} for s, o, p in zip(seeds, ours, peer)]
    return {"data": data, "seeds": list(seeds), "sets": list(sets), "peer_sets": list(peer_sets),
            "peer": peer[0]["peer"] if peer else "", "rows": rows,
            "dpn_jax_config": ours[0]["config"] if ours else {}, "peer_options": peer[0]["options"] if peer else {}}


def format_accuracy(result: dict[str, Any], command: str) -> str:
    rows = result["rows"]
    lines = [f"# Accuracy: dpn-jax's DNN vs FuxiCTR's DNN on {result['data']}", "",
             f"Command: `{command}`", "",
             f"Ours: `dnn` {' '.join(result['sets']) or '(library defaults)'}; peer: {result['peer']} "
             f"DNN by BaseModel.fit {' '.join(result['peer_sets']) or '(its defaults)'}; same encoded "
             "arrays and splits.", "",
             "| seed | dpn-jax test AUC | FuxiCTR test AUC | difference | best epochs (ours / FuxiCTR) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['dpn_jax']:.4f} | {r['fuxictr']:.4f} | {r['diff']:+.4f} | "
                     f"{r['dpn_jax_best_epoch']} / {r['fuxictr_best_epoch']} |")
    if rows:
        ours, peer, diff = ([r[k] for r in rows] for k in ("dpn_jax", "fuxictr", "diff"))
        lines.append(f"| mean ± std | {_mean_std(ours)} | {_mean_std(peer)} | {_mean_std(diff)} | |")
        wins = sum(d > 0 for d in diff)
        lines += ["", f"dpn-jax ahead on {wins} of {len(diff)} seeds; test logloss "
                  f"{_mean_std([r['dpn_jax_logloss'] for r in rows])} (ours) vs "
                  f"{_mean_std([r['fuxictr_logloss'] for r in rows])} (FuxiCTR)."]
    return "\n".join(lines) + "\n"
