"""Why gradient clipping at 10 matters for the DNN: the global gradient norm, step by step.

    python experiments/grad_norms.py --data frappe --seed 2021 --epochs 8 \
        --out experiments/results/grad_norms_frappe

Trains ``dnn`` with the library's train step (``grad_clip=0``, so nothing is clipped) and, before
every step, measures the gradient of the same loss on the same batch: its global norm and the
norms of its parts (embedding table, first Dense kernel, the rest). Writes per-epoch medians and
maxima, and the share of steps whose global norm exceeds 10 (the steps a ``grad_clip=10`` run
would have scaled down), with the command, to ``<out>.md`` / ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpn_jax.data import batches, load_dataset
from dpn_jax.models import build_model
from dpn_jax.runner import versions
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.engine import example_batch
from dpn_jax.train.state import bce_with_logits, init_state, make_optimizer, make_train_step


def part_of(path) -> str:
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[-1] in ("table", "numeric"):
        return "embedding"
    if keys[-1] == "kernel" and any("Dense_0" in k or k == "dense_0" for k in keys):
        return "first_dense"
    return "rest"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="frappe")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=2021)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    data = load_dataset(args.data, data_dir=args.data_dir)
    model = build_model("dnn", data.schema)
    cfg = TrainConfig(seed=args.seed, grad_clip=0.0)
    tx = make_optimizer(cfg)
    state = init_state(model, example_batch(data.train), cfg, tx)
    step = jax.jit(make_train_step(model, cfg, tx))

    @jax.jit
    def norms(state, batch):
        def loss(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, _ = model.apply(variables, batch, train=True,
                                    rngs={"dropout": jax.random.fold_in(state.rng, state.step)},
                                    mutable=["batch_stats"])
            return jnp.mean(bce_with_logits(logits, batch["label"]))

        grads = jax.grad(loss)(state.params)
        parts: dict[str, jnp.ndarray] = {}
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            k = part_of(path)
            parts[k] = parts.get(k, 0.0) + jnp.sum(jnp.square(g))
        return optax.global_norm(grads), {k: jnp.sqrt(v) for k, v in parts.items()}

    rows = []
    for epoch in range(1, args.epochs + 1):
        glob, parts = [], {}
        for batch in batches(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch):
            n, ps = norms(state, batch)
            glob.append(float(n))
            for k, v in ps.items():
                parts.setdefault(k, []).append(float(v))
            state, _ = step(state, batch)
        g = np.asarray(glob)
        rows.append({"epoch": epoch, "steps": len(g), "median": float(np.median(g)), "max": float(g.max()),
                     "share_above_10": float(np.mean(g > 10)),
                     **{f"{k}_median": float(np.median(v)) for k, v in parts.items()}})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    keys = sorted(k for k in rows[0] if k.endswith("_median") and k != "median")
    lines = [f"# Global gradient norm per step: dnn on {args.data}, seed {args.seed}, no clipping", "",
             f"Command: `{command}`", "", f"Versions: {json.dumps(versions())}", "",
             "| epoch | steps | median norm | max norm | share of steps > 10 | " + " | ".join(keys) + " |",
             "|---" * (5 + len(keys)) + "|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['steps']} | {r['median']:.2f} | {r['max']:.2f} | "
                     f"{r['share_above_10']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    with open(f"{args.out}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{args.out}.json", "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
