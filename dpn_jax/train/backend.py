"""Options that run on the CPU backend only, refused where a run is configured.

The native kernels are CPU custom calls (:mod:`dpn_jax.native`): on a GPU or TPU a step using
them could not compile, and the run would fail after its data had loaded. Every other option
lowers for the CPU, GPUs and TPUs (``tests/test_lowering.py`` exports each model's train and
eval steps for ``cuda`` and ``tpu``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpn_jax import native
from dpn_jax.errors import ConfigError
from dpn_jax.nn import mkl_matmul
from dpn_jax.train import lazy_adam
from dpn_jax.train.config import TrainConfig

# (the CPU-only setting, the setting computing the same on any backend); "key=value" each
TRAIN_CPU_ONLY = ((lazy_adam.NATIVE_OPTION, lazy_adam.PORTABLE_OPTION),)
MODEL_CPU_ONLY = ((mkl_matmul.OPTION, mkl_matmul.PORTABLE),)


def check_options_for_backend(train_cfg: TrainConfig, model_opts: Mapping[str, Any],
                              backend: str | None = None) -> None:
    """Raise ConfigError (one line naming the option and the backend) when ``train_cfg`` or the
    model options ``model_opts`` ask for a CPU-only kernel and ``backend`` (default:
    ``jax.default_backend()``) is not the CPU."""
    chosen = [(option, instead) for option, instead in TRAIN_CPU_ONLY
              if _is_set(option, lambda key: getattr(train_cfg, key, None))]
    chosen += [(option, instead) for option, instead in MODEL_CPU_ONLY
               if _is_set(option, model_opts.get)]
    for option, instead in chosen:
        reason = native.cpu_only(option, instead, backend)
        if reason:
            raise ConfigError(reason)


def _is_set(option: str, get) -> bool:
    key, value = option.split("=", 1)
    return get(key) == value
