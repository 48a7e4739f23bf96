"""``dpn-jax export``: serialise a bundle's jitted scoring function with ``jax.export``.

The exported program is ``(*inputs) -> probabilities [b]`` with the parameters closed over (they
become constants of the StableHLO module) and a SYMBOLIC batch dimension ``b``
(``jax.export.symbolic_shape``), so one artifact serves any batch size. Inputs are the encoded
arrays in the order of :func:`dpn_jax.serving.predictor.model_inputs`; the encoding tables go
beside it. :func:`dpn_jax.serving.exported.load_exported` runs it with jax + numpy alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dpn_jax.atomic import atomic_dir
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.serving.bundle import BUNDLE_JSON
from dpn_jax.serving.exported import (
    EXPORT_ENCODING,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORT_JSON,
    EXPORT_PROGRAM,
)
from dpn_jax.serving.predictor import Predictor, load

DEFAULT_PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_program(predictor: Predictor, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Any:
    """The ``jax.export.Exported`` of a predictor's scoring function (symbolic batch ``b``)."""
    from jax import export

    bad = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if bad or not platforms:
        raise ConfigError(f"unknown platform(s) {bad or platforms!r}; choose from {list(KNOWN_PLATFORMS)}")
    model, variables = predictor.model, predictor.variables
    if getattr(model, "matmul_dtype", None) == "bfloat16_mkl":
        # MKL's products are a local custom call that jax.export cannot serialise; XLA's own
        # bfloat16 products compute the same numbers (up to float32 summation order).
        model = model.clone(matmul_dtype="bfloat16")
    names = [n for n, _, _ in predictor.inputs]

    def probs(*arrays):
        return jax.nn.sigmoid(model.apply(variables, dict(zip(names, arrays)), train=False))

    (b,) = export.symbolic_shape("b")
    specs = [jax.ShapeDtypeStruct((b, width), jnp.dtype(dtype)) for _, dtype, width in predictor.inputs]
    try:
        return export.export(jax.jit(probs), platforms=list(platforms))(*specs)
    except Exception as e:  # noqa: BLE001  lowering failures: one actionable line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DpnError(f"jax.export of model {predictor.model_name!r} for {list(platforms)} failed: "
                       f"{first}; try --platforms cpu") from None


def serialize(exported: Any) -> bytes:
    try:
        return bytes(exported.serialize())
    except ImportError as e:  # jax needs the flatbuffers package to serialise
        raise DpnError(f"cannot serialise the exported program: {e} (pip install flatbuffers)") from None


def export_bundle(bundle_dir: str | Path, out: str | Path,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
    """Export a bundle into ``out/`` (export.json last; the folder is replaced only once complete,
    other entries of it are kept); returns the contents of export.json."""
    predictor = load(bundle_dir)
    exported = export_program(predictor, platforms)
    blob = serialize(exported)
    written = (EXPORT_JSON, EXPORT_PROGRAM, EXPORT_ENCODING)
    with atomic_dir(out, keep=lambda name: name not in written) as d:  # the old export stays until done
        (d / EXPORT_PROGRAM).write_bytes(blob)
        (d / EXPORT_ENCODING).write_bytes(predictor.bundle.path.joinpath("encoders.json").read_bytes())
        meta = _meta(predictor, exported, bundle_dir, len(blob))
        (d / EXPORT_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def _meta(predictor: Predictor, exported: Any, bundle_dir: str | Path, program_bytes: int) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
        "model": predictor.model_name, "model_config": predictor.config,
        "inputs": [{"name": n, "dtype": t, "width": w} for n, t, w in predictor.inputs],
        "output": "probability float32 [b]", "platforms": list(exported.platforms),
        "bundle": {"path": str(Path(bundle_dir).resolve()),
                   "sha256": predictor.bundle.manifest.get("files", {}),
                   "manifest": BUNDLE_JSON},
        "metrics": predictor.metrics,
        "versions": {"jax": jax.__version__, "calling_convention": exported.calling_convention_version},
        "program_bytes": program_bytes,
    }  # fmt: skip
