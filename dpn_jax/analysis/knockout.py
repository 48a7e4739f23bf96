"""What the DPO contributes: knock out its dynamic (generated) part and rescore.

Every DPO layer computes ``y = W(z) x + b(z)`` with weights that split into a static part and a
part generated from the context (:mod:`dpn_jax.dpo.static`).  The knock-out replaces each DPO
layer's parameters by :func:`dpn_jax.dpo.static.static_part` of them, so every layer reduces
exactly to its static part for every input while the rest of the trained network is unchanged.

* :func:`dpo_layers` -- the DPO layers of a model (feature, field and sequence DPOs, found by
  tracing the model once on an empty batch);
* :func:`knockout_params` -- the parameters with every DPO layer's dynamic part zeroed;
* :func:`dynamic_share` -- per DPO layer, ``‖y − y_static‖ / ‖y_static‖`` on the layer's own
  inputs (the generated part's output over the static part's), averaged over the rows of a split;
* :func:`knockout_report` -- for a bundle (``dpn-jax evaluate BUNDLE --knockout dpo``): AUC and
  logloss with and without the dynamic part, the mean ``|Δ logit|`` against the logits' std, and
  the dynamic share per layer.

A knock-out that changes nothing means the generated part is dead; a large drop means the
network relies on it (the rest of the network was trained together with it, so the drop bounds
its contribution from above, it does not measure the static network's best accuracy).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax import atomic
from dpn_jax.data import padded_batches
from dpn_jax.data.schema import empty_arrays
from dpn_jax.dpo.static import PARAMS_TYPES, generator_family, static_part
from dpn_jax.errors import ConfigError, DataError
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.nn.dpo_layers import FeatureDPO, FieldDPO, flat_params, named_params
from dpn_jax.nn.sequence_layers import DynamicConv, QueryBehaviourDPO

KINDS = ("dpo",)
DPO_MODULES = (FeatureDPO, FieldDPO, QueryBehaviourDPO, DynamicConv)

__all__ = ["KINDS", "DpoLayer", "dpo_layers", "dynamic_share", "knockout_params",
           "knockout_report", "render_report", "write_report"]


@dataclasses.dataclass(frozen=True)
class DpoLayer:
    """One DPO layer of a model: where its params live, what it is, and an unbound copy of the
    module (``module.apply({"params": p}, *inputs)`` evaluates it alone)."""

    path: tuple[str, ...]
    kind: str  # "feature", "field (sum)", "query-behaviour", "behaviour-behaviour", ...
    family: str  # a key of dpn_jax.dpo.static.PARAMS_TYPES
    module: nn.Module

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _describe(module: nn.Module) -> tuple[str, str]:
    if isinstance(module, DynamicConv):
        return "behaviour-behaviour (dynamic conv)", "dynamic_conv"
    family = generator_family(module.generator, module.heads)
    if isinstance(module, FieldDPO):
        return f"field ({module.aggregation})", family
    if isinstance(module, QueryBehaviourDPO):
        return "query-behaviour" + (" (DIN features)" if module.din_features else ""), family
    if type(module).__name__ == "FieldContextDPO":
        return "feature (other-field contexts)", family
    return "feature", family


def model_name(model: nn.Module) -> str:
    """The registry name of a model (its class name if it is not registered)."""
    from dpn_jax.models import available_models, get_model_class

    for name in available_models():
        if get_model_class(name) is type(model):
            return name
    return type(model).__name__


def dpo_layers(model: nn.Module, example: Mapping[str, Any] | None = None) -> list[DpoLayer]:
    """The DPO layers of ``model`` in call order, found by tracing ``model.init`` (shapes only) on
    ``example`` (default: one empty row of ``model.schema``)."""
    if example is None:
        example = {k: v for k, v in empty_arrays(1, model.schema).items() if k != "label"}
    found: dict[tuple[str, ...], DpoLayer] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, DPO_MODULES) \
                and tuple(mod.path) not in found:
            kind, family = _describe(mod)
            found[tuple(mod.path)] = DpoLayer(tuple(mod.path), kind, family,
                                              mod.clone(parent=None))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), dict(example), train=False))
    return list(found.values())


def _subtree(params: Mapping[str, Any], path: tuple[str, ...], what: str) -> Mapping[str, Any]:
    node = params
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"{what}: the parameters have no entry {'/'.join(path[:i + 1])!r}; "
                              "are they this model's?")
        node = node[key]
    return node


def _replace(params: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = dict(params)
    out[path[0]] = value if len(path) == 1 else _replace(params[path[0]], path[1:], value)
    return out


def no_dpo_error(name: str) -> ConfigError:
    kinds = ", ".join(m.__name__ for m in DPO_MODULES)
    return ConfigError(f"model {name!r} has no DPO layer ({kinds}): nothing to knock out")


def knockout_params(model: nn.Module, params: Mapping[str, Any], kind: str = "dpo", *,
                    layers: list[DpoLayer] | None = None) -> dict[str, Any]:
    """``params`` (the ``"params"`` collection) with every DPO layer's dynamic part zeroed
    (:func:`dpn_jax.dpo.static.static_part`), everything else untouched."""
    if kind not in KINDS:
        raise ConfigError(f"knock-out {kind!r}: expected one of {list(KINDS)}")
    layers = dpo_layers(model) if layers is None else layers
    if not layers:
        raise no_dpo_error(model_name(model))
    out = dict(params)
    for layer in layers:
        sub = _subtree(params, layer.path, f"DPO layer {layer.name} of {model_name(model)!r}")
        named = named_params(PARAMS_TYPES[layer.family], sub)
        out = _replace(out, layer.path, {**sub, **flat_params(static_part(named))})
    return out


# ----------------------------------------------------------------------------- dynamic share


def _share_step(model: nn.Module, layers: list[DpoLayer]) -> Callable:
    """Jitted ``(variables, knocked-out params, batch) -> {layer: (‖dyn‖², ‖static‖²) per row}``:
    the model runs once; each DPO layer's inputs are re-applied to its static part alone."""
    by_path = {layer.path: layer for layer in layers}

    def step(variables, ko_params, batch):
        calls: dict[tuple[str, ...], list] = {p: [] for p in by_path}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, DPO_MODULES) \
                    and tuple(mod.path) in calls:
                calls[tuple(mod.path)].append((args, kwargs, out))
            return out

        with nn.intercept_methods(record):
            model.apply(variables, batch, train=False)
        rows = batch["cat"].shape[0]
        result = {}
        for path, layer in by_path.items():
            dyn = st = jnp.zeros((rows,), jnp.float32)
            sub = _subtree(ko_params, path, layer.name)
            for args, kwargs, out in calls[path]:
                static = layer.module.apply({"params": sub}, *args, **kwargs)
                if static.shape[0] != rows:
                    raise ConfigError(f"DPO layer {layer.name}: output {static.shape} has no "
                                      f"leading batch axis of {rows} rows")
                dyn = dyn + jnp.sum(jnp.square(out - static).reshape(rows, -1), axis=1)
                st = st + jnp.sum(jnp.square(static).reshape(rows, -1), axis=1)
            result[layer.name] = (dyn, st)
        return result

    return jax.jit(step)


def dynamic_share(model: nn.Module, variables: Mapping[str, Any], split: Mapping[str, Any], *,
                  batch_size: int = 4096, layers: list[DpoLayer] | None = None
                  ) -> list[dict[str, Any]]:
    """Per DPO layer of ``model``, on the rows of ``split`` (encoded arrays):

    ``share``: the mean over rows of ``‖y − y_static‖ / ‖y_static‖`` (``y`` the layer's output
    on that row -- all its fields or steps --, ``y_static`` its static part's output on the same
    inputs; rows whose static output is 0, an empty history, are left out); ``share_rms``:
    ``sqrt(Σ‖y − y_static‖² / Σ‖y_static‖²)`` over the split; ``rows`` counted."""
    layers = dpo_layers(model) if layers is None else layers
    if not layers:
        raise no_dpo_error(model_name(model))
    ko = knockout_params(model, variables["params"], layers=layers)
    step = _share_step(model, layers)
    dyn: dict[str, list] = {layer.name: [] for layer in layers}
    st: dict[str, list] = {layer.name: [] for layer in layers}
    for batch in padded_batches(dict(split), batch_size):
        real = batch.pop("mask") > 0
        batch.pop("label", None)
        for name, (d, s) in step(dict(variables), ko, batch).items():
            dyn[name].append(np.asarray(d, np.float64)[real])
            st[name].append(np.asarray(s, np.float64)[real])
    out = []
    for layer in layers:
        d, s = np.concatenate(dyn[layer.name]), np.concatenate(st[layer.name])
        keep = s > 0
        ratio = np.sqrt(d[keep] / s[keep])
        out.append({
            "layer": layer.name, "kind": layer.kind, "family": layer.family,
            "share": float(ratio.mean()) if ratio.size else None,
            "share_rms": float(np.sqrt(d.sum() / s.sum())) if s.sum() > 0 else None,
            "rows": int(keep.sum()),
        })  # fmt: skip
    return out


# ----------------------------------------------------------------------------- bundles


def _load_split(bundle, data: str | None, data_dir: str | None, cache_dir: str | None, split: str,
                log: Callable[[str], None]):
    """The bundle's data (``data`` overrides it), checked to have the bundle's encoding."""
    from dpn_jax.analysis.evaluate import bundle_data
    from dpn_jax.data import load_dataset
    from dpn_jax.serving.bundle import encoders_for

    trained_on, options = bundle_data(bundle)
    source = data or trained_on
    if data is None:
        ds = load_dataset(source, data_dir=data_dir, cache_dir=cache_dir, **options)
    else:
        ds = load_dataset(source, data_dir=data_dir, cache_dir=cache_dir)
    canon = lambda s: json.dumps(s.to_json(), sort_keys=True, default=str)  # noqa: E731
    if canon(ds.schema) != canon(bundle.schema):
        raise DataError(f"dataset {source!r} is not the bundle's: its fields differ from those "
                        f"{bundle.model!r} was trained on ({trained_on!r})")
    try:
        same = canon(encoders_for(ds)) == canon(bundle.encoders)
    except DataError:
        same = True  # no fitted encoders to compare: the schema matched
    if not same:
        raise DataError(f"dataset {source!r} has the bundle's fields but other vocabularies or "
                        f"bucket edges than {trained_on!r}; ids would not match")
    log(f"data  {ds.summary()}")
    return source, ds.name, getattr(ds, split)


def knockout_report(bundle_dir: str | Path, split: str = "test", kind: str = "dpo", *,
                    data: str | None = None, data_dir: str | None = None,
                    cache_dir: str | None = None, batch_size: int | None = None,
                    log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Score ``split`` of the bundle's data with the trained model and with its DPO layers
    reduced to their static parts; see the module doc.  The "with" row is scored exactly as
    training evaluated (its AUC is the bundle's recorded one)."""
    from dpn_jax.serving.bundle import read_bundle
    from dpn_jax.serving.predictor import Predictor
    from dpn_jax.train.loop import predict_logits
    from dpn_jax.train.state import make_predict

    if split not in ("test", "valid"):
        raise ConfigError(f"--split {split!r}: choose test or valid")
    if kind not in KINDS:
        raise ConfigError(f"--knockout {kind!r}: expected one of {list(KINDS)}")
    bundle = read_bundle(bundle_dir)
    predictor = Predictor.from_bundle(bundle)
    model, variables = predictor.model, predictor.variables
    layers = dpo_layers(model)
    if not layers:
        raise ConfigError(f"{bundle.path}: model {bundle.model!r} has no DPO layer "
                          f"({', '.join(m.__name__ for m in DPO_MODULES)}): nothing to knock out")
    source, dataset, part = _load_split(bundle, data, data_dir, cache_dir, split, log)
    batch = batch_size or int(bundle.model_json.get("train", {}).get("eval_batch_size", 4096))
    ko = knockout_params(model, variables["params"], kind, layers=layers)
    predict = jax.jit(make_predict(model))
    stats = variables.get("batch_stats") or {}
    part = {k: v for k, v in part.items()}
    logits = predict_logits(predict, variables["params"], stats, part, batch)
    ko_logits = predict_logits(predict, ko, stats, part, batch)
    labels = np.asarray(part["label"])
    log(f"knock-out  scored {labels.size:,} rows; measuring the dynamic share of {len(layers)} "
        f"DPO layer(s)")
    shares = dynamic_share(model, variables, part, batch_size=batch, layers=layers)
    delta = np.asarray(ko_logits, np.float64) - np.asarray(logits, np.float64)
    with_ = {"auc": auc(labels, logits), "logloss": logloss_from_logits(labels, logits)}
    without = {"auc": auc(labels, ko_logits), "logloss": logloss_from_logits(labels, ko_logits)}
    report = {
        "bundle": str(bundle.path), "model": bundle.model, "data": str(source), "dataset": dataset,
        "split": split, "knockout": kind, "rows": int(labels.size),
        "recorded_auc": bundle.results.get(f"{split}_auc"),
        "with": with_, "without": without,
        "delta_auc": without["auc"] - with_["auc"],
        "delta_logloss": without["logloss"] - with_["logloss"],
        "mean_abs_delta_logit": float(np.mean(np.abs(delta))),
        "logit_std": float(np.std(np.asarray(logits, np.float64))),
        "layers": shares,
    }  # fmt: skip
    report["markdown"] = render_report(report)
    return report


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def render_report(report: Mapping[str, Any], command: str | None = None) -> str:
    """The report as markdown: the with/without table, the logit shift, the shares per layer."""
    w, wo = report["with"], report["without"]
    shift, std = report["mean_abs_delta_logit"], report["logit_std"]
    lines = [f"# Knock-out of the DPO's dynamic part: `{report['model']}` on {report['dataset']} "
             f"({report['split']} split, {report['rows']:,} rows)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Bundle: `{report['bundle']}`. Knock-out: every DPO layer's generated weights "
              "zeroed, so each layer computes its static part; the rest of the network is "
              "unchanged.", "",
              "| | AUC | logloss |", "|---|---:|---:|",
              f"| trained model | {_fmt(w['auc'])} | {_fmt(w['logloss'])} |",
              f"| DPO knocked out (static part only) | {_fmt(wo['auc'])} | {_fmt(wo['logloss'])} |",
              f"| Δ (knocked out − trained) | {report['delta_auc']:+.4f} | "
              f"{report['delta_logloss']:+.4f} |", "",
              f"Mean |Δ logit| {shift:.4g} against a logit std of {std:.4g} "
              f"({100 * shift / std if std else float('nan'):.1f}% of it).", "",
              "| DPO layer | kind | generator | dynamic share (mean ‖dyn‖/‖static‖) | RMS ratio |",
              "|---|---|---|---:|---:|"]
    for r in report["layers"]:
        lines.append(f"| `{r['layer']}` | {r['kind']} | {r['family']} | {_fmt(r['share'])} | "
                     f"{_fmt(r['share_rms'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out: str | Path) -> list[Path]:
    """``OUT/knockout.md`` and ``OUT/knockout.json``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    md, js = d / "knockout.md", d / "knockout.json"
    atomic.write_text(md, report["markdown"])
    atomic.write_text(js, json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=1))
    return [md, js]
