"""DIN-style CTR datasets built from user-behaviour logs (positives only).

Built-in names (:func:`load_behaviour`; files read from the data dir, see
:func:`dpn_jax.data.frappe.find_data_dir`):

==========================  ==================================================  =========
name                        source folder in the data dir                       category
==========================  ==================================================  =========
``amazon_videogames``       ``amazon_videogames_sasrec/Video.txt`` (SASRec)     no
``amazon_grocery``          ``amazon_grocery_rechorus/{train,item_meta}.csv``   yes
``amazon_instruments``      ``amazon_musical_instruments_5core/`` reviews json  no
``amazon_electronics``      ``amazon_electronics/`` raw McAuley files (DIN)     yes
``amazon_books``            ``amazon_books/`` raw McAuley files (DIN)           yes
``amazon_electronics_din``  ``amazon_electronics_din_paddlerec/`` (DIN text)    yes
``fuxictr_tiny_seq``        ``fuxictr_tiny/tiny_seq/*.npz`` (FuxiCTR arrays)    yes
==========================  ==================================================  =========

``amazon_electronics`` / ``amazon_books`` are the DIN paper's Amazon datasets built from the raw
McAuley 2014 files, ``amazon_<cat>/reviews_<Cat>_5.json.gz`` + ``amazon_<cat>/meta_<Cat>.json.gz``
(``<Cat>`` = ``Electronics`` / ``Books``; either file may also be there unzipped, without ``.gz``;
when both are, the ``.gz`` is read). Source:
``http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Electronics_5.json.gz``
and ``.../meta_Electronics.json.gz`` (``Books`` likewise); ``dpn-jax data download
amazon_electronics --to DIR`` fetches them. Licence: research use; cite McAuley et al., SIGIR 2015
and He & McAuley, WWW 2016. The preprocessing is DIN's (zhougr1993/DeepInterestNetwork,
``utils/1_convert_pd.py``, ``2_remap_id.py``, ``din/build_dataset.py``), see
:func:`read_amazon_folder`: reviews give (reviewerID, asin, unixReviewTime); an item's category is
the last element of the LAST path in the meta record's ``categories`` (DIN's ``x[-1][-1]``); meta
rows of items without reviews are dropped. Deviations from DIN: a reviewed item without a meta row
(or without ``categories``) gets the category ``"(none)"`` (:data:`AMAZON_NO_CATEGORY`) where
DIN's id remapping would fail (in the real 5-core files every item has a meta row); and the
second-to-last positive of each user goes to a validation split (DIN had train/test only; early
stopping needs a validation split).

All ``amazon_*`` names above the last two are interaction logs turned into CTR rows by
:func:`make_din_rows`:

* each user's interactions are put in time order (ties keep file order); every interaction after
  the first is a POSITIVE whose history is the items (and categories) before it, the most recent
  ``max_len`` kept;
* each positive is paired with ONE negative: same user and history, target item drawn uniformly
  (``numpy.random.default_rng((seed, 1))``) from the log's items that user never interacted with;
  the negative's category is that item's category;
* leave-last-out: a user's last positive (and its negative) goes to test, the one before to
  valid, the rest to train (a user with 2 interactions has only a test pair).

The last two are already CTR rows (fixtures of 100 rows each) and are only re-written.

Every builder writes what it produced as a plain CSV + YAML spec into
``<cache_dir>/behaviour/<name>-<hash>/`` (``hash`` covers the source files' content and the
options, so a rebuild happens only when something changed), then loads it through
:func:`dpn_jax.data.load_spec_dataset` -- encoding and caching are the same as for a user's spec.
The CSV columns::

    user,item,cat,hist_items,hist_cats,label
    12,5071,3,88^1022^907,0^0^3,1            # hist_* are "^"-joined, oldest first

(``cat``/``hist_cats`` only where the source has categories; ``hist_*`` sequence fields use the
vocabulary of ``item``/``cat`` via ``share_vocab``.) Dataset files are never copied into the repo.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from dpn_jax.data.schema import Dataset
from dpn_jax.data.spec import DEFAULT_SEED
from dpn_jax.errors import DataError

BUILDER_VERSION = 1  # bump when the produced rows change, to invalidate every built CSV
DEFAULT_MAX_LEN = 50
HIST_SEP = "^"
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class InteractionLog:
    """Positive interactions: parallel 1-D arrays of text ids (+ optional sort key), and an
    optional item -> category map (items missing from it get the category ``""``)."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray | None = None  # None: the file order is the time order
    item_cat: dict[str, str] | None = None
    info: dict[str, int] | None = None  # reader's counts (written into the built spec's comment)

    def __post_init__(self) -> None:
        self.user = np.asarray(self.user).astype(str).astype(object)
        self.item = np.asarray(self.item).astype(str).astype(object)
        if self.time is not None:
            self.time = np.asarray(self.time, dtype=np.float64)
            if self.time.shape != self.user.shape:
                raise DataError("interaction log: time and user have different lengths")
        if self.user.shape != self.item.shape or self.user.ndim != 1:
            raise DataError("interaction log: user and item must be 1-D arrays of one length")


Rows = dict[str, list[str]]  # column -> cells of one split (all text, as written to the CSV)


def make_din_rows(
    log: InteractionLog,
    *,
    max_len: int = DEFAULT_MAX_LEN,
    seed: int = DEFAULT_SEED,
    max_users: int | None = None,
) -> dict[str, Rows]:
    """Turn a log into DIN CTR rows per split (see the module docstring for the rules).

    ``max_users``: keep a seeded random subset of that many users (``default_rng((seed, 0))``)
    before anything else -- the item universe for negatives is then the subset's items."""
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    user, item, time = log.user, log.item, log.time
    if user.size == 0:
        raise DataError("interaction log is empty")
    uniq_users, ucode = np.unique(user, return_inverse=True)
    if max_users is not None:
        if max_users < 1:
            raise DataError(f"max_users must be >= 1, got {max_users}")
        if max_users < uniq_users.size:
            keep = np.random.default_rng((seed, 0)).choice(
                uniq_users.size, max_users, replace=False
            )
            mask = np.isin(ucode, keep)
            user, item = user[mask], item[mask]
            time = time[mask] if time is not None else None
            uniq_users, ucode = np.unique(user, return_inverse=True)
    uniq_items, icode = np.unique(item, return_inverse=True)
    n, n_items = user.size, uniq_items.size
    for what, values in (("item", uniq_items), ("user", uniq_users)):
        if any(HIST_SEP in v or "\n" in v for v in values.tolist()):
            raise DataError(f"interaction log: a {what} id contains {HIST_SEP!r} or a newline")

    # Time order inside each user; equal times keep the file order.
    order = np.lexsort((np.arange(n), time if time is not None else np.zeros(n), ucode))
    ucode, icode = ucode[order], icode[order]
    starts = np.flatnonzero(np.r_[True, ucode[1:] != ucode[:-1]])
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)  # position inside the user's sequence
    remaining = np.repeat(counts, counts) - 1 - pos  # interactions after this one
    rows = np.flatnonzero(pos >= 1)  # every interaction after the first is a positive
    role = np.where(remaining[rows] == 0, 2, np.where(remaining[rows] == 1, 1, 0))

    # One negative per positive, from the items the user never touched (seeded rejection sampling).
    seen = np.unique(ucode.astype(np.int64) * n_items + icode)
    distinct = np.bincount(seen // n_items, minlength=uniq_users.size)
    full = np.flatnonzero(distinct >= n_items)
    if full.size and np.isin(ucode[rows], full).any():
        raise DataError(
            f"user {uniq_users[full[0]]!r} interacted with every one of the {n_items} items: "
            "no negative can be sampled"
        )
    rng = np.random.default_rng((seed, 1))
    neg = rng.integers(0, n_items, rows.size)
    bad = np.flatnonzero(_contains(seen, ucode[rows].astype(np.int64) * n_items + neg))
    while bad.size:
        neg[bad] = rng.integers(0, n_items, bad.size)
        bad = bad[_contains(seen, ucode[rows[bad]].astype(np.int64) * n_items + neg[bad])]

    items = uniq_items.tolist()
    cats = None
    if log.item_cat is not None:
        cats = [log.item_cat.get(i, "") for i in items]
        if any(HIST_SEP in c or "\n" in c for c in cats):
            raise DataError(f"interaction log: a category id contains {HIST_SEP!r} or a newline")
    users = uniq_users.tolist()
    icode_l, ucode_l = icode.tolist(), ucode.tolist()
    out: dict[str, Rows] = {s: _empty_rows(cats is not None) for s in SPLITS}
    for k, j in enumerate(rows.tolist()):
        r = out[SPLITS[role[k]]]
        lo = max(j - max_len, j - int(pos[j]))
        hist = icode_l[lo:j]
        hist_items = HIST_SEP.join([items[h] for h in hist])
        hist_cats = HIST_SEP.join([cats[h] for h in hist]) if cats is not None else None
        u = users[ucode_l[j]]
        for target, label in ((icode_l[j], "1"), (int(neg[k]), "0")):
            r["user"].append(u)
            r["item"].append(items[target])
            r["hist_items"].append(hist_items)
            if cats is not None:
                r["cat"].append(cats[target])
                r["hist_cats"].append(hist_cats)
            r["label"].append(label)
    return out


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(sorted_keys, keys)
    idx = np.minimum(idx, sorted_keys.size - 1)
    return sorted_keys[idx] == keys


def _empty_rows(with_cat: bool) -> Rows:
    cols = ["user", "item", "cat", "hist_items", "hist_cats", "label"]
    return {c: [] for c in cols if with_cat or c not in ("cat", "hist_cats")}


# ----------------------------------------------------------------------------- CSV + spec


def din_fields(with_cat: bool, max_len: int) -> list[dict]:
    """The spec fields of :func:`make_din_rows`' columns."""
    fields: list[dict] = [
        {"name": "user", "type": "categorical"},
        {"name": "item", "type": "categorical"},
    ]
    if with_cat:
        fields.append({"name": "cat", "type": "categorical"})
    fields.append(
        {"name": "hist_items", "type": "sequence", "sep": HIST_SEP, "max_len": max_len,
         "share_vocab": "item"}
    )  # fmt: skip
    if with_cat:
        fields.append(
            {"name": "hist_cats", "type": "sequence", "sep": HIST_SEP, "max_len": max_len,
             "share_vocab": "cat"}
        )  # fmt: skip
    return fields


def write_csv_spec(
    directory: str | Path,
    name: str,
    files: dict[str, Rows],
    fields: Sequence[dict],
    *,
    label: str = "label",
    split: dict | None = None,
    comment: str = "",
) -> Path:
    """Write ``files`` (role "train"/"valid"/"test" -> rows; a missing role is carved by ``split``)
    as ``<role>.csv`` and a ``spec.yaml`` naming them; returns the spec's path."""
    import yaml

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for role, rows in files.items():
        cols = list(rows)
        with open(d / f"{role}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(cols)
            w.writerows(zip(*(rows[c] for c in cols), strict=True))
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [f"name: {name}", "format: csv", 'sep: ","']
    lines += [f"{role}: {role}.csv" for role in SPLITS if role in files]
    if split is not None:
        lines.append("split: " + _flow(split))
    lines += [f"label: {label}", "fields:"]
    lines += [f"  - {_flow(f)}" for f in fields]
    text = "\n".join(lines) + "\n"
    yaml.safe_load(text)  # written by hand for readability; must still be valid YAML
    (d / "spec.yaml").write_text(text, encoding="utf-8")
    return d / "spec.yaml"


def _flow(d: dict) -> str:
    """A one-line YAML mapping; strings are quoted only where YAML could misread them."""

    def scalar(v: object) -> str:
        plain = isinstance(v, str) and _PLAIN_RE.match(v) and v.lower() not in _YAML_WORDS
        return v if plain else json.dumps(v)  # type: ignore[return-value]

    return "{" + ", ".join(f"{k}: {scalar(v)}" for k, v in d.items()) + "}"


_PLAIN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "nan", "inf"}


def built_dir(
    name: str,
    sources: Sequence[Path],
    options: dict,
    write: Callable[[Path], None],
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """``<out_dir or cache_dir/behaviour>/<name>-<hash>/`` holding ``spec.yaml``, built by
    ``write(tmp_dir)`` unless already there. The hash covers the sources' content, ``options`` and
    :data:`BUILDER_VERSION`; the directory is renamed into place only when complete."""
    from dpn_jax.data.cache import default_cache_dir, file_sha256

    root = Path(out_dir).expanduser() if out_dir is not None else (
        (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "behaviour"
    )  # fmt: skip
    h = hashlib.sha256(f"dpn-jax-behaviour-v{BUILDER_VERSION}\n{name}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    for p in sources:
        h.update(f"\n{Path(p).name}:{file_sha256(p)}".encode())
    final = root / f"{name}-{h.hexdigest()[:16]}"
    if (final / "spec.yaml").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        write(tmp)
        (tmp / "build.json").write_text(
            json.dumps({"name": name, "options": options, "sources": [str(p) for p in sources],
                        "builder_version": BUILDER_VERSION}, indent=1),
            encoding="utf-8",
        )  # fmt: skip
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "spec.yaml").is_file():  # not a concurrent builder's finished copy
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_behaviour_dataset(
    log: InteractionLog | Callable[[], InteractionLog],
    name: str,
    *,
    sources: Sequence[Path] = (),
    max_len: int = DEFAULT_MAX_LEN,
    seed: int = DEFAULT_SEED,
    max_users: int | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    note: str = "",
) -> Dataset:
    """:func:`make_din_rows` -> CSV + spec (see :func:`built_dir`) -> the encoded dataset.
    ``sources`` are the files the log came from (their content keys the built directory); without
    them the log itself is hashed. ``log`` may be a zero-argument callable returning the log: with
    ``sources`` it is then called only when the built directory is not there yet (no re-reading of
    big raw files on a cache hit)."""
    options = {"max_len": max_len, "seed": seed, "max_users": max_users, "note": note}
    if not sources and callable(log):
        log = log()
    if not sources:  # an in-memory log: key on its content
        assert isinstance(log, InteractionLog)
        h = hashlib.sha256()
        for a in (log.user, log.item):
            h.update("\x1f".join(a.tolist()).encode())
        if log.time is not None:
            h.update(np.ascontiguousarray(log.time).tobytes())
        if log.item_cat is not None:
            h.update(json.dumps(log.item_cat, sort_keys=True).encode())
        options["log_sha256"] = h.hexdigest()

    def write(tmp: Path) -> None:
        lg = log() if callable(log) else log
        rows = make_din_rows(lg, max_len=max_len, seed=seed, max_users=max_users)
        for role in SPLITS:
            if not rows[role]["label"]:
                raise DataError(
                    f"{name}: the {role} split is empty (every user needs >= "
                    f"{ {'train': 4, 'valid': 3, 'test': 2}[role] } interactions for a {role} row)"
                )
        comment = "\n".join(
            [
                "Generated by dpn_jax.data.behaviour: DIN-style rows, 1 sampled negative per",
                "positive, leave-last-out split (last -> test, second last -> valid).",
                f"seed {seed}, max_len {max_len}, max_users {max_users}. {note}".rstrip(),
                "From:" if sources else "From an in-memory log.",
                *(f"  {p}" for p in sources),
                *([", ".join(f"{k} {v}" for k, v in lg.info.items())] if lg.info else []),
            ]
        )
        write_csv_spec(tmp, name, rows, din_fields(lg.item_cat is not None, max_len),
                       comment=comment)  # fmt: skip

    d = built_dir(name, sources, options, write, out_dir=out_dir, cache_dir=cache_dir)
    return _load_built(d, cache_dir, seed)


def _load_built(d: Path, cache_dir: str | Path | None, seed: int) -> Dataset:
    from dpn_jax.data import cache, encode
    from dpn_jax.data.spec import load_spec

    ds = cache.cached_dataset(load_spec(d / "spec.yaml", default_seed=seed), encode.build_dataset,
                              cache_dir)  # fmt: skip
    ds.meta["behaviour_dir"] = str(d)
    return ds


# ----------------------------------------------------------------------------- source readers


def read_sasrec(path: str | Path) -> InteractionLog:
    """SASRec ``user item`` lines, grouped by user in chronological order (no timestamps)."""
    tok = Path(path).read_text(encoding="utf-8").split()
    if len(tok) % 2:
        raise DataError(f"{path}: expected 'user item' pairs, found an odd number of tokens")
    a = np.array(tok, dtype=object).reshape(-1, 2)
    return InteractionLog(user=a[:, 0], item=a[:, 1])


def read_rechorus(folder: str | Path) -> InteractionLog:
    """ReChorus ``train.csv`` (tab: user_id, item_id, time) + ``item_meta.csv`` (i_category)."""
    import pyarrow.csv as pacsv

    folder = Path(folder)
    opts = pacsv.ParseOptions(delimiter="\t")

    def read(name: str, cols: list[str]) -> dict[str, np.ndarray]:
        conv = pacsv.ConvertOptions(include_columns=cols)
        t = pacsv.read_csv(folder / name, parse_options=opts, convert_options=conv)
        return {c: t.column(c).to_numpy() for c in cols}

    log = read("train.csv", ["user_id", "item_id", "time"])
    meta = read("item_meta.csv", ["item_id", "i_category"])
    cats = dict(zip(meta["item_id"].astype(str).tolist(), meta["i_category"].astype(str).tolist(),
                    strict=True))  # fmt: skip
    return InteractionLog(log["user_id"], log["item_id"], log["time"], item_cat=cats)


def read_amazon_reviews(path: str | Path) -> InteractionLog:
    """McAuley Amazon review lines (optionally gzipped; JSON objects, or Python dict literals as in
    the older dumps): reviewerID, asin, unixReviewTime. Blank lines are skipped; any other line that
    is not such a record is a one-line DataError naming the file, the line and a missing key."""
    path = Path(path)
    users, items, times = [], [], []
    for line_no, line in _numbered_lines(path):
        if not line.strip():
            continue
        r = _parse_record(path, line_no, line)
        if not isinstance(r, dict):
            raise DataError(f"{path}: line {line_no}: not a review record (a {type(r).__name__})")
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if key not in r:
                raise DataError(f"{path}: line {line_no}: review record without {key!r}")
        try:
            t = float(r["unixReviewTime"])
        except (TypeError, ValueError):
            t = float("nan")
        if not np.isfinite(t):
            raise DataError(
                f"{path}: line {line_no}: unixReviewTime {r['unixReviewTime']!r} is not a number"
            )
        users.append(r["reviewerID"])
        items.append(r["asin"])
        times.append(t)
    return InteractionLog(np.array(users, object), np.array(items, object), np.array(times))


def read_amazon_meta(
    path: str | Path,
    asins: set[str] | None = None,
    *,
    categories_list: int = -1,
    stats: dict[str, int] | None = None,
) -> dict[str, str]:
    """asin -> category from a McAuley ``meta_<Cat>.json(.gz)`` file, streamed line by line (memory
    is the returned dict). A line is a JSON object or -- as in the 2014 files -- a Python dict
    literal (single quotes), read with :func:`ast.literal_eval` (never ``eval``).

    The category is DIN's ``categories[-1][-1]``: the last element of the last category path
    (``categories_list=0``: of the first path instead). ``asins``: keep only those items (DIN keeps
    the meta rows of reviewed items); a line starting ``{'asin': '<id>',`` with an id not in it is
    skipped without being parsed (fast on the 2 GB Books file, so such a line is not checked).

    Skipped and counted (into ``stats`` when given, keys ``meta_*``): blank lines; records of items
    not in ``asins``; repeated asins (the first record wins). A record without ``categories`` (or
    with an empty path or a blank last element) gets the category ``""``, counted as
    ``meta_no_category``. Categories are stripped of surrounding blanks (the sequence encoder strips
    history tokens); a ``^`` (the history separator) or line break inside one becomes ``_``
    (``meta_category_renamed``). Any other malformed line is a one-line DataError naming the file
    and the line."""
    if categories_list not in (0, -1):
        raise ValueError(f"categories_list must be 0 or -1, got {categories_list}")
    path = Path(path)
    counts = dict.fromkeys(("meta_lines", "meta_blank", "meta_not_reviewed", "meta_duplicate",
                            "meta_no_category", "meta_category_renamed"), 0)  # fmt: skip
    out: dict[str, str] = {}
    for line_no, line in _numbered_lines(path):
        counts["meta_lines"] += 1
        if not line.strip():
            counts["meta_blank"] += 1
            continue
        if asins is not None:
            m = _META_ASIN_RE.match(line)
            if m is not None and m.group(3) not in asins:
                counts["meta_not_reviewed"] += 1
                continue
        r = _parse_record(path, line_no, line)
        if not isinstance(r, dict) or not isinstance(r.get("asin"), (str, int)):
            raise DataError(f"{path}: line {line_no}: not a meta record with an 'asin'")
        asin = str(r["asin"])
        if asins is not None and asin not in asins:
            counts["meta_not_reviewed"] += 1
            continue
        if asin in out:
            counts["meta_duplicate"] += 1
            continue
        paths = r.get("categories")
        if paths is None:
            paths = []
        if not isinstance(paths, (list, tuple)) or not all(
            isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c) for c in paths
        ):
            raise DataError(
                f"{path}: line {line_no}: 'categories' of {asin!r} is not a list of lists of "
                "strings"
            )
        cat = paths[categories_list][-1].strip() if paths and paths[categories_list] else ""
        if not cat:
            counts["meta_no_category"] += 1
        elif HIST_SEP in cat or "\n" in cat or "\r" in cat:
            cat = re.sub(r"[\^\r\n]", "_", cat)
            counts["meta_category_renamed"] += 1
        out[asin] = cat
    counts["meta_kept"] = len(out)
    if stats is not None:
        stats.update(counts)
    return out


AMAZON_NO_CATEGORY = "(none)"  # category of a reviewed item with no category in the meta file

# The start of a 2014 meta line, ``{'asin': '0000031852', ...``: enough to skip unwanted items.
_META_ASIN_RE = re.compile(r"""\s*\{\s*(['"])asin\1\s*:\s*(['"])([^'"\\]*)\2\s*[,}]""")


def read_amazon_folder(
    folder: str | Path, category: str, *, categories_list: int = -1
) -> InteractionLog:
    """DIN's input from a folder holding McAuley's ``reviews_<category>_5.json(.gz)`` and
    ``meta_<category>.json(.gz)`` (plain or gzipped; the ``.gz`` when both are there): the reviews'
    (reviewerID, asin, unixReviewTime) log, with ``item_cat`` from :func:`read_amazon_meta` limited
    to the reviewed items. A reviewed item without a meta record, or with no category in it, gets
    :data:`AMAZON_NO_CATEGORY` (DIN would fail there; every item of the real 5-core files has a
    record) -- not ``""``, which the sequence encoder would drop from ``hist_cats``, misaligning it
    with ``hist_items``. Counted in ``info`` as ``items_without_meta``, next to the meta reader's
    counts."""
    folder = Path(folder)
    found = []
    for name in (f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz"):
        p = _gz_or_plain(folder / name)
        if p is None:
            raise DataError(f"{folder}: neither {name} nor {name[:-3]} found")
        found.append(p)
    log = read_amazon_reviews(found[0])
    asins = set(log.item.tolist())
    info: dict[str, int] = {"reviews": int(log.user.size), "items": len(asins)}
    cats = read_amazon_meta(found[1], asins, categories_list=categories_list, stats=info)
    info["items_without_meta"] = len(asins) - len(cats)
    log.item_cat = {a: cats.get(a) or AMAZON_NO_CATEGORY for a in asins}
    log.info = info
    return log


def _gz_or_plain(path: Path) -> Path | None:
    """``path`` if it is a file, else (for a ``*.gz`` name) the unzipped file beside it, or None."""
    if path.is_file():
        return path
    if path.suffix == ".gz" and path.with_suffix("").is_file():
        return path.with_suffix("")
    return None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, gzipped when named ``*.gz``, streamed; a decoding
    or gzip error is a DataError naming the file and the line."""
    line_no = 0
    try:
        fh = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(
            path, encoding="utf-8"
        )  # fmt: skip
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e})") from None
    with fh:
        try:
            for line_no, line in enumerate(fh, start=1):
                yield line_no, line
        except (UnicodeDecodeError, OSError, EOFError) as e:
            raise DataError(
                f"{path}: line {line_no + 1}: unreadable ({type(e).__name__}: {e})"
            ) from None


def _parse_record(path: Path, line_no: int, line: str) -> object:
    """A JSON value, or else a Python literal (``ast.literal_eval``, never ``eval``)."""
    try:
        return json.loads(line)
    except ValueError:
        pass
    try:
        return ast.literal_eval(line.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"{path}: line {line_no}: neither JSON nor a Python literal ({msg})"
        ) from None


def read_din_text(path: str | Path) -> Rows:
    """DIN / PaddleRec text: ``hist_items;hist_cats;target_item;target_cat;label`` per line
    (ids space-separated inside a field) -> rows with the columns of :func:`make_din_rows`
    (no ``user``: the format has none)."""
    out: Rows = {c: [] for c in ("item", "cat", "hist_items", "hist_cats", "label")}
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(";")
        if len(parts) != 5 or parts[4].strip() not in ("0", "1"):
            raise DataError(
                f"{path}: line {line_no}: expected 'hist_items;hist_cats;item;cat;label(0/1)'"
            )
        hi, hc = parts[0].split(), parts[1].split()
        if len(hi) != len(hc):
            raise DataError(f"{path}: line {line_no}: {len(hi)} history items but {len(hc)} cats")
        out["item"].append(parts[2].strip())
        out["cat"].append(parts[3].strip())
        out["hist_items"].append(HIST_SEP.join(hi))
        out["hist_cats"].append(HIST_SEP.join(hc))
        out["label"].append(parts[4].strip())
    if not out["label"]:
        raise DataError(f"{path}: no data rows")
    return out


def read_fuxictr_npz(folder: str | Path) -> tuple[dict[str, Rows], list[dict]]:
    """FuxiCTR's preprocessed ``{train,valid,test}.npz`` + ``feature_map.json`` -> rows per split
    (ids as text, 0 = padding dropped from sequences) and the spec fields."""
    folder = Path(folder)
    fmap = json.loads((folder / "feature_map.json").read_text(encoding="utf-8"))
    label = fmap["labels"][0]
    fields: list[dict] = []
    for entry in fmap["features"]:
        ((fname, info),) = entry.items()
        if info["type"] == "sequence":
            fields.append({"name": fname, "type": "sequence", "sep": HIST_SEP,
                           "max_len": int(info["max_len"]),
                           **({"share_vocab": info["share_embedding"]}
                              if info.get("share_embedding") else {})})  # fmt: skip
        elif info["type"] == "categorical":
            fields.append({"name": fname, "type": "categorical"})
        else:
            raise DataError(f"{folder}/feature_map.json: feature {fname!r} has unsupported "
                            f"type {info['type']!r}")  # fmt: skip
    out: dict[str, Rows] = {}
    for role in SPLITS:
        z = np.load(folder / f"{role}.npz")
        rows: Rows = {}
        for f in fields:
            a = z[f["name"]]
            if f["type"] == "sequence":
                rows[f["name"]] = [HIST_SEP.join(str(x) for x in r if x != 0) for r in a.tolist()]
            else:
                rows[f["name"]] = [str(x) for x in a.tolist()]
        rows["label"] = [str(int(x)) for x in z[label].tolist()]
        out[role] = rows
    return out, fields


# ----------------------------------------------------------------------------- built-ins


@dataclasses.dataclass(frozen=True)
class _Builtin:
    folder: str
    files: tuple[str, ...]  # relative to the folder: what must exist (and keys the build)
    kind: str  # "log" | "din_text" | "fuxictr"
    reader: Callable[[Path], InteractionLog] | None = None  # kind "log": from the folder
    gz_or_plain: bool = False  # a "*.gz" in ``files`` may instead be there unzipped
    download: bool = False  # `dpn-jax data download <name>` fetches the files

    def paths(self, folder: Path) -> list[Path | None]:
        """The file found for each of ``files`` (None: missing)."""
        if self.gz_or_plain:
            return [_gz_or_plain(folder / f) for f in self.files]
        return [folder / f if (folder / f).is_file() else None for f in self.files]


BUILTINS: dict[str, _Builtin] = {
    "amazon_videogames": _Builtin(
        "amazon_videogames_sasrec", ("Video.txt",), "log",
        lambda d: read_sasrec(d / "Video.txt"),
    ),
    "amazon_grocery": _Builtin(
        "amazon_grocery_rechorus", ("train.csv", "item_meta.csv"), "log", read_rechorus
    ),
    "amazon_instruments": _Builtin(
        "amazon_musical_instruments_5core", ("reviews_Musical_Instruments_5.json.gz",), "log",
        lambda d: read_amazon_reviews(d / "reviews_Musical_Instruments_5.json.gz"),
    ),
    **{
        f"amazon_{cat.lower()}": _Builtin(
            f"amazon_{cat.lower()}", (f"reviews_{cat}_5.json.gz", f"meta_{cat}.json.gz"), "log",
            lambda d, cat=cat: read_amazon_folder(d, cat), gz_or_plain=True, download=True,
        )
        for cat in ("Electronics", "Books")
    },
    "amazon_electronics_din": _Builtin(
        "amazon_electronics_din_paddlerec", ("sample_data.txt",), "din_text"
    ),
    "fuxictr_tiny_seq": _Builtin(
        "fuxictr_tiny/tiny_seq", ("feature_map.json", "train.npz", "valid.npz", "test.npz"),
        "fuxictr",
    ),
}  # fmt: skip


def builtin_folder(name: str, data_dir: str | Path | None = None) -> Path:
    """The source folder of a built-in behaviour dataset; a one-line DataError when incomplete."""
    from dpn_jax.data.frappe import find_data_dir

    b = BUILTINS[name]
    d = find_data_dir(data_dir)
    folder = d / b.folder
    missing = [f for f, p in zip(b.files, b.paths(folder), strict=True) if p is None]
    if missing:
        alt = " (or unzipped, without .gz)" if b.gz_or_plain else ""
        fetch = f"; `dpn-jax data download {name} --to DIR` fetches them" if b.download else ""
        raise DataError(
            f"{name}: {folder / missing[0]} not found in data dir {d}; set DPN_DATA_DIR (or "
            f"--data-dir) to a directory holding {b.folder}/ with {', '.join(b.files)}{alt}{fetch}"
        )
    return folder


def load_behaviour(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    *,
    max_len: int = DEFAULT_MAX_LEN,
    max_users: int | None = None,
    out_dir: str | Path | None = None,
) -> Dataset:
    """Load a built-in behaviour dataset (names: :data:`BUILTINS`). ``max_users`` bounds the
    users of an interaction log (a seeded subset); it does not apply to the fixture formats."""
    if name not in BUILTINS:
        raise DataError(f"unknown behaviour dataset {name!r}; known: {sorted(BUILTINS)}")
    b = BUILTINS[name]
    folder = builtin_folder(name, data_dir)
    sources = [p for p in b.paths(folder) if p is not None]
    if b.kind == "log":
        reader = b.reader
        assert reader is not None
        return build_behaviour_dataset(
            lambda: reader(folder), name, sources=sources, max_len=max_len, seed=seed,
            max_users=max_users, out_dir=out_dir, cache_dir=cache_dir, note=f"Source: {b.folder}/",
        )  # fmt: skip
    if max_users is not None:
        raise DataError(f"max_users applies to interaction logs, not to {name} (already CTR rows)")
    options = {"max_len": max_len, "seed": seed}
    comment = f"Re-written by dpn_jax.data.behaviour from {folder} (ids unchanged)."
    if b.kind == "din_text":

        def write(tmp: Path) -> None:
            write_csv_spec(
                tmp, name, {"train": read_din_text(sources[0])},
                [f for f in din_fields(True, max_len) if f["name"] != "user"],
                split={"valid": 0.1, "test": 0.1, "seed": seed},
                comment=comment + "\nNo user column; valid/test are carved (10% each, seeded).",
            )  # fmt: skip
    else:

        def write(tmp: Path) -> None:
            rows, fields = read_fuxictr_npz(folder)
            for f in fields:
                if f["type"] == "sequence":
                    f["max_len"] = min(f["max_len"], max_len)
            write_csv_spec(tmp, name, rows, fields, comment=comment)

    d = built_dir(name, sources, options, write, out_dir=out_dir, cache_dir=cache_dir)
    return _load_built(d, cache_dir, seed)
