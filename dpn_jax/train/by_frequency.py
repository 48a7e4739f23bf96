"""AUC per frequency bucket of one field (the paper's Table 3: does DPN help infrequent users?).

A row's *training count* for a field is how many TRAINING rows carry the same value (global id)
of that field. Rows are grouped into buckets of that count (default ``0,1-5,6-20,21-50,51+``;
``0`` = never seen in train, or mapped to the field's OOV id) and each bucket gets its own AUC
and logloss, computed with the project's exact metrics (:mod:`dpn_jax.train.metrics`)::

    counts  = training_counts(train["cat"][:, col], test["cat"][:, col], oov_id=f.oov_id)
    rows    = evaluate_by_frequency(logits, test["label"], counts, parse_buckets("0,1-5,6+"),
                                    ids=test["cat"][:, col])
    print(render_markdown(rows))

:func:`evaluate_bundle` does it for a model bundle (``dpn-jax evaluate BUNDLE --by-frequency
FIELD``): it reloads the data the bundle was trained on, checks it is the same encoding, and scores
the ENCODED split with the bundle's model exactly as training evaluated it (logits of
:func:`dpn_jax.train.loop.predict_logits`), so the overall row equals the bundle's ``test_auc``.
Everything but the scoring is numpy; the plot needs matplotlib (a dev extra) and is skipped
with a one-line note without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dpn_jax.atomic import atomic_path, write_text
from dpn_jax.errors import ConfigError, DataError
from dpn_jax.train.metrics import auc, logloss, logloss_from_logits

DEFAULT_BUCKETS = "0,1-5,6-20,21-50,51+"
ALL = "all"
UNBUCKETED = "not bucketed"

__all__ = [
    "DEFAULT_BUCKETS", "Bucket", "categorical_fields", "evaluate_bundle", "evaluate_by_frequency",
    "parse_buckets", "plot_auc_by_bucket", "render_comparison", "render_markdown", "summarize_seeds",
    "training_counts", "write_report",
]  # fmt: skip


# ----------------------------------------------------------------------------- counts and buckets


def training_counts(train_ids: ArrayLike, eval_ids: ArrayLike, oov_id: int | None = None) -> np.ndarray:
    """For each evaluation row, how many training rows carry the same id (int64 [N_eval]).

    An id never seen in training counts 0. With ``oov_id`` (the field's OOV global id,
    ``schema.field(name).oov_id``) a row holding the OOV id also counts 0, however many training
    rows were mapped to OOV: OOV lumps values unseen in train with values rarer than the field's
    ``min_count``, so bucket 0 means "unseen or rare in train", never "frequent"."""
    train = np.asarray(train_ids).reshape(-1)
    ev = np.asarray(eval_ids).reshape(-1)
    values, counts = np.unique(train, return_counts=True)
    if values.size == 0:
        return np.zeros(ev.shape, np.int64)
    pos = np.minimum(np.searchsorted(values, ev), values.size - 1)
    out = np.where(values[pos] == ev, counts[pos], 0).astype(np.int64)
    if oov_id is not None:
        out[ev == oov_id] = 0
    return out


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Training counts ``lo..hi`` (inclusive); ``hi=None``: no upper end."""

    lo: int
    hi: int | None

    @property
    def label(self) -> str:
        if self.hi is None:
            return f"{self.lo}+"
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"

    def mask(self, counts: np.ndarray) -> np.ndarray:
        return (counts >= self.lo) & (True if self.hi is None else counts <= self.hi)


def _int(text: str, token: str, spec: str) -> int:
    if re.fullmatch(r"[0-9]+", text.strip()) is None:
        raise ConfigError(f"--buckets {spec!r}: bad bucket {token!r} ({text.strip()!r} is not a "
                          "non-negative integer); write buckets like 0,1-5,6-20,21+")
    return int(text.strip())


def parse_buckets(spec: str | Sequence[Bucket] | None = None) -> tuple[Bucket, ...]:
    """``"0,1-5,6-20,21+"`` -> buckets in ascending order (``None``: :data:`DEFAULT_BUCKETS`).

    A token is ``N`` (exactly N), ``A-B`` (A..B inclusive) or ``N+`` (N and more). Buckets may be
    given in any order but must not overlap nor leave a gap between them; counts below the first
    or above a closed last bucket fall in no bucket (reported as "not bucketed")."""
    if spec is None:
        spec = DEFAULT_BUCKETS
    if not isinstance(spec, str):
        buckets = list(spec)
        spec = ",".join(b.label for b in buckets)
    else:
        buckets = []
        if not spec.strip():
            raise ConfigError("--buckets is empty; write buckets like 0,1-5,6-20,21+")
        for i, raw in enumerate(spec.split(",")):
            token = raw.strip()
            if not token:
                raise ConfigError(f"--buckets {spec!r}: bucket {i + 1} is empty (a stray comma?)")
            if token.endswith("+"):
                buckets.append(Bucket(_int(token[:-1], token, spec), None))
                continue
            lo, sep, hi = token.partition("-")
            a = _int(lo, token, spec)
            b = _int(hi, token, spec) if sep else a
            if b < a:
                raise ConfigError(f"--buckets {spec!r}: bad bucket {token!r} (its end {b} is below its "
                                  f"start {a})")
            buckets.append(Bucket(a, b))
    buckets.sort(key=lambda b: (b.lo, math.inf if b.hi is None else b.hi))
    for prev, cur in zip(buckets, buckets[1:]):
        if prev.hi is None or cur.lo <= prev.hi:
            ends = [h for h in (prev.hi, cur.hi) if h is not None]  # None: no upper end
            shared = Bucket(cur.lo, min(ends) if ends else None)
            raise ConfigError(f"--buckets {spec!r}: buckets {prev.label!r} and {cur.label!r} overlap "
                              f"(counts {shared.label} are in both)")
        if cur.lo > prev.hi + 1:
            gap = Bucket(prev.hi + 1, cur.lo - 1).label
            raise ConfigError(f"--buckets {spec!r}: gap between {prev.label!r} and {cur.label!r} "
                              f"(no bucket holds count{'s' if '-' in gap else ''} {gap})")
    return tuple(buckets)


# ----------------------------------------------------------------------------- metrics per bucket


def _metrics_row(label: str, scores: np.ndarray, labels: np.ndarray, ids: np.ndarray | None,
                 oov_id: int | None, logits: bool) -> dict[str, Any]:
    n = int(labels.shape[0])
    positives = int(labels.sum())
    row: dict[str, Any] = {
        "bucket": label, "rows": n,
        "distinct": None if ids is None else int(np.unique(ids).size),
        "oov_rows": None if ids is None or oov_id is None else int((ids == oov_id).sum()),
        "positives": positives, "positive_rate": positives / n if n else None,
        "auc": None, "logloss": None, "note": None,
    }  # fmt: skip
    if n == 0:
        row["note"] = "no rows"
        return row
    row["logloss"] = (logloss_from_logits if logits else logloss)(labels, scores)
    if positives in (0, n):
        row["note"] = f"only {'positive' if positives else 'negative'} labels: AUC needs both classes"
    else:
        row["auc"] = auc(labels, scores)
    return row


def evaluate_by_frequency(scores: ArrayLike, labels: ArrayLike, counts: ArrayLike,
                          buckets: str | Sequence[Bucket] | None = None, *, ids: ArrayLike | None = None,
                          oov_id: int | None = None, logits: bool = True) -> list[dict[str, Any]]:
    """One row per bucket, then ``"not bucketed"`` (only if some rows fall in no bucket), then
    the overall row ``"all"``.

    ``scores``: the model's logits (``logits=False``: probabilities; only logloss differs).
    ``counts``: :func:`training_counts` of each row. ``ids`` (optional): the field's ids of each
    row, for the count of distinct values (the OOV id, ``oov_id``, is one value there and its
    rows are counted apart in ``oov_rows``).

    Each row: ``bucket`` (label), ``lo``/``hi`` (None for the open end and the extra rows),
    ``rows``, ``distinct``, ``oov_rows``, ``positives``, ``positive_rate``, ``auc``, ``logloss``
    and ``note``. An empty bucket has ``rows`` 0 and every metric None; a bucket with one class
    has AUC None and the reason in ``note`` (never an error)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, np.float64).reshape(-1)
    c = np.asarray(counts).reshape(-1)
    v = None if ids is None else np.asarray(ids).reshape(-1)
    if not (s.shape == y.shape == c.shape) or (v is not None and v.shape != s.shape):
        raise DataError(f"evaluate_by_frequency: scores ({s.size}), labels ({y.size}), counts ({c.size})"
                        + ("" if v is None else f" and ids ({v.size})") + " must have one value per row")
    out = []
    covered = np.zeros(c.shape, bool)
    for b in parse_buckets(buckets):
        m = b.mask(c)
        covered |= m
        row = _metrics_row(b.label, s[m], y[m], None if v is None else v[m], oov_id, logits)
        out.append({**row, "lo": b.lo, "hi": b.hi})
    if not covered.all():
        m = ~covered
        out.append({**_metrics_row(UNBUCKETED, s[m], y[m], None if v is None else v[m], oov_id, logits),
                    "lo": None, "hi": None})
    out.append({**_metrics_row(ALL, s, y, v, oov_id, logits), "lo": None, "hi": None})
    return out


# ----------------------------------------------------------------------------- rendering


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(rows: Sequence[Mapping[str, Any]], field: str = "field") -> str:
    """The rows of :func:`evaluate_by_frequency` as a markdown table ("-": no AUC, see note)."""
    notes = any(r.get("note") for r in rows)
    lines = [f"| train count of `{field}` | rows | distinct values | positive rate | AUC | logloss |"
             + (" note |" if notes else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---|" if notes else "")]
    for r in rows:
        name = f"**{r['bucket']}**" if r["bucket"] == ALL else r["bucket"]
        distinct = "-" if r.get("distinct") is None else f"{r['distinct']:,}"
        if r.get("oov_rows"):
            distinct += f" (OOV: {r['oov_rows']:,} rows)"
        lines.append(f"| {name} | {r['rows']:,} | {distinct} | {_fmt(r['positive_rate'], 3)} | "
                     f"{_fmt(r['auc'])} | {_fmt(r['logloss'])} |" + (f" {r.get('note') or ''} |" if notes else ""))
    return "\n".join(lines)


def _per_seed(runs: Sequence[Any]) -> list[list[Mapping[str, Any]]]:
    """A list of rows (one run) or a list of such lists (one per seed) -> list of lists."""
    runs = list(runs)
    return [runs] if runs and isinstance(runs[0], Mapping) else runs


def summarize_seeds(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """Per bucket over seeds: the data columns of the first seed (the split is the same), and
    ``auc_mean``/``auc_std``/``logloss_mean``/``logloss_std`` over the seeds that have an AUC
    (std None with one seed), ``aucs`` the per-seed values."""
    seeds = _per_seed(runs)
    out = []
    for i, first in enumerate(seeds[0]):
        aucs = [s[i]["auc"] for s in seeds if s[i]["auc"] is not None]
        losses = [s[i]["logloss"] for s in seeds if s[i]["logloss"] is not None]
        out.append({
            **{k: first[k] for k in ("bucket", "lo", "hi", "rows", "distinct", "oov_rows", "positives",
                                     "positive_rate", "note") if k in first},
            "aucs": aucs, "seeds": len(seeds),
            "auc_mean": statistics.mean(aucs) if aucs else None,
            "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else None,
            "logloss_mean": statistics.mean(losses) if losses else None,
            "logloss_std": statistics.stdev(losses) if len(losses) > 1 else None,
        })  # fmt: skip
    return out


def _mean_std(mean: float | None, std: float | None) -> str:
    return _fmt(mean) if std is None or mean is None else f"{mean:.4f} ± {std:.4f}"


def render_comparison(per_model: Mapping[str, Sequence[Any]], field: str = "field",
                      extra: Mapping[str, Sequence[str]] | None = None) -> str:
    """Models side by side: AUC mean ± std over seeds per bucket (markdown). With two models a
    column gives the difference of their mean AUCs (second minus first); ``extra`` adds columns
    (header -> one cell per bucket row)."""
    extra = dict(extra or {})
    names = list(per_model)
    summ = {m: summarize_seeds(per_model[m]) for m in names}
    base = summ[names[0]]
    diff = len(names) == 2
    head = (f"| train count of `{field}` | rows | distinct values | positive rate | "
            + " | ".join(f"`{m}` AUC" for m in names) + " |"
            + (f" Δ AUC (`{names[1]}` − `{names[0]}`) |" if diff else "")
            + "".join(f" {h} |" for h in extra))
    lines = [head, "|---|---:|---:|---:|" + "---:|" * (len(names) + diff + len(extra))]
    for i, r in enumerate(base):
        name = f"**{r['bucket']}**" if r["bucket"] == ALL else r["bucket"]
        distinct = "-" if r.get("distinct") is None else f"{r['distinct']:,}"
        cells = [_mean_std(summ[m][i]["auc_mean"], summ[m][i]["auc_std"]) for m in names]
        if diff:
            a, b = summ[names[0]][i]["auc_mean"], summ[names[1]][i]["auc_mean"]
            cells.append("-" if a is None or b is None else f"{b - a:+.4f}")
        cells += [col[i] for col in extra.values()]
        lines.append(f"| {name} | {r['rows']:,} | {distinct} | {_fmt(r['positive_rate'], 3)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_auc_by_bucket(per_model: Mapping[str, Sequence[Any]], path: str | Path, title: str = "",
                       log: Callable[[str], None] = print, field: str | None = None) -> Path | None:
    """Bar plot of AUC per bucket, models side by side; error bars (one std over seeds) when a
    model is given per-seed results (a list of :func:`evaluate_by_frequency` lists). Writes a PNG
    and returns its path, or returns None (with one note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"note  matplotlib is not installed (pip install -e '.[dev]'): skipped the plot {path}")
        return None
    names = list(per_model)
    summ = {m: [r for r in summarize_seeds(per_model[m]) if r["bucket"] != UNBUCKETED] for m in names}
    labels = [r["bucket"] if r["bucket"] != ALL else "all" for r in summ[names[0]]]
    x = np.arange(len(labels))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2.5, 4))
    lows, highs, missing = [], [], []
    for j, m in enumerate(names):
        means = np.array([np.nan if r["auc_mean"] is None else r["auc_mean"] for r in summ[m]])
        stds = np.array([0.0 if r["auc_std"] is None else r["auc_std"] for r in summ[m]])
        has_err = any(r["auc_std"] is not None for r in summ[m])
        at = x + (j - (len(names) - 1) / 2) * width
        ax.bar(at, np.nan_to_num(means), width, label=m, yerr=stds if has_err else None, capsize=3)
        lows += [v - e for v, e in zip(means, stds) if not np.isnan(v)]
        highs += [v + e for v, e in zip(means, stds) if not np.isnan(v)]
        missing += [a for a, v in zip(at, means) if np.isnan(v)]
    rows = summ[names[0]]
    ax.set_xticks(x, [f"{lab}\n(n={r['rows']:,})" for lab, r in zip(labels, rows)])
    ax.set_xlabel(f"training count of the {field or 'field'} value" + (" (bar: mean, error bar: std "
                  "over seeds)" if any(len(_per_seed(per_model[m])) > 1 for m in names) else ""))
    ax.set_ylabel("AUC")
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.03), min(1.0, max(highs) + 0.03))
    for a in missing:  # an empty or one-class bucket has no AUC
        ax.text(a, ax.get_ylim()[0], "no AUC", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- bundles


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
