"""The built-in ``frappe`` dataset (app usage, 10 categorical fields, libfm files).

With the full NFM split (``frappe.train.libfm`` present, e.g. after ``dpn-jax data download
frappe``): train / valid / test = the NFM train / validation / test files, as AFN used them.
Without it (this project's data dir holds only the validation (57,722 rows) and test (28,860 rows)
files): train = the validation file minus a seeded 10% held out as valid; test = the test file.
It goes through the same spec/encode/cache machinery as a user's YAML spec.
"""

from __future__ import annotations

import os
from pathlib import Path

from dpn_jax.data import cache, encode
from dpn_jax.data.schema import Dataset
from dpn_jax.data.spec import DEFAULT_SEED, DatasetSpec, parse_spec
from dpn_jax.errors import DataError

FRAPPE_FIELDS = (
    "user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city",
)  # fmt: skip
FRAPPE_TRAIN = "frappe/frappe.validation.libfm"
FRAPPE_TEST = "frappe/frappe.test.libfm"
FRAPPE_FULL_TRAIN = "frappe/frappe.train.libfm"  # the NFM train file, when downloaded


def repo_root() -> Path | None:
    """The directory holding ``pyproject.toml`` above this package (None when installed elsewhere)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def find_data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: ``explicit``, else ``$DPN_DATA_DIR``, else ``../shared/data`` next to the
    repo root, else ``../shared/data`` relative to the cwd. An explicit option or environment
    variable that does not exist is an error (never silently replaced by a default)."""
    tried: list[str] = []
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            return p.resolve()
        raise DataError(f"data dir {p} (given explicitly) does not exist")
    env = os.environ.get("DPN_DATA_DIR")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p.resolve()
        raise DataError(f"data dir {p} (from $DPN_DATA_DIR) does not exist")
    tried.append("$DPN_DATA_DIR (unset)")
    root = repo_root()
    candidates = ([root / ".." / "shared" / "data"] if root else []) + [
        Path.cwd() / ".." / "shared" / "data"
    ]
    for p in candidates:
        if p.is_dir():
            return p.resolve()
        tried.append(str(p.resolve()))
    raise DataError(
        f"no data dir found (tried {', '.join(tried)}); pass --data-dir or set DPN_DATA_DIR to the "
        "directory that holds frappe/"
    )


def frappe_spec(data_dir: str | Path | None = None, seed: int = DEFAULT_SEED) -> DatasetSpec:
    d = find_data_dir(data_dir)
    for rel in (FRAPPE_TRAIN, FRAPPE_TEST):
        if not (d / rel).is_file():
            raise DataError(
                f"frappe file {d / rel} not found in data dir {d}; set DPN_DATA_DIR (or --data-dir) "
                "to a directory holding frappe/frappe.validation.libfm and frappe/frappe.test.libfm"
            )
    raw = {
        "name": "frappe",
        "format": "libfm",
        "train": FRAPPE_TRAIN,
        "test": FRAPPE_TEST,
        "split": {"valid": 0.1, "test": 0.0, "seed": seed},
        "fields": [{"name": n, "type": "categorical"} for n in FRAPPE_FIELDS],
    }
    if (d / FRAPPE_FULL_TRAIN).is_file():
        raw.update(train=FRAPPE_FULL_TRAIN, valid=FRAPPE_TRAIN, split={"seed": seed})
    return parse_spec(raw, base_dir=d, source=f"built-in frappe (data dir {d})", default_seed=seed)


def load_frappe(
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
) -> Dataset:
    return cache.cached_dataset(frappe_spec(data_dir, seed), encode.build_dataset, cache_dir)
