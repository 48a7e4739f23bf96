"""The paper's tabular datasets as built-ins, with their standard preprocessing.

Each name reads raw files from ``<data dir>/<folder>/`` (``dpn-jax data download NAME --to DIR``
fetches them; :func:`dpn_jax.data.frappe.find_data_dir` finds the data dir) and is encoded in
bounded memory by :mod:`dpn_jax.data.stream` into the dataset cache.

=======================  ======================================  ==========================  =======
name                     files in ``<data dir>/<folder>/``       split                       fields
=======================  ======================================  ==========================  =======
``criteo``               ``criteo/train.txt`` (Kaggle raw TSV)   random 7:2:1 (AFN), seeded  39
``criteo_x1``            ``Criteo_x1/{train,valid,test}.csv``    BARS files (7:2:1, AFN)     39
``avazu``                ``avazu/train.gz`` (Kaggle raw CSV)     random 7:1:2 (AFN), seeded  23
``avazu_x1``             ``Avazu_x1/{train,valid,test}.csv``     BARS files (7:1:2, AFN)     22
``movielens_tag``        ``movielens_tag/ml-tag.*.libfm`` (NFM)  the NFM files               3
``movielens_latest_x1``  ``MovielensLatest_x1/*.csv``            BARS files (7:2:1, AFN)     3
``frappe_x1``            ``Frappe_x1/*.csv``                     BARS files (7:2:1, AFN)     10
=======================  ======================================  ==========================  =======

Preprocessing, with its source:

* ``criteo`` (raw): the Criteo challenge winners' transform used by BARS Criteo_x4 and FuxiCTR
  (``convert_to_bucket``): an integer ``v > 2`` becomes the category ``floor(ln(v)^2)``, any other
  value the category ``int(v)``; a blank integer is 0 first (FuxiCTR's ``na_value: 0``). The 26
  hashed categorical columns are kept as text (blank = the category ``""``). Categories seen fewer
  than 10 times in train map to OOV (``min_categr_count: 10``). The Kaggle ``test.txt`` has no
  labels, so the labelled ``train.txt`` (45,840,617 rows) is split 7:2:1 at random as AFN did
  (our seeded split, not BARS's files: use ``criteo_x1`` to compare with published numbers).
* ``criteo_x1``: BARS/AFN's released split. ``I1..I13`` are dense numeric fields (standardised
  with train statistics here) and ``C1..C26`` categorical with ``min_categr_count: 1``, as in the
  BARS Criteo_x1 benchmark config.
* ``avazu`` (raw): ``id`` dropped; ``hour`` (``YYMMDDHH``) split into hour-of-day and weekday
  (FuxiCTR Avazu_x4's ``convert_hour``/``convert_weekday``); the other 21 columns categorical;
  ``min_categr_count: 2`` (Avazu_x4). Random 7:1:2 split as AFN/Avazu_x1.
* ``avazu_x1``, ``movielens_latest_x1``, ``frappe_x1``: BARS's released files, every field
  categorical, ``min_categr_count: 1`` (the BARS configs).
* ``movielens_tag``: the NFM/AFN libfm files (``label idx:1 idx:1 idx:1`` for user, item, tag;
  label -1/1), train/validation/test as given.

The integer and hour transforms live in :mod:`dpn_jax.data.transforms` and are recorded in each
field's encoder, so a bundle trained on ``criteo`` or ``avazu`` scores RAW rows (``dpn-jax
predict`` on a CSV with columns ``I1..I13, C1..C26``, or Avazu's header) exactly as the training
data was encoded.

Malformed input: a line with the wrong number of columns, an unparsable label or number is an
error naming the file, line and column; ``skip_malformed=True`` (``--skip-malformed``) skips lines
with a wrong column count instead and records how many in ``ds.meta["skipped_lines"]``. Blank lines
are not rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dpn_jax.data import transforms
from dpn_jax.data.schema import Dataset
from dpn_jax.data.spec import DEFAULT_SEED
from dpn_jax.data.stream import Chunk, Progress, StreamField, encode_stream
from dpn_jax.errors import DataError

BUILDER_VERSION = 1  # bump when any preprocessing below changes, to invalidate prepared data
BLOCK_BYTES = 4 << 20  # raw bytes per chunk; pyarrow queues up to 32 blocks ahead, so memory ~ 40x this

CRITEO_INT = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT = tuple(f"C{i}" for i in range(1, 27))
AVAZU_RAW = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
             "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
             "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20",
             "C21")  # fmt: skip
AVAZU_CAT = AVAZU_RAW[3:]
FRAPPE_X1 = ("user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
             "country", "city")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TabularBuiltin:
    folder: str
    describe: str
    fields: Callable[[int | None], tuple[StreamField, ...]]  # min_count override -> fields
    files: Callable[[Path], dict[str, Path]]  # folder -> role ("all" for a random split) -> file
    chunks: Callable[[dict[str, Path], Progress, ReadOptions], Iterator[Chunk]]


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    seed: int = DEFAULT_SEED
    skip_malformed: bool = False
    skipped: list = dataclasses.field(default_factory=list)  # (file, line) of skipped lines


# ----------------------------------------------------------------------------- transforms


def transformed(name: str, col, path: Path, first: int, locate: _Locator, column: str) -> pa.Array:
    """A :mod:`transforms` function on one chunk; a bad value names its file and line."""
    try:
        return transforms.TRANSFORMS[name](col)
    except transforms.TransformError as e:
        raise DataError(f"{path}: line {locate(first + e.index)}: column {column!r} is {e.value!r}; "
                        f"expected {e.expected}") from None  # fmt: skip


# ----------------------------------------------------------------------------- reading


class _Counting:
    """A binary file that reports how many bytes were read (for the progress bar)."""

    def __init__(self, path: Path, bar: Progress):
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by pyarrow through close()
        self._bar = bar
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        b = self._fh.read(n)
        self._bar.advance(len(b))
        return b

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._fh.close()
        self.closed = True


def _open(path: Path, bar: Progress) -> pa.NativeFile:
    stream = pa.PythonFile(_Counting(path, bar), mode="r")
    if path.suffix in (".gz", ".gzip"):
        return pa.CompressedInputStream(stream, "gzip")
    return stream


class _Locator:
    """Maps a 0-based data row of a file to its 1-based line number, rescanning the file (only
    ever on an error). Lines with the wrong column count are not rows (pyarrow skipped them, or
    the read already stopped at the first one); blank lines are not rows either."""

    def __init__(self, path: Path, header: bool, sep: str, ncols: int):
        self.path, self.header, self.sep, self.ncols = path, header, sep.encode(), ncols

    def _lines(self) -> Iterator[tuple[int, bytes, bool]]:
        import gzip

        opener = gzip.open if self.path.suffix in (".gz", ".gzip") else open
        with opener(self.path, "rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                if (self.header and line_no == 1) or not line.strip():
                    continue
                yield line_no, line, len(line.rstrip(b"\r\n").split(self.sep)) == self.ncols

    def __call__(self, row: int) -> int:
        k = -1
        for line_no, _, ok in self._lines():
            k += ok
            if ok and k == row:
                return line_no
        return -1

    def first_malformed(self) -> tuple[int, int]:
        """(line, column count) of the first line with the wrong number of columns."""
        for line_no, line, ok in self._lines():
            if not ok:
                return line_no, len(line.rstrip(b"\r\n").split(self.sep))
        return -1, -1


def read_csv_chunks(
    path: Path, bar: Progress, opts: ReadOptions, *, sep: str, columns: Sequence[str],
    header: bool, what: str,
) -> Iterator[tuple[pa.RecordBatch, int, _Locator]]:  # fmt: skip
    """Record batches of ``columns`` (all text) with each batch's first data row and a line
    locator. With ``header``, the header must hold every name of ``columns``; without one the
    file must have exactly ``len(columns)`` columns per line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    locate = _Locator(path, header, sep, len(columns) if not header else 0)
    bad: list[Any] = []

    def on_invalid(row) -> str:
        # row.number is None when pyarrow parses blocks in threads: lines are found by rescanning.
        if opts.skip_malformed:
            opts.skipped.append((str(path), row.number))
            return "skip"
        bad.append(row)
        return "error"

    read = pacsv.ReadOptions(block_size=BLOCK_BYTES, use_threads=True,
                             column_names=None if header else list(columns))  # fmt: skip
    parse = pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid)
    names = list(columns)
    stream = _open(path, bar)
    try:
        if header:
            # Checked first so a wrong file is named before any work (reads one block).
            with pacsv.open_csv(_open(path, Progress(1, False, lambda m: None)), read_options=read,
                                parse_options=pacsv.ParseOptions(delimiter=sep)) as probe:  # fmt: skip
                present = probe.schema.names
            missing = [c for c in names if c not in present]
            if missing:
                raise DataError(f"{path}: column {missing[0]!r} not found; expected a header with "
                                f"{what}, the file's columns are {present}")  # fmt: skip
            locate.ncols = len(present)
        convert = pacsv.ConvertOptions(include_columns=names,
                                       column_types={c: pa.string() for c in names},
                                       strings_can_be_null=True, null_values=[""])  # fmt: skip
        try:
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse,
                                    convert_options=convert)  # fmt: skip
            first = 0
            for batch in reader:
                yield batch, first, locate
                first += batch.num_rows
        except pa.ArrowInvalid as e:
            if bad:
                line, found = locate.first_malformed()
                raise DataError(
                    f"{path}: line {line}: expected {bad[0].expected_columns} "
                    f"{'tab' if sep == chr(9) else repr(sep)}-separated columns ({what}), found "
                    f"{found}; fix the line or pass --skip-malformed to skip such lines"
                ) from None
            raise DataError(f"{path}: cannot read as {what}: {str(e).splitlines()[0]}") from None
    finally:
        stream.close()


def labels(col: pa.Array, path: Path, first: int, locate: _Locator, name: str,
           minus_one: bool = False) -> np.ndarray:  # fmt: skip
    """0/1 text (with ``minus_one``, libfm's -1/1 too) -> float32 0/1; anything else names its
    line."""
    allowed = ["0", "1", "0.0", "1.0"] + (["-1", "-1.0"] if minus_one else [])
    text = col.fill_null("")
    ok = pc.is_in(text, value_set=pa.array(allowed))
    if not pc.all(ok).as_py():
        i = int(np.flatnonzero(~np.asarray(ok.to_numpy(zero_copy_only=False)))[0])
        raise DataError(f"{path}: line {locate(first + i)}: label {name!r} is {text[i].as_py()!r}; "
                        f"expected {'0/1 or -1/1' if minus_one else '0/1'}")  # fmt: skip
    return (pc.cast(pc.cast(text, pa.float64()), pa.float32()).to_numpy(zero_copy_only=False) > 0
            ).astype(np.float32)  # fmt: skip


def numbers(col: pa.Array, path: Path, first: int, locate: _Locator, name: str) -> np.ndarray:
    """Text -> float64 with NaN for blanks; an unparsable cell names its line and column."""
    try:
        return transforms.as_float(col)
    except transforms.TransformError as e:
        raise DataError(f"{path}: line {locate(first + e.index)}: column {name!r} is {e.value!r}; "
                        "expected a number (or a blank for missing)") from None  # fmt: skip


def random_roles(first: int, n: int, seed: int, fractions: tuple[float, float]) -> np.ndarray:
    """0/1/2 (train/valid/test) per row from a hash of (seed, row number): the same rows land
    in the same split whatever the chunk size. ``fractions`` = (valid, test)."""
    with np.errstate(over="ignore"):
        z = np.arange(first, first + n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    valid, test = fractions
    return np.where(u < 1 - valid - test, 0, np.where(u < 1 - test, 1, 2)).astype(np.uint8)


# ----------------------------------------------------------------------------- datasets


def _cat_fields(names: Sequence[str], min_count: int) -> tuple[StreamField, ...]:
    return tuple(StreamField(n, "cat", min_count) for n in names)


def _criteo_chunks(files, bar, opts):
    path = files["all"]
    cols = ("label", *CRITEO_INT, *CRITEO_CAT)
    what = "label, I1..I13, C1..C26"
    for b, first, locate in read_csv_chunks(path, bar, opts, sep="\t", columns=cols,
                                            header=False, what=what):  # fmt: skip
        out = {c: transforms.criteo_int(numbers(b.column(c), path, first, locate, c)) for c in CRITEO_INT}
        out.update({c: b.column(c) for c in CRITEO_CAT})
        y = labels(b.column("label"), path, first, locate, "label")
        yield Chunk(out, y, random_roles(first, b.num_rows, opts.seed, (0.2, 0.1)))


def _avazu_chunks(files, bar, opts):
    path = files["all"]
    for b, first, locate in read_csv_chunks(path, bar, opts, sep=",", columns=AVAZU_RAW[1:],
                                            header=True, what="Avazu's id, click, hour, C1, ... C21"):  # fmt: skip
        hour = b.column("hour").to_numpy(zero_copy_only=False)
        out = {"hour": transformed("avazu_hour_of_day", hour, path, first, locate, "hour"),
               "weekday": transformed("avazu_weekday", hour, path, first, locate, "hour"),
               **{c: b.column(c) for c in AVAZU_CAT}}  # fmt: skip
        y = labels(b.column("click"), path, first, locate, "click")
        yield Chunk(out, y, random_roles(first, b.num_rows, opts.seed, (0.1, 0.2)))


def _csv_x1_chunks(features: Sequence[str], what: str, numeric: Sequence[str] = ()):
    """BARS train/valid/test csv files; ``numeric`` columns are parsed as dense floats."""

    def chunks(files, bar, opts):
        for r, role in enumerate(("train", "valid", "test")):
            path = files[role]
            for b, first, locate in read_csv_chunks(path, bar, opts, sep=",",
                                                    columns=("label", *numeric, *features),
                                                    header=True, what=what):  # fmt: skip
                out = {c: pa.array(numbers(b.column(c), path, first, locate, c)) for c in numeric}
                out.update({c: b.column(c) for c in features})
                yield Chunk(out, labels(b.column("label"), path, first, locate, "label"), r)

    return chunks


def _libfm_chunks(fields: Sequence[str]):
    def chunks(files, bar, opts):
        for r, role in enumerate(("train", "valid", "test")):
            path = files[role]
            for b, first, locate in read_csv_chunks(path, bar, opts, sep=" ",
                                                    columns=("label", *fields), header=False,
                                                    what=f"label and {len(fields)} idx:val tokens"):  # fmt: skip
                out = {f: pc.replace_substring_regex(b.column(f), pattern=":.*$", replacement="")
                       for f in fields}  # fmt: skip
                yield Chunk(out, labels(b.column("label"), path, first, locate, "label",
                                        minus_one=True), r)  # fmt: skip

    return chunks


def _find(folder: Path, names: dict[str, Sequence[str]], hint: str) -> dict[str, Path]:
    """role -> the first existing candidate, looked up in the folder or one level below it
    (archives often unpack into a sub-folder)."""
    roots = [folder, *sorted(p for p in folder.glob("*") if p.is_dir())] if folder.is_dir() else []
    for root in roots:
        found = {role: next((root / c for c in cands if (root / c).is_file()), None)
                 for role, cands in names.items()}  # fmt: skip
        if all(found.values()):
            return found  # type: ignore[return-value]
    expected = ", ".join(" or ".join(c) for c in names.values())
    raise DataError(f"{folder}: expected {expected} there ({hint}); fetch them with `dpn-jax data "
                    f"download` or pass --data-dir / set DPN_DATA_DIR to the folder above it")  # fmt: skip


_X1 = {"train": ["train.csv"], "valid": ["valid.csv"], "test": ["test.csv"]}

BUILTINS: dict[str, TabularBuiltin] = {
    "criteo": TabularBuiltin(
        "criteo", "Criteo Kaggle display-ads raw TSV, winners' integer transform, min count 10",
        lambda m: (*(StreamField(c, "cat", m or 10, transform="criteo_int") for c in CRITEO_INT),
                   *_cat_fields(CRITEO_CAT, m or 10)),
        lambda d: _find(d, {"all": ["train.txt", "train.txt.gz", "dac/train.txt"]},
                        "the Kaggle display-advertising challenge's train.txt"),
        _criteo_chunks),
    "criteo_x1": TabularBuiltin(
        "Criteo_x1", "Criteo, BARS/AFN Criteo_x1 split (I1..I13 dense, C1..C26 categorical)",
        lambda m: (*(StreamField(c, "num") for c in CRITEO_INT), *_cat_fields(CRITEO_CAT, m or 1)),
        lambda d: _find(d, _X1, "BARS Criteo_x1"),
        _csv_x1_chunks(CRITEO_CAT, "label, I1..I13, C1..C26", numeric=CRITEO_INT)),
    "avazu": TabularBuiltin(
        "avazu", "Avazu Kaggle raw CSV, hour -> hour of day + weekday, id dropped, min count 2",
        lambda m: (StreamField("hour", "cat", m or 2, transform="avazu_hour_of_day"),
                   StreamField("weekday", "cat", m or 2, column="hour", transform="avazu_weekday"),
                   *_cat_fields(AVAZU_CAT, m or 2)),
        lambda d: _find(d, {"all": ["train.gz", "train.csv.gz", "train.csv", "train"]},
                        "the Kaggle avazu-ctr-prediction train file"),
        _avazu_chunks),
    "avazu_x1": TabularBuiltin(
        "Avazu_x1", "Avazu, BARS/AFN Avazu_x1 split (feat_1..feat_22 categorical)",
        lambda m: _cat_fields([f"feat_{i}" for i in range(1, 23)], m or 1),
        lambda d: _find(d, _X1, "BARS Avazu_x1"),
        _csv_x1_chunks([f"feat_{i}" for i in range(1, 23)], "label, feat_1..feat_22")),
    "movielens_tag": TabularBuiltin(
        "movielens_tag", "MovieLens-tag (NFM/AFN libfm files: user, item, tag)",
        lambda m: _cat_fields(("user", "item", "tag"), m or 1),
        lambda d: _find(d, {"train": ["ml-tag.train.libfm"], "valid": ["ml-tag.validation.libfm"],
                            "test": ["ml-tag.test.libfm"]}, "the NFM ml-tag libfm files"),
        _libfm_chunks(("user", "item", "tag"))),
    "movielens_latest_x1": TabularBuiltin(
        "MovielensLatest_x1", "MovieLens-tag, BARS MovielensLatest_x1 split (user, item, tag)",
        lambda m: _cat_fields(("user_id", "item_id", "tag_id"), m or 1),
        lambda d: _find(d, _X1, "BARS MovielensLatest_x1"),
        _csv_x1_chunks(("user_id", "item_id", "tag_id"), "label, user_id, item_id, tag_id")),
    "frappe_x1": TabularBuiltin(
        "Frappe_x1", "Frappe, BARS Frappe_x1 split (10 categorical fields)",
        lambda m: _cat_fields(FRAPPE_X1, m or 1),
        lambda d: _find(d, _X1, "BARS Frappe_x1"),
        _csv_x1_chunks(FRAPPE_X1, "label, user, item, daytime, ..., city")),
}  # fmt: skip
OPTIONS = ("min_count", "skip_malformed", "progress")


def builtin_files(name: str, data_dir: str | Path | None = None) -> dict[str, Path]:
    from dpn_jax.data.frappe import find_data_dir

    return BUILTINS[name].files(find_data_dir(data_dir) / BUILTINS[name].folder)


def load_tabular(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    *,
    min_count: int | None = None,
    skip_malformed: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Dataset:
    """Encode (first time: two streaming passes) or load a built-in tabular dataset.
    ``min_count`` overrides the dataset's standard threshold (e.g. for a small sample)."""
    from dpn_jax.data.cache import default_cache_dir

    if name not in BUILTINS:
        raise DataError(f"unknown tabular dataset {name!r}; known: {sorted(BUILTINS)}")
    if min_count is not None and (isinstance(min_count, bool) or int(min_count) < 1):
        raise DataError(f"min_count must be an integer >= 1, got {min_count!r}")
    b = BUILTINS[name]
    files = builtin_files(name, data_dir)
    fields = b.fields(min_count)
    options = {"seed": seed, "min_count": min_count, "skip_malformed": skip_malformed}
    h = hashlib.sha256(f"dpn-jax-tabular-v{BUILDER_VERSION}\n{name}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for role, p in sorted(files.items()):
        h.update(f"\n{role}:{p.name}:{cached_sha256(p, root)}".encode())
    directory = root / f"{name}-{h.hexdigest()[:20]}"
    opts = ReadOptions(seed=seed, skip_malformed=skip_malformed)
    say = log or (lambda m: print(m, flush=True))
    meta = {"source": f"built-in {name} ({b.describe}) from {sorted(str(p) for p in files.values())}",
            "builtin": {"name": name, **options}}  # fmt: skip

    def source(bar: Progress) -> Iterator[Chunk]:
        opts.skipped.clear()
        yield from b.chunks(files, bar, opts)
        # Read by encode_stream when it writes meta.json, after the last pass.
        meta["skipped_lines"] = len(opts.skipped)
        meta["skipped_first"] = [list(s) for s in opts.skipped[:20]]

    total = sum(p.stat().st_size for p in files.values())
    ds = encode_stream(name, fields, source, directory, total_bytes=total, meta=meta,
                       progress=progress, log=say)  # fmt: skip
    if not ds.meta["cache"]["hit"] and opts.skipped:
        say(f"note  {name}: skipped {len(opts.skipped):,} malformed lines (wrong column count; "
            f"first in {opts.skipped[0][0]})")  # fmt: skip
    return ds


def cached_sha256(path: Path, cache_root: Path) -> str:
    """sha256 of a file's content, memoised by (path, size, mtime) under the cache root: a
    40 GB raw file is hashed once, not at every load."""
    from dpn_jax.data.cache import file_sha256

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_root / "file_sha256.json"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(path)
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{np.random.default_rng().integers(1 << 30)}.tmp")
            tmp.write_text(json.dumps(known), encoding="utf-8")
            tmp.replace(memo)
        except OSError:
            pass  # a read-only cache only costs re-hashing
    return known[key]
