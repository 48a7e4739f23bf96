"""Training hyper-parameters (the AFN/BARS protocol defaults) and ``--set`` parsing."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import yaml

from dpn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation protocol. Defaults: Adam 1e-3, batch 4096, early stopping on validation AUC
    with patience 2 (AFN, AAAI 2020; BARS)."""

    lr: float = 1e-3
    # "adam" (dense, every parameter every step) or "lazy_adam" (embedding rows of the batch
    # only, as production CTR systems do; dpn_jax.train.lazy_adam).
    optimizer: str = "adam"
    # lazy_adam's row update: "xla" (gathers and scatters in the graph) or "native" (one C++ pass
    # over the rows, in place; CPU only, needs a C++ compiler: dpn_jax/native/sparse_adam.cc).
    lazy_adam_kernel: str = "xla"
    batch_size: int = 4096
    eval_batch_size: int = 16384
    max_epochs: int = 100
    patience: int = 2
    # Train at least this many epochs: before that no early stop and no learning-rate cut, for
    # models that leave a flat start slowly on a small log (a dozen steps per epoch).
    min_epochs: int = 0
    # Early-stopping score on validation: "auc" or "auc-logloss" (FuxiCTR's default monitor,
    # which stops earlier when the model grows over-confident).
    monitor: str = "auc"
    embedding_l2: float = 0.0  # coefficient of sum(E**2) over embedding tables (FuxiCTR's embedding_regularizer)
    net_l2: float = 0.0  # coefficient of sum(W**2) over dense kernels (FuxiCTR's net_regularizer)
    grad_clip: float = 0.0  # global-norm clipping; 0 = off
    reduce_lr_factor: float = 0.0  # multiply lr by this on a non-improving epoch; 0 = off
    min_lr: float = 1e-6
    # Re-estimate BatchNorm statistics from training batches before each evaluation: with
    # ~13 steps per epoch, running averages still remember their initial values (docs/results/protocol.md, §'BatchNorm statistics').
    bn_recalibrate: bool = True
    bn_recalibrate_batches: int = 32
    seed: int = 2021
    # With a checkpoint directory (``fit(checkpoint_dir=...)``, ``--checkpoint-dir``) a checkpoint
    # is written after every epoch and, when > 0, also every this many batches.
    checkpoint_every_steps: int = 0
    # A non-finite loss: "stop" raises NonFiniteLoss (the last checkpoint stays good); "skip"
    # drops each step whose loss or gradients are non-finite, leaving the state unchanged.
    on_nonfinite: str = "stop"

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)


def parse_value(text: str, default: Any, key: str) -> Any:
    """Parse a ``--set`` value to the type of ``default``: ``400,400`` for tuples, YAML otherwise."""
    if isinstance(default, (tuple, list)):
        parts = [p for p in text.replace("-", ",").replace("[", "").replace("]", "").split(",") if p]
        try:
            return tuple(type(default[0])(p) if default else int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"--set {key}={text}: expected a comma-separated list like 400,400,400") from None
    try:  # YAML 1.1 reads "3e-4" as a string; numbers first
        value = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        value = yaml.safe_load(text)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--set {key}={text}: expected true or false")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--set {key}={text}: expected a number")
        if isinstance(default, int) and float(value) != int(value):
            raise ConfigError(f"--set {key}={text}: expected an integer")
        return type(default)(value)
    if default is None:
        return value
    if isinstance(default, str):
        return str(value)
    return value


def split_overrides(
    sets: list[str], model_opts: dict[str, Any], model_name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``["lr=3e-4", "dropout=0.2"]`` -> (train overrides, model overrides), typed and validated."""
    train_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    train_kw: dict[str, Any] = {}
    model_kw: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=3e-4")
        key, text = (s.strip() for s in item.split("=", 1))
        if key in train_defaults:
            train_kw[key] = parse_value(text, train_defaults[key], key)
        elif key in model_opts:
            model_kw[key] = parse_value(text, model_opts[key], key)
        else:
            allowed = sorted(train_defaults) + sorted(model_opts)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"--set {key}: unknown key{hint}. Training keys: {', '.join(sorted(train_defaults))}; "
                f"model {model_name!r} keys: {', '.join(sorted(model_opts)) or '(none)'}"
            )
    return train_kw, model_kw
