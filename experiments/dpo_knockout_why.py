"""Why does a trained ``dpn``'s feature DPO add so little?  Measurements on a bundle.

    PYTHONPATH=$PWD python experiments/dpo_knockout_why.py BUNDLE [--out experiments/results/NAME]

For the low-rank feature DPO ``dpo_0`` of a ``dpn`` bundle (``y = x ḃ + Σ_k h_k(z) x Ẇ_k``,
``h = relu(z Ŵ + b̂)``, ``x = z`` = the flattened embeddings) it reports, on the test split:

1. AUC trained / knocked out (``h -> 0``) / with ``h`` frozen at its test-split mean ``h̄`` (the
   generated kernel's constant part folded into the static kernel: what is left is the part
   that really varies with the instance);
2. the output norms of the static part, the constant generated part and the varying part;
3. the context scale (embedding RMS) and the generator's hidden units (pre-activation mean and
   std over rows, fraction of rows where each unit is active);
4. how far each parameter group moved from its initialisation (re-created from the seed);
5. the gradient RMS of each group at initialisation and at the trained point (a few train
   batches, train mode), against Adam's epsilon (1e-8): a gradient well below it makes Adam's
   step ``lr·g/(√v+ε)`` a fraction ``≈ |g|/ε`` of the learning rate instead of ``≈ 1``; and the
   cosine of the trained point's gradient with the parameters (≈ 0 for a group the loss is
   scale-invariant in, e.g. weights followed by BatchNorm: nothing pushes their norm).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpn_jax.analysis.evaluate import bundle_data, score_split
from dpn_jax.analysis.knockout import knockout_params
from dpn_jax.data import load_dataset
from dpn_jax.metrics import auc
from dpn_jax.nn.dpo_layers import FeatureDPO
from dpn_jax.serving.predictor import load

ADAM_EPS = 1e-8


def capture_dpo_inputs(model, variables, batch):
    got = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, FeatureDPO) and context.method_name == "__call__":
            got[tuple(context.module.path)] = args
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, batch, train=False)
    return got


def rms(a) -> float:
    a = np.asarray(a, np.float64)
    return float(np.sqrt(np.mean(a * a))) if a.size else float("nan")


def groups(params) -> dict[str, np.ndarray]:
    p = params["dpo_0"]
    out = {
        "embedding": np.asarray(params["embedding"]["table"]),
        "static kernel ḃ": np.asarray(p["kernel"][:, 0]),
        "generated kernels Ẇ": np.asarray(p["kernel"][:, 1:]),
        "hidden kernel Ŵ": np.asarray(p["hidden_kernel"]),
        "hidden bias b̂": np.asarray(p["hidden_bias"]),
    }
    for name in sorted(params):
        if name.startswith("dense_"):
            out[f"{name} kernel"] = np.asarray(params[name]["kernel"])
    return out


def grad_stats(model, variables, train, batches: int = 4, batch_size: int = 4096):
    """Per group over a few train batches (embedding: the rows the batches use): the gradient's
    RMS and its cosine with the parameters (``g·θ / ‖g‖‖θ‖``; 0 for a group the loss is
    scale-invariant in, such as weights followed by BatchNorm: their norm gets no gradient)."""

    def loss(params, batch):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                batch, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["label"]))

    g_fn = jax.jit(jax.grad(loss))
    theta = groups(variables["params"])
    acc: dict[str, list] = {}
    cos: dict[str, list] = {}
    for b in range(batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        batch = {k: jnp.asarray(v[sl]) for k, v in train.items()}
        g = groups(g_fn(variables["params"], batch))
        used = np.unique(np.asarray(train["cat"][sl]))
        g["embedding"] = g["embedding"][used]
        th = {**theta, "embedding": theta["embedding"][used]}
        for k, v in g.items():
            acc.setdefault(k, []).append(rms(v))
            gv, tv = np.ravel(v).astype(np.float64), np.ravel(th[k]).astype(np.float64)
            den = np.linalg.norm(gv) * np.linalg.norm(tv)
            cos.setdefault(k, []).append(float(gv @ tv / den) if den > 0 else float("nan"))
    return ({k: float(np.mean(v)) for k, v in acc.items()},
            {k: float(np.mean(v)) for k, v in cos.items()})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pred = load(args.bundle)
    model, variables = pred.model, pred.variables
    if pred.model_name != "dpn" or model.generator != "lowrank" or model.heads != 1:
        print("this script reads the single-head low-rank feature DPO of a dpn bundle", file=sys.stderr)
        return 2
    name, options = bundle_data(pred.bundle)
    ds = load_dataset(name, **options)
    test, train = ds.test, ds.train
    batch = int(pred.bundle.model_json.get("train", {}).get("eval_batch_size", 4096))
    seed = int(pred.bundle.model_json.get("seed", 2021))
    report: dict = {"bundle": args.bundle, "dataset": ds.name}

    # 1. AUC: trained, knocked out, h frozen at its mean
    p = variables["params"]
    x, z = capture_dpo_inputs(model, variables, {k: v for k, v in test.items() if k != "label"})[("dpo_0",)]
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    kern = np.asarray(p["dpo_0"]["kernel"], np.float64)
    k0, kdyn = kern[:, 0], kern[:, 1:]
    pre = z @ np.asarray(p["dpo_0"]["hidden_kernel"]) + np.asarray(p["dpo_0"]["hidden_bias"])
    h = np.maximum(pre, 0)
    hbar = h.mean(axis=0)
    frozen = kern.copy()
    frozen[:, 0] = k0 + np.einsum("k,mkn->mn", hbar, kdyn)
    frozen[:, 1:] = 0
    p_frozen = {**p, "dpo_0": {**p["dpo_0"], "kernel": jnp.asarray(frozen, jnp.float32)}}
    labels = np.asarray(test["label"])
    scores = {}
    for label, params in (("trained", p), ("knocked out (h = 0)", knockout_params(model, p)),
                          ("h frozen at its mean", p_frozen)):
        pred.variables = {**variables, "params": params}
        scores[label] = score_split(pred, test, batch)
    pred.variables = variables
    base = scores["trained"]
    report["auc"] = {k: auc(labels, v) for k, v in scores.items()}
    report["mean_abs_delta_logit"] = {k: float(np.mean(np.abs(v - base))) for k, v in scores.items()}
    report["logit_std"] = float(base.std())

    # 2. output norms
    ys = x @ k0
    yconst = x @ np.einsum("k,mkn->mn", hbar, kdyn)
    yvar = np.einsum("bm,mkn,bk->bn", x, kdyn, h - hbar)
    norm = lambda a: np.linalg.norm(a, axis=1)  # noqa: E731
    report["output_norm_ratio"] = {
        "constant generated / static": float(np.mean(norm(yconst) / norm(ys))),
        "varying generated / static": float(np.mean(norm(yvar) / norm(ys))),
    }

    # 3. context and hidden units
    report["context"] = {"embedding_rms_used": rms(z), "init_std": 1e-4, "z_norm_mean":
                         float(np.mean(np.linalg.norm(z, axis=1)))}
    report["hidden_units"] = [{"pre_mean": float(pre[:, k].mean()), "pre_std": float(pre[:, k].std()),
                               "active": float((pre[:, k] > 0).mean()), "h_mean": float(hbar[k]),
                               "h_std": float(h[:, k].std())} for k in range(h.shape[1])]

    # 4. movement from the initialisation (re-created as training draws it)
    first = {k: v[:8] for k, v in train.items() if k != "label"}
    init = model.init({"params": jax.random.key(seed, impl="rbg")}, first, train=False)
    g0, g1 = groups(init["params"]), groups(p)
    used = np.unique(np.asarray(train["cat"]))
    g0["embedding"], g1["embedding"] = g0["embedding"][used], g1["embedding"][used]
    report["params"] = {k: {"init_rms": rms(g0[k]), "trained_rms": rms(g1[k]),
                            "moved_rel": rms(g1[k] - g0[k]) / rms(g0[k]) if rms(g0[k]) > 0 else None}
                        for k in g0}

    # 5. gradients at init and at the trained point
    tr = {k: np.asarray(v) for k, v in train.items()}
    report["grad_rms_init"], _ = grad_stats(model, {"params": init["params"],
                                                   "batch_stats": init["batch_stats"]}, tr)
    report["grad_rms_trained"], report["grad_cos_trained"] = grad_stats(model, variables, tr)

    res = pred.bundle.results
    lines = [f"# Why the DPO adds little: `dpn` on {ds.name} ({args.bundle})", "",
             "Command: `PYTHONPATH=$PWD python experiments/dpo_knockout_why.py "
             + " ".join(sys.argv[1:]) + "`; the bundle: `dpn` seed "
             f"{res.get('seed')}, best epoch {res.get('best_epoch')}, train options "
             f"{ {k: v for k, v in res.get('config', {}).get('train', {}).items() if k in ('lr', 'batch_size', 'net_l2', 'embedding_l2')} }.", "",
             "| scoring | test AUC | mean abs Δ logit |", "|---|---:|---:|"]
    lines += [f"| {k} | {report['auc'][k]:.4f} | {report['mean_abs_delta_logit'][k]:.4f} |"
              for k in scores]
    lines += ["", f"Logit std {report['logit_std']:.3f}. Output norm ratios (mean over rows): "
              + ", ".join(f"{k} {v:.4f}" for k, v in report["output_norm_ratio"].items()) + ".", "",
              f"Context: embedding RMS (test rows) {report['context']['embedding_rms_used']:.4g} "
              f"(init std 1e-4), mean ‖z‖ {report['context']['z_norm_mean']:.4g}.", "",
              "| hidden unit | pre-act mean | pre-act std | active rows | h mean | h std |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {u['pre_mean']:.4g} | {u['pre_std']:.4g} | {u['active']:.3f} | "
              f"{u['h_mean']:.4g} | {u['h_std']:.4g} |" for k, u in enumerate(report["hidden_units"])]
    lines += ["", "| parameter group | init RMS | trained RMS | moved (RMS Δ / init RMS) | "
              "grad RMS at init | grad RMS trained | cos(grad, θ) trained |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in report["params"].items():
        moved = "- (init 0)" if v["moved_rel"] is None else f"{v['moved_rel']:.3g}"
        lines.append(f"| {k} | {v['init_rms']:.3g} | {v['trained_rms']:.3g} | {moved} | "
                     f"{report['grad_rms_init'][k]:.3g} | {report['grad_rms_trained'][k]:.3g} | "
                     f"{report['grad_cos_trained'][k]:+.3f} |")
    lines += ["", f"Adam's epsilon: {ADAM_EPS:g}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(f"{args.out}.md").write_text(text)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
