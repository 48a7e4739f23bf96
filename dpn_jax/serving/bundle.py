"""The model bundle: everything ``dpn-jax train --out DIR`` needs to score raw rows later.

Layout (format version :data:`BUNDLE_FORMAT_VERSION`)::

    bundle.json     format + version, model name, metrics, versions, sha256 of every file below
    model.json      {"name": registry name, "config": every model option, "train": TrainConfig, "seed"}
    params.msgpack  flax msgpack of {"params": ..., "batch_stats": ...} (the best epoch's)
    schema.json     the encoded-dataset Schema (field blocks, offsets, sequence lengths)
    encoders.json   FittedEncoders.to_json(): vocabularies, OOV, bucket edges, mean/std, sequences
    dataset.json    where the data came from: the spec (canonical JSON) or the built-in's options
    spec.yaml       a copy of the dataset spec file (spec datasets only)
    results.json    the run's metrics, history and configuration

The bundle is written into a temporary folder beside ``DIR`` that replaces ``DIR`` only once
complete (:func:`dpn_jax.atomic.atomic_dir`): a failed or interrupted write leaves the previous
bundle as it was. Entries of ``DIR`` that are not bundle files (the run's ``checkpoints/``) are
carried into the new folder. ``bundle.json`` is written last, so a directory without it is not a
finished bundle. Every other file is checked against its recorded sha256 on load: an edited config
or swapped parameter file is rejected instead of silently scoring with a model that was never
evaluated. The files ``bundle.json`` lists must be plain files of the bundle folder itself: a name
such as ``../x``, an absolute path or a symbolic link leading out of the folder is refused.

For the built-in ``synthetic`` data (generated already encoded) the bundle records an encoder
whose raw format is one column per field ``f0..f{F-1}`` holding the value index ``0..vocab-1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpn_jax.atomic import atomic_dir
from dpn_jax.data import BUILTIN
from dpn_jax.data.encode import FieldEncoder, FittedEncoders
from dpn_jax.data.schema import FIRST, Dataset, Schema
from dpn_jax.errors import DpnError

BUNDLE_FORMAT = "dpn-jax-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
PARTS = ("model.json", "params.msgpack", "schema.json", "encoders.json", "dataset.json", "results.json")
BUNDLE_FILES = (*PARTS, "spec.yaml", BUNDLE_JSON)  # what a bundle write replaces in its folder
METRIC_KEYS = ("test_auc", "test_logloss", "valid_auc", "valid_logloss", "best_epoch", "epochs")
RETRAIN = "retrain with `dpn-jax train --model NAME --data DATA --out DIR`"


class BundleError(DpnError):
    """A model bundle is missing, incomplete, edited or from another format version."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encoders_for(dataset: Dataset) -> FittedEncoders:
    """The fitted encoders of a spec / frappe dataset, or the identity encoder of ``synthetic``."""
    if "encoders" in dataset.meta:
        return FittedEncoders.from_json(dataset.meta["encoders"])
    schema = dataset.schema
    if schema.seq_fields or schema.numeric_fields:
        raise BundleError(f"dataset {dataset.name!r} has no fitted encoders to put in the bundle")
    fields = tuple(
        FieldEncoder(f.name, "cat", f.name, vocab=[str(k) for k in range(f.vocab_size - FIRST)])
        for f in schema.fields
    )
    return FittedEncoders(schema=schema, label="label", fields=fields)


def data_id(data: str | Path) -> str:
    """How a bundle records its data: a built-in's name, else the spec file's absolute path."""
    return str(data) if str(data) in BUILTIN else str(Path(data).resolve())


def dataset_info(data: str, dataset: Dataset) -> dict[str, Any]:
    """What the data was and what a raw input row looks like."""
    builtin = data if data in ("frappe", "synthetic") else None
    enc = encoders_for(dataset)
    return {
        "data": data_id(data), "name": dataset.name, "builtin": builtin,
        "spec": dataset.meta.get("spec"),  # canonical spec JSON (spec files and frappe)
        "synthetic": dataset.meta.get("params") if builtin == "synthetic" else None,
        "label": enc.label, "raw_columns": enc.columns(),
        "sep": (dataset.meta.get("spec") or {}).get("sep", ","),
        "format": (dataset.meta.get("spec") or {}).get("format"),
        "summary": dataset.summary(),
    }  # fmt: skip


def write_bundle(out: str | Path, *, model: str, model_config: Mapping[str, Any],
                 train_config: Mapping[str, Any], seed: int, params_bytes: bytes,
                 dataset: Dataset, data: str, results: Mapping[str, Any]) -> Path:
    """Write every part, then ``bundle.json`` with their checksums, into a new folder that then
    replaces ``out`` (module docstring). Returns the directory."""
    d = Path(out)
    with atomic_dir(d, keep=lambda name: name not in BUNDLE_FILES) as tmp:

        def dump(name: str, obj: Any) -> None:
            (tmp / name).write_text(json.dumps(obj, indent=1), encoding="utf-8")

        dump("model.json", {"name": model, "config": dict(model_config), "train": dict(train_config),
                            "seed": seed})
        (tmp / "params.msgpack").write_bytes(params_bytes)
        dump("schema.json", dataset.schema.to_json())
        dump("encoders.json", encoders_for(dataset).to_json())
        dump("dataset.json", dataset_info(data, dataset))
        dump("results.json", dict(results))
        parts = list(PARTS)
        if str(data).lower().endswith((".yaml", ".yml")) and Path(data).is_file():
            (tmp / "spec.yaml").write_text(Path(data).read_text(encoding="utf-8"), encoding="utf-8")
            parts.append("spec.yaml")
        manifest = {
            "format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "model": model,
            "created_unix": int(time.time()),
            "metrics": {k: results[k] for k in METRIC_KEYS if k in results},
            "versions": results.get("versions", {}),
            "files": {name: sha256(tmp / name) for name in parts},
        }  # fmt: skip
        dump(BUNDLE_JSON, manifest)
    return d


def recorded_run(directory: str | Path) -> dict[str, Any] | None:
    """What produced the bundle in ``directory`` (model, data, seed, model and train options), or
    None when the folder holds no readable dpn-jax bundle. Checksums are not verified here."""
    d = Path(directory)
    try:
        manifest = json.loads((d / BUNDLE_JSON).read_text(encoding="utf-8"))
        model = json.loads((d / "model.json").read_text(encoding="utf-8"))
        info = json.loads((d / "dataset.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            return None
        return {"model": model["name"], "data": info["data"], "seed": model["seed"],
                "model_config": model["config"], "train": model["train"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A verified bundle, read back (parameters still as bytes: see :mod:`predictor`)."""

    path: Path
    manifest: dict
    model: str
    model_config: dict
    model_json: dict
    schema: Schema
    encoders: FittedEncoders
    dataset: dict
    results: dict
    params_bytes: bytes


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); restore the file or {RETRAIN}") from None


def _member(d: Path, name: Any, manifest_path: Path) -> Path:
    """``d / name`` for a name ``bundle.json`` lists, refused unless it is a file of ``d`` itself."""
    path = d / str(name)
    flat = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
    inside = flat and (not (path.exists() or path.is_symlink()) or path.resolve().parent == d.resolve())
    if not inside:
        raise BundleError(f"{manifest_path}: bundle file {name!r} is not inside the bundle folder {d} "
                          f"(a bundle's files sit directly in it; a path or a symbolic link leading "
                          f"out of it is refused); {RETRAIN}")
    return path


def read_bundle(directory: str | Path) -> Bundle:
    """Read and verify a bundle: format version, every part present and unmodified."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise BundleError(f"model bundle {d} not found (expected a directory written by "
                          "`dpn-jax train --out DIR`)")
    manifest_path = d / BUNDLE_JSON
    if not manifest_path.is_file():
        older = (d / "params.msgpack").is_file()
        why = ("it was written by an older dpn-jax, before bundles" if older
               else "not a dpn-jax model bundle, or its training did not finish")
        raise BundleError(f"{manifest_path} not found: {why}; {RETRAIN}")
    manifest = _read_json(_member(d, BUNDLE_JSON, manifest_path))
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a dpn-jax bundle manifest (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); {RETRAIN}")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: bundle format version {version!r} is not supported by this "
                          f"dpn-jax (it reads version {BUNDLE_FORMAT_VERSION}); use the dpn-jax that wrote "
                          f"it or {RETRAIN}")
    files = manifest.get("files") or {}
    for name in PARTS:
        if name not in files:
            raise BundleError(f"{manifest_path}: lists no checksum for {name}; the manifest is damaged, {RETRAIN}")
    for name, digest in files.items():
        path = _member(d, name, manifest_path)
        if not path.is_file():
            raise BundleError(f"{path} is missing: the bundle is incomplete; copy the whole directory "
                              f"or {RETRAIN}")
        if sha256(path) != digest:
            raise BundleError(f"{path} was modified after training (its sha256 differs from "
                              f"{BUNDLE_JSON}); restore the original file or {RETRAIN}")
    model_json = _read_json(d / "model.json")
    try:
        encoders = FittedEncoders.from_json(_read_json(d / "encoders.json"))
    except (DpnError, KeyError, TypeError) as e:
        raise BundleError(f"{d / 'encoders.json'}: unreadable encoder state ({e}); {RETRAIN}") from None
    return Bundle(
        path=d, manifest=manifest, model=model_json["name"], model_config=model_json["config"],
        model_json=model_json, schema=Schema.from_json(_read_json(d / "schema.json")),
        encoders=encoders, dataset=_read_json(d / "dataset.json"),
        results=_read_json(d / "results.json"), params_bytes=(d / "params.msgpack").read_bytes(),
    )  # fmt: skip
