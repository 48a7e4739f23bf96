"""YAML dataset specs: parse and validate into a frozen :class:`DatasetSpec`.

A spec says where the raw files are, how to read them and how to encode every field::

    name: my_data
    format: csv            # csv | parquet | libfm
    train: data/train-*.csv   # relative to the spec file; a glob is concatenated in sorted order
    valid: data/valid.csv     # optional; carved from train when absent (see split)
    split: {valid: 0.1, test: 0.1, seed: 2021}
    label: clicked
    label_values: [0, 1]   # or [-1, 1] (read as 0/1); libfm files may use either
    fields:
      - {name: user_id, type: categorical, min_count: 2}
      - {name: age, type: numeric, buckets: 10}
      - {name: price, type: numeric}
      - {name: hist, type: sequence, sep: "^", max_len: 50, share_vocab: item_id}

Every problem is reported as ONE line that starts with the spec's path (a :class:`DataError`),
because the CLI prints the message as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from dpn_jax.data.schema import FieldType
from dpn_jax.errors import DataError

Format = Literal["csv", "parquet", "libfm"]
FORMATS: tuple[str, ...] = ("csv", "parquet", "libfm")
FIELD_TYPES: tuple[str, ...] = ("categorical", "numeric", "sequence")
DEFAULT_SEED = 2021
LIBFM_LABEL = "label"  # the libfm reader stores each line's first token under this name
LABEL_VALUES = ((0, 1), (-1, 1))  # what a csv/parquet label column may hold (-1 is read as 0)

TOP_KEYS = (
    "name",
    "format",
    "train",
    "valid",
    "test",
    "split",
    "label",
    "label_values",
    "sep",
    "fields",
    "num_fields",
)
SPLIT_KEYS = ("valid", "test", "seed")
# Which per-field keys make sense for which type: a key of another type is an error, not ignored.
FIELD_KEYS: dict[str, tuple[str, ...]] = {
    "categorical": ("name", "type", "column", "min_count"),
    "numeric": ("name", "type", "column", "buckets"),
    "sequence": ("name", "type", "column", "min_count", "sep", "max_len", "share_vocab"),
}
ALL_FIELD_KEYS = tuple(dict.fromkeys(k for keys in FIELD_KEYS.values() for k in keys))
# Field names become file names in the cache and keys "seq/<name>" of a split.
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One input field as written in the spec (defaults filled in)."""

    name: str
    type: FieldType
    column: str  # source column (== name unless ``column:`` was given)
    min_count: int = 1  # categorical / own-vocab sequence: rarer tokens become OOV
    buckets: int = 0  # numeric: > 0 -> quantile-bucketised into a categorical field
    sep: str = ""  # sequence: token separator inside the cell
    max_len: int = 0  # sequence: keep the most recent max_len tokens
    share_vocab: str | None = None  # sequence: name of a categorical field whose block it uses

    @property
    def kind(self) -> Literal["cat", "num", "seq"]:
        """Where the encoded field lives in a split: a bucketised numeric field is categorical."""
        if self.type == "categorical" or (self.type == "numeric" and self.buckets > 0):
            return "cat"
        return "num" if self.type == "numeric" else "seq"


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Fractions carved (seeded, deterministic) from train for the splits without their own file."""

    valid: float = 0.1
    test: float = 0.1
    seed: int = DEFAULT_SEED


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset spec; file paths are resolved and known to exist."""

    name: str
    format: Format
    label: str
    fields: tuple[FieldSpec, ...]
    train: tuple[Path, ...]
    valid: tuple[Path, ...] = ()
    test: tuple[Path, ...] = ()
    split: SplitSpec = SplitSpec()
    sep: str = ","
    source: str = "<code>"  # the spec file (or a description of a built-in) for error messages
    label_values: tuple[int, int] = (0, 1)  # csv/parquet: the label column's two values

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def files(self) -> list[tuple[str, Path]]:
        """(role, path) of every input file, in a fixed order (for the cache key)."""
        return [(role, p) for role in ("train", "valid", "test") for p in getattr(self, role)]

    def canonical_json(self) -> str:
        """Everything that affects the encoding, as stable JSON. File CONTENTS are hashed
        separately by the cache; only base names appear here so a moved data dir still hits."""
        d = {
            "name": self.name,
            "format": self.format,
            "label": self.label,
            "sep": self.sep,
            "fields": [dataclasses.asdict(f) for f in self.fields],
            "split": dataclasses.asdict(self.split),
            "files": {r: [p.name for p in getattr(self, r)] for r in ("train", "valid", "test")},
        }
        if self.label_values != (0, 1):  # only when given: the other specs keep their cache key
            d["label_values"] = list(self.label_values)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- parsing


def load_spec(path: str | Path, default_seed: int = DEFAULT_SEED) -> DatasetSpec:
    """Read and validate a YAML spec; ``default_seed`` is used when ``split.seed`` is absent."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"dataset spec {p} not found (resolved to {p.resolve()})")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataError(f"{p}:{where} invalid YAML: {problem}") from None
    if not isinstance(raw, Mapping):
        raise DataError(f"{p}: a dataset spec must be a YAML mapping of keys {list(TOP_KEYS)}")
    raw = {"name": p.stem, **raw}  # the file name is a fine default dataset name
    return parse_spec(raw, base_dir=p.resolve().parent, source=str(p), default_seed=default_seed)


def parse_spec(
    raw: Mapping[str, Any], *, base_dir: str | Path, source: str, default_seed: int = DEFAULT_SEED
) -> DatasetSpec:
    """Validate a spec given as a mapping (what the YAML holds); paths are relative to base_dir."""
    v = _Validator(source)
    v.keys(raw, TOP_KEYS, "at the top level")
    for key in ("name", "format", "train"):
        v.require(raw, key, "the spec")
    name = v.string(raw["name"], "name")
    if not _NAME_RE.match(name):
        v.fail(
            f"name {name!r} must be letters, digits, '_', '.', '-' (it names the cache directory)"
        )
    fmt = v.string(raw["format"], "format")
    if fmt not in FORMATS:
        v.fail(
            f"format {fmt!r} is not supported; expected one of {list(FORMATS)}{_suggest(fmt, FORMATS)}"
        )
    sep = _unescape(v.string(raw.get("sep", ","), "sep"))
    if fmt == "csv" and len(sep) != 1:
        v.fail(f"sep must be a single character for csv (e.g. ',' or '\\t'), got {sep!r}")
    if fmt == "libfm":
        label = LIBFM_LABEL  # libfm: the label is each line's first token
    else:
        v.require(raw, "label", f"a {fmt} spec")
        label = v.string(raw["label"], "label")
    label_values = (0, 1)
    if raw.get("label_values") is not None:
        if fmt == "libfm":
            v.fail("label_values applies to csv and parquet; libfm labels may be 0/1 or -1/1 as they are")
        given = raw["label_values"]
        if not isinstance(given, list) or tuple(given) not in LABEL_VALUES:
            v.fail(f"label_values must be [0, 1] or [-1, 1], got {given!r}")
        label_values = (int(given[0]), int(given[1]))

    fields = _parse_fields(v, raw, fmt)
    if fmt != "libfm":
        for f in fields:
            if f.column == label:
                v.fail(
                    f"field {f.name!r} reads the label column {label!r}; a feature must not be the label"
                )

    split_raw = raw.get("split", {}) or {}
    if not isinstance(split_raw, Mapping):
        v.fail(f"split must be a mapping like {{valid: 0.1, test: 0.1, seed: {DEFAULT_SEED}}}")
    v.keys(split_raw, SPLIT_KEYS, "in split")
    fr = {k: v.fraction(split_raw.get(k, 0.1), f"split.{k}") for k in ("valid", "test")}
    seed = v.integer(split_raw.get("seed", default_seed), "split.seed", minimum=0)

    base = Path(base_dir)
    files = {r: v.files(raw.get(r), r, base) for r in ("train", "valid", "test")}
    # A fraction only matters for a split that has no file of its own.
    carved = sum(fr[r] for r in ("valid", "test") if not files[r])
    if carved >= 1.0:
        v.fail(
            f"split fractions carved from train sum to {carved:g}; they must leave some rows for train"
        )
    split = SplitSpec(
        valid=0.0 if files["valid"] else fr["valid"],
        test=0.0 if files["test"] else fr["test"],
        seed=seed,
    )
    return DatasetSpec(
        name=name, format=fmt, label=label, fields=fields, train=files["train"], valid=files["valid"],
        test=files["test"], split=split, sep=sep, source=source, label_values=label_values,
    )  # fmt: skip


def _parse_fields(v: _Validator, raw: Mapping[str, Any], fmt: str) -> tuple[FieldSpec, ...]:
    if fmt == "libfm" and "num_fields" in raw:
        if "fields" in raw:
            v.fail("give either fields (names in position order) or num_fields, not both")
        n = v.integer(raw["num_fields"], "num_fields", minimum=1)
        items: list[Any] = [{"name": f"f{i}", "type": "categorical"} for i in range(n)]
    elif "num_fields" in raw:
        v.fail(
            f"num_fields applies only to format libfm (this spec's format is {fmt}); list the fields"
        )
    else:
        v.require(
            raw, "fields", "the spec" + (" (or num_fields for libfm)" if fmt == "libfm" else "")
        )
        items = raw["fields"]
        if not isinstance(items, list) or not items:
            v.fail(
                "fields must be a non-empty list of mappings like {name: user_id, type: categorical}"
            )

    out: list[FieldSpec] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            v.fail(
                f"fields[{i}] must be a mapping like {{name: user_id, type: categorical}}, got {item!r}"
            )
        ref = f"field {item['name']!r}" if isinstance(item.get("name"), str) else f"fields[{i}]"
        v.keys(item, ALL_FIELD_KEYS, f"in {ref}")
        if fmt == "libfm":
            item = {"type": "categorical", **item}  # libfm positions are categorical ids
        v.require(item, "name", f"fields[{i}]")
        v.require(item, "type", f"field {item['name']!r}")
        name = v.string(item["name"], f"fields[{i}].name")
        if not _NAME_RE.match(name):
            v.fail(
                f"field name {name!r} must be letters, digits, '_', '.', '-' and start with a letter or '_'"
            )
        where = f"field {name!r}"
        ftype = v.string(item["type"], f"{where} type")
        if ftype not in FIELD_TYPES:
            v.fail(
                f"{where}: type {ftype!r} is not one of {list(FIELD_TYPES)}{_suggest(ftype, FIELD_TYPES)}"
            )
        if fmt == "libfm" and ftype != "categorical":
            v.fail(
                f"{where}: libfm fields are token positions and must be categorical, not {ftype}"
            )
        for key in item:
            if key not in FIELD_KEYS[ftype]:
                owners = [t for t, ks in FIELD_KEYS.items() if key in ks]
                v.fail(
                    f"{where} ({ftype}): key {key!r} applies only to {' / '.join(owners)} fields"
                )
        if fmt == "libfm" and "column" in item:
            v.fail(f"{where}: libfm fields are named by position; 'column' does not apply")
        kw: dict[str, Any] = {"name": name, "type": ftype}
        kw["column"] = v.string(item.get("column", name), f"{where} column")
        if "min_count" in item:
            kw["min_count"] = v.integer(item["min_count"], f"{where} min_count", minimum=1)
        if "buckets" in item:
            kw["buckets"] = v.integer(item["buckets"], f"{where} buckets", minimum=2)
        if ftype == "sequence":
            v.require(item, "sep", where)
            v.require(item, "max_len", where)
            kw["sep"] = _unescape(v.string(item["sep"], f"{where} sep"))
            kw["max_len"] = v.integer(item["max_len"], f"{where} max_len", minimum=1)
            if "share_vocab" in item:
                kw["share_vocab"] = v.string(item["share_vocab"], f"{where} share_vocab")
                if "min_count" in item:
                    v.fail(
                        f"{where}: min_count does not apply with share_vocab (the vocabulary is {kw['share_vocab']!r}'s)"
                    )
        out.append(FieldSpec(**kw))

    names = [f.name for f in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        v.fail(
            f"duplicate field name(s) {dup}; every field needs a unique name (use column: to read a column twice)"
        )
    by_name = {f.name: f for f in out}
    for f in out:
        if f.share_vocab is None:
            continue
        target = by_name.get(f.share_vocab)
        if target is None:
            v.fail(
                f"field {f.name!r}: share_vocab {f.share_vocab!r} is not a field of this spec; fields are {names}{_suggest(f.share_vocab, names)}"
            )
        if target.kind != "cat" or target.type != "categorical":
            v.fail(
                f"field {f.name!r}: share_vocab {f.share_vocab!r} must name a categorical field, but it is {target.type}"
            )
    return tuple(out)


class _Validator:
    """Small helpers that raise one-line DataErrors prefixed with the spec's source."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, msg: str) -> NoReturn:
        raise DataError(f"{self.source}: {msg}")

    def keys(self, d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
        for k in d:
            if k not in allowed:
                self.fail(
                    f"unknown key {k!r} {where}; allowed keys are {list(allowed)}{_suggest(str(k), allowed)}"
                )

    def require(self, d: Mapping[str, Any], key: str, where: str) -> None:
        if key not in d or d[key] is None:
            self.fail(f"missing required key {key!r} in {where}")

    def string(self, x: Any, what: str) -> str:
        if not isinstance(x, str) or x == "":
            self.fail(f"{what} must be a non-empty string, got {x!r}")
        return x

    def integer(self, x: Any, what: str, minimum: int) -> int:
        if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
            self.fail(f"{what} must be an integer >= {minimum}, got {x!r}")
        return int(x)

    def fraction(self, x: Any, what: str) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < 1.0:
            self.fail(f"{what} must be a fraction in [0, 1), got {x!r}")
        return float(x)

    def files(self, x: Any, role: str, base: Path) -> tuple[Path, ...]:
        """Resolve a path, glob or list of them (relative to the spec); every one must exist."""
        if x is None:
            return ()
        patterns = x if isinstance(x, list) else [x]
        out: list[Path] = []
        for pat in patterns:
            pat = self.string(pat, role)
            full = Path(pat).expanduser()
            full = full if full.is_absolute() else base / full
            if glob.has_magic(str(full)):
                matches = sorted(Path(m) for m in glob.glob(str(full)) if Path(m).is_file())
                if not matches:
                    self.fail(f"{role}: no file matches {pat!r} (resolved to {full})")
                out.extend(matches)
            elif not full.is_file():
                self.fail(f"{role} file not found: {pat!r} (resolved to {full})")
            else:
                out.append(full)
        return tuple(out)


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unescape(sep: str) -> str:
    # YAML single quotes (or no quotes) keep "\t" literally; a tab is what is meant.
    return {"\\t": "\t", "tab": "\t", "\\n": "\n"}.get(sep, sep)
