"""Why do ``dien`` and ``dien_dpo`` score the same?  Knock-out probes on trained models.

    python experiments/dien_probe.py --data amazon_videogames --data-option max_users=12000

Table 5 gives ``dien_dpo`` the test AUC and logloss of ``dien`` to four decimals on every seed.
The DPO sits in DIEN's attention unit, whose scores only reach the prediction through the AUGRU's
final state.  This script trains each model once (the Table 5 protocol) and then measures, on the
test split, how much that path carries:

- ``zero interest``: the AUGRU's final state replaced by zeros before the tower;
- ``uniform attention``: the attention scores replaced by their row's mean over the valid steps
  (1/n for softmax scores; the same total spread evenly for ``attention_norm=sigmoid``), so the
  learned preferences between steps, the only place the DPO acts, are discarded;
- the attention scores themselves, each row divided by its sum: ``max score × n`` (1 = uniform)
  and the normalised entropy;
- how much the attention's input varies over the steps of a row: the interest states' spread
  ``sqrt(mean_t ||h_t − h̄||²) / ||h̄||`` over the valid steps (``h̄`` their mean; 0 = every step
  has the same state, so no attention, however trained, can prefer one step).

Writes ``experiments/results/dien_probe_<data>.md`` with the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax.data import load_dataset
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.models import build_model, model_options
from dpn_jax.nn.recurrent_layers import GRU
from dpn_jax.nn.sequence_layers import DINAttention
from dpn_jax.runner import versions
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.loop import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import table45  # noqa: E402  (Table 5's protocol)


def knockout(kind: str):
    """An interceptor that replaces the evolved interest or the attention scores."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if kind == "zero_interest" and isinstance(mod, GRU) and mod.name.startswith("evolution"):
            states, final = next_fun(*args, **kwargs)
            return states, jnp.zeros_like(final)
        if kind == "uniform_attention" and isinstance(mod, DINAttention) and context.method_name == "__call__":
            pooled, a = next_fun(*args, **kwargs)
            mask = jnp.asarray(args[2], a.dtype)
            mean = a.sum(-1, keepdims=True) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
            return pooled, mask * mean
        return next_fun(*args, **kwargs)

    return interceptor


def scores(net, variables, split, kind: str | None, batch_size: int = 4096):
    """Test logits (optionally under a knock-out) and the attention scores of every unit."""

    @jax.jit
    def run(variables, batch):  # variables as an argument: not baked into the program as constants
        def call():
            return net.apply(variables, batch, train=False, capture_intermediates=captured)

        if kind is None:
            return call()
        with nn.intercept_methods(knockout(kind)):
            return call()

    n = len(split["label"])
    logits, atts, spreads = [], [], []
    for i in range(0, n, batch_size):
        batch = {k: np.asarray(v[i:i + batch_size]) for k, v in split.items()}
        out, inter = run(variables, batch)
        logits.append(np.asarray(out))
        units = captured_units(inter["intermediates"])
        atts.append([np.asarray(a) for _, a in units])
        spreads += [state_spread(np.asarray(h), np.asarray(a) > 0) for h, a in units]
    return np.concatenate(logits), atts, np.concatenate(spreads)


def captured(module, method_name) -> bool:
    """What ``capture_intermediates`` keeps: the attention units and the interest extractors."""
    return isinstance(module, DINAttention) or (isinstance(module, GRU) and module.name.startswith("extractor"))


def captured_units(tree) -> list:
    """``(interest states, attention scores)`` of every attention unit ``g`` in
    ``capture_intermediates`` output: ``extractor_g`` stores ``((states, final),)`` and
    ``attention_g`` ``((pooled, scores),)`` under ``"__call__"``."""
    found = []
    for key, value in tree.items():
        if key.startswith("attention_") and "__call__" in value:
            states = tree[key.replace("attention_", "extractor_", 1)]["__call__"][0][0]
            found.append((states, value["__call__"][0][1]))
        elif hasattr(value, "items") and key != "__call__":  # a dict or flax FrozenDict
            found += captured_units(value)
    return found


def state_spread(h: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row with >= 2 valid steps: ``sqrt(mean_t ||h_t − h̄||²) / ||h̄||`` over its valid
    steps, ``h [B,T,H]``, ``valid [B,T]``."""
    h = np.asarray(h, np.float64)
    n = valid.sum(-1)
    mean = np.where(valid[..., None], h, 0).sum(1) / np.maximum(n, 1)[:, None]
    dev = np.where(valid, ((h - mean[:, None]) ** 2).sum(-1), 0).sum(-1) / np.maximum(n, 1)
    keep = n >= 2
    return np.sqrt(dev[keep]) / np.maximum(np.linalg.norm(mean[keep], axis=-1), 1e-30)


def attention_stats(atts) -> tuple[float, float]:
    """Mean of ``max score × n_valid`` and of the normalised entropy over rows with >= 2 steps,
    each row's scores divided by their sum (softmax rows already sum to 1)."""
    peaks, ents = [], []
    for batch_atts in atts:
        for a in batch_atts:
            valid = a > 0
            a = a / np.maximum(a.sum(-1, keepdims=True), 1e-30)
            n = valid.sum(-1)
            keep = n >= 2
            peaks.append((a.max(-1) * n)[keep])
            ent = -(np.where(valid, a * np.log(np.where(valid, a, 1.0)), 0.0)).sum(-1)
            ents.append((ent / np.log(np.maximum(n, 2)))[keep])
    return float(np.concatenate(peaks).mean()), float(np.concatenate(ents).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="amazon_videogames")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--data-option", dest="data_options", action="append", default=[])
    p.add_argument("--models", default="dien,dien_dpo")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a model or training option for every model, e.g. --set embedding_init_std=0.01")
    p.add_argument("--seed", type=int, default=2021)
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    options = table45.seeds.number_options(p, "--data-option", args.data_options)
    data = load_dataset(args.data, data_dir=args.data_dir, **options)
    test = data.test
    labels = np.asarray(test["label"])
    rows, logits_of = [], {}
    for name in args.models.split(","):
        train_kw, model_kw = split_overrides([*table45.PROTOCOL, *args.sets], model_options(name), name)
        cfg = TrainConfig(seed=args.seed, max_epochs=args.max_epochs, **train_kw)
        net = build_model(name, data.schema, **model_kw)
        res = fit(net, data, cfg, progress=False)
        variables = {"params": res.params, **({"batch_stats": res.batch_stats} if res.batch_stats else {})}
        base, atts, spread = scores(net, variables, test, None)
        logits_of[name] = base
        peak, ent = attention_stats(atts)
        row = {"model": name, "best epoch": res.best_epoch, "test AUC": auc(labels, base),
               "logloss": logloss_from_logits(labels, base), "peak": peak, "entropy": ent,
               "spread": float(np.median(spread)), "spread_p90": float(np.quantile(spread, 0.9))}
        for kind in ("zero_interest", "uniform_attention"):
            ko, _, _ = scores(net, variables, test, kind)
            row[kind] = auc(labels, ko)
        rows.append(row)
        print(row, flush=True)
    lines = [f"# DIEN knock-out probe: {data.name}, seed {args.seed}", "",
             f"Command: `python experiments/dien_probe.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             "", f"Protocol: `{' '.join(table45.PROTOCOL)}`, max_epochs {args.max_epochs}; options: {args.sets or 'defaults'}. Versions: {versions()}", "",
             "| model | best epoch | test AUC | logloss | AUC, final interest zeroed | AUC, uniform attention | "
             "max score × n | score entropy / log n | interest spread over steps, median (p90) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['best epoch']} | {r['test AUC']:.4f} | {r['logloss']:.4f} | "
                     f"{r['zero_interest']:.4f} | {r['uniform_attention']:.4f} | {r['peak']:.2f} | {r['entropy']:.3f} | "
                     f"{r['spread']:.3g} ({r['spread_p90']:.3g}) |")
    names = list(logits_of)
    if len(names) == 2:
        a, b = (logits_of[n] for n in names)
        lines += ["", f"`{names[0]}` vs `{names[1]}` test logits: max |difference| {np.abs(a - b).max():.4f}, "
                  f"correlation {np.corrcoef(a, b)[0, 1]:.5f}."]
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"dien_probe_{Path(args.data).stem}")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")  # not with_suffix: "std0.01" has a dot
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
