"""From experiment to serving: model bundles, in-process prediction, streaming batch prediction,
``jax.export`` artifacts and latency benchmarks.

    model = dpn_jax.load("runs/dnn")            # a bundle written by `dpn-jax train --out`
    p = model.predict({"user_id": ["u1"], ...})  # raw rows in the spec's format -> probabilities
    served = load_exported("export/dnn")         # jax + numpy only (no Flax, no model code)

Names are imported lazily, so ``from dpn_jax.serving import load_exported`` pulls in only
:mod:`dpn_jax.serving.exported` (jax + numpy), never the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load": "predictor", "Predictor": "predictor",
    "Bundle": "bundle", "BundleError": "bundle", "read_bundle": "bundle", "write_bundle": "bundle",
    "BUNDLE_FORMAT_VERSION": "bundle",
    "export_bundle": "export", "predict_file": "stream", "bench_latency": "latency",
    "load_exported": "exported", "ExportedModel": "exported", "ExportError": "exported",
}  # fmt: skip

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"dpn_jax.serving.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dpn_jax.serving' has no attribute {name!r}")
