"""``dpn-jax evaluate``: analyses of a model bundle on the data it was trained on.

:func:`evaluate_bundle` (``dpn-jax evaluate BUNDLE --by-frequency FIELD``) reloads the data the
bundle was trained on, checks it is the same encoding, and scores the ENCODED split with the
bundle's model exactly as training evaluated it (logits of
:func:`dpn_jax.train.loop.predict_logits`), so the overall row equals the bundle's ``test_auc``;
the rows are :func:`dpn_jax.analysis.by_frequency.evaluate_by_frequency`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.analysis.by_frequency import (
    Bucket,
    evaluate_by_frequency,
    parse_buckets,
    plot_auc_by_bucket,
    render_markdown,
    training_counts,
)
from dpn_jax.atomic import write_text
from dpn_jax.errors import ConfigError, DataError

__all__ = ["categorical_fields", "evaluate_bundle", "render_report", "write_report"]


def categorical_fields(schema, encoders=None) -> list[str]:
    """Fields a frequency makes sense for: categorical, not bucketised numeric, not sequences."""
    numeric = {e.name for e in (encoders.fields if encoders is not None else ()) if e.edges is not None}
    return [f.name for f in schema.cat_fields if f.name not in numeric]


def check_field(schema, encoders, name: str, data: str) -> Any:
    """The :class:`~dpn_jax.data.schema.FieldInfo` of a categorical field, else a one-line error."""
    cats = categorical_fields(schema, encoders)
    kinds = {f.name: f.kind for f in schema.fields}
    if name in cats:
        return schema.field(name)
    what = {"seq": "a sequence field", "num": "a numeric field", "cat": "a bucketised numeric field"}
    if name in kinds:
        raise ConfigError(f"--by-frequency {name!r}: {what[kinds[name]]} of {data}; counts need a "
                          f"categorical field: {', '.join(cats) or '(none)'}")
    raise ConfigError(f"--by-frequency {name!r}: unknown field; the categorical fields of {data} are "
                      f"{', '.join(cats) or '(none)'}")


def bundle_data(bundle) -> tuple[str, dict[str, Any]]:
    """Which data a bundle was trained on: (``load_dataset`` name or spec path, its options)."""
    from dpn_jax.data import BUILTIN

    info, results = bundle.dataset, bundle.results
    if info.get("builtin") == "synthetic" and info.get("synthetic"):
        return "synthetic", dict(info["synthetic"])
    if info.get("builtin"):
        return info["builtin"], {}
    if results.get("data") in BUILTIN:
        return results["data"], {}
    data = info.get("data")
    if data and Path(data).is_file():
        return data, {}
    raise DataError(f"{bundle.path}: trained on {data or results.get('data')!r}, which is not found "
                    "here; pass --data NAME_OR_SPEC")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def score_split(predictor, split: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Logits of a bundle's model for every row of an ENCODED split, in order: the evaluation
    path of training (:func:`dpn_jax.train.loop.predict_logits`)."""
    import jax

    from dpn_jax.train.loop import predict_logits
    from dpn_jax.train.state import make_predict

    predict = jax.jit(make_predict(predictor.model))
    variables = predictor.variables
    return predict_logits(predict, variables["params"], variables.get("batch_stats") or {}, dict(split),
                          batch_size)


def evaluate_bundle(bundle_dir: str | Path, field: str, *, data: str | None = None,
                    data_dir: str | None = None, cache_dir: str | None = None, split: str = "test",
                    buckets: str | Sequence[Bucket] | None = None,
                    log: Callable[[str], None] = lambda s: None, arrays: bool = False) -> dict[str, Any]:
    """Score ``split`` of the bundle's data (``data`` overrides it) and break AUC down by the
    training count of ``field``. Returns a report: ``rows`` (see :func:`evaluate_by_frequency`),
    ``markdown``, and what was evaluated; with ``arrays`` also the per-row ``logits``, ``labels``,
    ``counts`` and ``ids`` (numpy; :func:`write_report` leaves them out of the JSON)."""
    from dpn_jax.data import load_dataset
    from dpn_jax.serving.bundle import encoders_for, read_bundle
    from dpn_jax.serving.predictor import Predictor

    if split not in ("test", "valid"):
        raise ConfigError(f"--split {split!r}: choose test or valid")
    bucket_list = parse_buckets(buckets)  # a bad spec fails before anything is loaded
    bundle = read_bundle(bundle_dir)
    trained_on, options = bundle_data(bundle)
    name = bundle.dataset.get("name") or trained_on
    info = check_field(bundle.schema, bundle.encoders, field, f"{name} (the bundle's data)")
    source = data or trained_on
    if data is None:
        seed = options.pop("seed", None)
        ds = load_dataset(source, data_dir=data_dir, cache_dir=cache_dir,
                          **({"seed": seed} if seed is not None else {}), **options)
    else:
        ds = load_dataset(source, data_dir=data_dir, cache_dir=cache_dir)
    if _canonical(ds.schema.to_json()) != _canonical(bundle.schema.to_json()):
        have = ", ".join(f"{f.name}:{f.kind}:{f.vocab_size}" for f in ds.schema.fields)
        want = ", ".join(f"{f.name}:{f.kind}:{f.vocab_size}" for f in bundle.schema.fields)
        raise DataError(f"dataset {source!r} ({have}) is not the bundle's: it was trained on "
                        f"{trained_on!r} ({want})")
    try:
        same_vocab = _canonical(encoders_for(ds).to_json()) == _canonical(bundle.encoders.to_json())
    except DataError:
        same_vocab = True  # nothing to compare (no fitted encoders): the schema matched
    if not same_vocab:
        raise DataError(f"dataset {source!r} has the bundle's fields but other vocabularies or bucket "
                        f"edges than {trained_on!r} (another split seed or data?); ids would not match")
    log(f"data  {ds.summary()}")
    col = info.column
    part = getattr(ds, split)
    counts = training_counts(ds.train["cat"][:, col], part["cat"][:, col], oov_id=info.oov_id)
    predictor = Predictor.from_bundle(bundle)
    eval_batch = int(bundle.model_json.get("train", {}).get("eval_batch_size", 4096))
    logits = score_split(predictor, part, eval_batch)
    rows = evaluate_by_frequency(logits, part["label"], counts, bucket_list, ids=part["cat"][:, col],
                                 oov_id=info.oov_id)
    recorded = bundle.results.get(f"{split}_auc")
    report = {
        "bundle": str(bundle.path), "model": bundle.model, "data": str(source), "dataset": ds.name,
        "split": split, "field": field, "buckets": [b.label for b in bucket_list], "rows": rows,
        "recorded_auc": recorded,
    }  # fmt: skip
    report["markdown"] = render_report(report)
    if arrays:
        report.update(logits=logits, labels=np.asarray(part["label"]), counts=counts,
                      ids=np.asarray(part["cat"][:, col]))
    return report


def render_report(report: Mapping[str, Any], command: str | None = None) -> str:
    """A header (what was evaluated, how counts are defined) and the table."""
    overall = report["rows"][-1]["auc"]
    recorded = report.get("recorded_auc")
    lines = [f"# AUC by training frequency of `{report['field']}`: `{report['model']}` on "
             f"{report['dataset']} ({report['split']} split)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Bundle: `{report['bundle']}`; data: `{report['data']}`; buckets: "
              f"`{','.join(report['buckets'])}`.", "",
              f"Train count = training rows with the same `{report['field']}` id; a value unseen in "
              "train or mapped to OOV (rarer than `min_count`) counts 0. Distinct values count the "
              "OOV id once.", ""]
    if recorded is not None and overall is not None:
        lines += [f"Overall AUC {overall:.4f} (the bundle's recorded {report['split']} AUC: "
                  f"{recorded:.4f}).", ""]
    lines.append(render_markdown(report["rows"], report["field"]))
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out: str | Path,
                 log: Callable[[str], None] = print) -> list[Path]:
    """``OUT/by_frequency.md``, ``.json`` and (with matplotlib) ``.png``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written = [d / "by_frequency.md", d / "by_frequency.json"]
    write_text(written[0], report["markdown"])
    skip = ("markdown", "logits", "labels", "counts", "ids")
    write_text(written[1], json.dumps({k: v for k, v in report.items() if k not in skip}, indent=1))
    png = plot_auc_by_bucket({report["model"]: report["rows"]}, d / "by_frequency.png",
                             title=f"{report['model']} on {report['dataset']}: AUC by train count of "
                                   f"{report['field']}", log=log, field=report["field"])
    return written + ([png] if png else [])
