"""Training hyper-parameters (the AFN/BARS protocol defaults) and ``--set`` parsing."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import yaml

from dpn_jax.errors import ConfigError
from dpn_jax.options import check, check_fields, option

# The choices of the string options (the modules that act on them check against these).
OPTIMIZERS = ("adam", "lazy_adam")
LAZY_ADAM_KERNELS = ("xla", "native")
MONITORS = ("auc", "auc-logloss")
NONFINITE_MODES = ("stop", "skip")
DENSE_INITS = ("model", "xavier_normal")
DATA_ON_DEVICE = ("auto", "true", "false")  # dpn_jax.train.device_data

# Named protocols for ``--set protocol=NAME``: a preset of training options, applied before
# the other ``--set`` keys (which win). "fuxictr": FuxiCTR 2.3.10's BaseModel defaults, to
# compare with a model trained by FuxiCTR like with like (docs/results/protocol.md).
PRESETS: dict[str, dict[str, str]] = {
    "fuxictr": {"reduce_lr_factor": "0.1", "min_lr": "1e-6", "grad_clip": "10", "min_delta": "1e-6",
                "bn_recalibrate": "false", "dense_init": "xavier_normal", "monitor": "auc",
                "patience": "2", "lr": "1e-3", "batch_size": "4096"},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation protocol. Defaults: Adam 1e-3, batch 4096, early stopping on validation AUC
    with patience 2 (AFN, AAAI 2020; BARS), gradient-norm clip 10 and the learning rate x0.1 on
    every epoch without a gain (FuxiCTR's BaseModel; chosen by the protocol ablation,
    docs/results/protocol.md). BatchNorm statistics are re-estimated before each evaluation."""

    lr: float = option(1e-3, gt=0)
    # "adam" (dense, every parameter every step) or "lazy_adam" (embedding rows of the batch
    # only, as production CTR systems do; dpn_jax.train.lazy_adam).
    optimizer: str = option("adam", choices=OPTIMIZERS)
    # lazy_adam's row update: "xla" (gathers and scatters in the graph) or "native" (one C++ pass
    # over the rows, in place; CPU only, needs a C++ compiler: dpn_jax/native/sparse_adam.cc).
    lazy_adam_kernel: str = option("xla", choices=LAZY_ADAM_KERNELS)
    batch_size: int = option(4096, ge=1)
    eval_batch_size: int = option(16384, ge=1)
    max_epochs: int = option(100, ge=1)
    patience: int = option(2, ge=0)
    # Train at least this many epochs: before that no early stop and no learning-rate cut, for
    # models that leave a flat start slowly on a small log (a dozen steps per epoch).
    min_epochs: int = option(0, ge=0)
    # Early-stopping score on validation: "auc" (FuxiCTR BaseModel's default) or "auc-logloss"
    # (the monitor of BARS' configs, which stops earlier when the model grows over-confident).
    monitor: str = option("auc", choices=MONITORS)
    # coefficient of sum(E**2) over embedding tables (FuxiCTR's embedding_regularizer)
    embedding_l2: float = option(0.0, ge=0)
    net_l2: float = option(0.0, ge=0)  # coefficient of sum(W**2) over dense kernels (FuxiCTR's net_regularizer)
    # Global-norm clipping; 0 = off. 10 (FuxiCTR's default) only touches the first steps, whose
    # gradient spike would otherwise stay in Adam's second moment for the whole run
    # (docs/results/protocol.md, §'The training protocol, by ablation').
    grad_clip: float = option(10.0, ge=0)
    # Multiply lr by this on a non-improving epoch (FuxiCTR's default); 0 = off (1 would never cut).
    reduce_lr_factor: float = option(0.1, ge=0, lt=1)
    min_lr: float = option(1e-6, ge=0)
    # A new best validation score must beat the old one by more than this (FuxiCTR: 1e-6).
    min_delta: float = option(0.0, ge=0)
    # Re-estimate BatchNorm statistics from training batches before each evaluation: with
    # ~13 steps per epoch, running averages still remember their initial values
    # (docs/results/protocol.md, §'BatchNorm statistics').
    bn_recalibrate: bool = option(True)
    bn_recalibrate_batches: int = option(32, ge=1)
    seed: int = option(2021, ge=0)
    # Dense kernels at initialisation: "model" (each layer's own initialiser) or
    # "xavier_normal" (every 2-D Dense kernel redrawn from N(0, 2 / (fan_in + fan_out)), not
    # truncated: FuxiCTR's BaseModel.reset_parameters, i.e. PyTorch's xavier_normal_).
    dense_init: str = option("model", choices=DENSE_INITS)
    # With a checkpoint directory (``fit(checkpoint_dir=...)``, ``--checkpoint-dir``) a checkpoint
    # is written after every epoch and, when > 0, also every this many batches.
    checkpoint_every_steps: int = option(0, ge=0)
    # A non-finite loss: "stop" raises NonFiniteLoss (the last checkpoint stays good); "skip"
    # drops each step whose loss or gradients are non-finite, leaving the state unchanged.
    on_nonfinite: str = option("stop", choices=NONFINITE_MODES)
    # Train steps per jitted call: a lax.scan over a block of this many batches, which amortises
    # the fixed cost of a call (it bounds small steps on GPUs and TPUs). The data order, the rows
    # trained and, to float rounding, the parameters are those of 1; checkpoints fall between blocks.
    steps_per_dispatch: int = option(1, ge=1)
    # The encoded splits held on the device, each batch gathered there: "true", "false" (the host
    # gathers each block and a thread puts it on the device while the previous one trains), or
    # "auto": on an accelerator when they take at most a quarter of its memory; off on the CPU.
    data_on_device: str = option("auto", choices=DATA_ON_DEVICE)

    def __post_init__(self) -> None:
        check_fields(self)  # one line naming the option, its value and its range

    def replace(self, **kw: Any) -> TrainConfig:
        return dataclasses.replace(self, **kw)


def parse_value(text: str, default: Any, key: str, flag: str = "--set") -> Any:
    """Parse a ``--set`` value to the type of ``default``: ``400,400`` for tuples, YAML otherwise."""
    if isinstance(default, (tuple, list)):
        parts = [p for p in text.replace("-", ",").replace("[", "").replace("]", "").split(",") if p]
        try:
            return tuple(type(default[0])(p) if default else int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"{flag} {key}={text}: expected a comma-separated list like 400,400,400") from None
    try:  # YAML 1.1 reads "3e-4" as a string; numbers first
        value = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        value = yaml.safe_load(text)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} {key}={text}: expected true or false")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag} {key}={text}: expected a number")
        if isinstance(default, int) and float(value) != int(value):
            raise ConfigError(f"{flag} {key}={text}: expected an integer")
        return type(default)(value)
    if default is None:
        return value
    if isinstance(default, str):  # YAML reads true/false as booleans; a choice keeps the word
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def expand_protocol(sets: list[str], flag: str = "--set") -> list[str]:
    """``protocol=NAME`` replaced by its preset's ``key=value`` items, put first so that the
    other items override them."""
    presets, rest = [], []
    for item in sets:
        key, _, name = (s.strip() for s in item.partition("="))
        if key != "protocol":
            rest.append(item)
        elif name not in PRESETS:
            raise ConfigError(f"{flag} protocol={name}: unknown protocol; choose one of {sorted(PRESETS)}")
        else:
            presets += [f"{k}={v}" for k, v in PRESETS[name].items()]
    return presets + rest


def split_overrides(
    sets: list[str], model_opts: dict[str, Any], model_name: str, flag: str = "--set"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``["lr=3e-4", "dropout=0.2"]`` -> (train overrides, model overrides), typed and checked
    against each option's declared range (errors name ``flag``, the key and the value)."""
    from dpn_jax.models.options import check_model_option

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    train_defaults = {name: f.default for name, f in fields.items()}
    train_kw: dict[str, Any] = {}
    model_kw: dict[str, Any] = {}
    for item in expand_protocol(sets, flag):
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lr=3e-4")
        key, text = (s.strip() for s in item.split("=", 1))
        if key in train_defaults:
            train_kw[key] = parse_value(text, train_defaults[key], key, flag)
            check(key, train_kw[key], fields[key].metadata["range"], f"{flag} ", text)
        elif key in model_opts:
            model_kw[key] = parse_value(text, model_opts[key], key, flag)
            check_model_option(key, model_kw[key], f"{flag} ", text)
        else:
            allowed = sorted(train_defaults) + sorted(model_opts)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{flag} {key}: unknown key{hint}. Training keys: {', '.join(sorted(train_defaults))}; "
                f"model {model_name!r} keys: {', '.join(sorted(model_opts)) or '(none)'}"
            )
    return train_kw, model_kw
