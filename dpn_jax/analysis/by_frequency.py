"""AUC per frequency bucket of one field (the paper's Table 3: does DPN help infrequent users?).

A row's *training count* for a field is how many TRAINING rows carry the same value (global id)
of that field. Rows are grouped into buckets of that count (default ``0,1-5,6-20,21-50,51+``;
``0`` = never seen in train, or mapped to the field's OOV id) and each bucket gets its own AUC
and logloss, computed with the project's exact metrics (:mod:`dpn_jax.metrics`)::

    counts  = training_counts(train["cat"][:, col], test["cat"][:, col], oov_id=f.oov_id)
    rows    = evaluate_by_frequency(logits, test["label"], counts, parse_buckets("0,1-5,6+"),
                                    ids=test["cat"][:, col])
    print(render_markdown(rows))

For a model bundle (``dpn-jax evaluate BUNDLE --by-frequency FIELD``) see
:mod:`dpn_jax.analysis.evaluate`. Everything here is numpy; the plot needs matplotlib (a dev
extra) and is skipped with a one-line note without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dpn_jax.atomic import save_figure
from dpn_jax.errors import ConfigError, DataError
from dpn_jax.metrics import auc, logloss, logloss_from_logits

DEFAULT_BUCKETS = "0,1-5,6-20,21-50,51+"
ALL = "all"
UNBUCKETED = "not bucketed"

__all__ = [
    "DEFAULT_BUCKETS", "Bucket", "evaluate_by_frequency", "parse_buckets", "plot_auc_by_bucket",
    "render_comparison", "render_markdown", "summarize_seeds", "training_counts",
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
    return save_figure(fig, path, dpi=120)
