"""dpn-jax: Dynamic Parameterized Networks for CTR prediction in JAX/Flax.

    results = dpn_jax.train_model("dnn", "spec.yaml", out="runs/dnn")  # what `dpn-jax train` runs
    model = dpn_jax.load("runs/dnn")                                    # the bundle it wrote
    probs = model.predict(rows)                                         # raw rows -> probabilities
    summary = dpn_jax.tune("dnn", "frappe", out="runs/tune_dnn")        # what `dpn-jax tune` runs

All three are imported lazily: ``import dpn_jax`` stays cheap. ``dpn_jax.train`` is the training
subpackage (``dpn_jax.train.loop`` ...).
"""

from __future__ import annotations

from typing import Any

from dpn_jax import xla_flags as _xla_flags  # before jax builds its backend
from dpn_jax._version import __version__

__all__ = ["__version__", "load", "train_model", "tune"]

_xla_flags.apply()


def __getattr__(name: str) -> Any:
    if name == "train_model":  # runner.run_train: train, evaluate, write the bundle
        from dpn_jax.runner import run_train

        return run_train
    if name == "tune":  # tuning.run_tune: equal-budget search, selection on validation, final seeds
        from dpn_jax.tuning import run_tune

        return run_tune
    if name == "load":
        from dpn_jax.serving.predictor import load

        return load
    raise AttributeError(f"module 'dpn_jax' has no attribute {name!r}")
