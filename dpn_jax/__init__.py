"""dpn-jax: Dynamic Parameterized Networks for CTR prediction in JAX/Flax.

    results = dpn_jax.train("dnn", "spec.yaml", out="runs/dnn")   # what `dpn-jax train` runs
    model = dpn_jax.load("runs/dnn")                               # the bundle it wrote
    probs = model.predict(rows)                                    # raw rows -> probabilities

Both are imported lazily: ``import dpn_jax`` stays cheap.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load", "train"]

from dpn_jax import xla_flags as _xla_flags  # noqa: E402 - before jax builds its backend

_xla_flags.apply()


class _TrainPackage(types.ModuleType):
    """``dpn_jax.train`` is the training subpackage AND callable as ``runner.run_train``:
    ``dpn_jax.train("dnn", "synthetic", out="runs/dnn")`` while ``dpn_jax.train.loop`` etc. stay
    importable as before."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from dpn_jax.runner import run_train

        return run_train(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds ``dpn_jax.train`` here when the subpackage is first imported.
        if name == "train" and type(value) is types.ModuleType:
            value.__class__ = _TrainPackage
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name == "train":
        import importlib

        return importlib.import_module("dpn_jax.train")  # bound (and made callable) by the hook
    if name == "load":
        from dpn_jax.serving.predictor import load

        return load
    raise AttributeError(f"module 'dpn_jax' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
_already = sys.modules.get(__name__ + ".train")
if _already is not None and type(_already) is types.ModuleType:  # imported before this ran
    _already.__class__ = _TrainPackage
