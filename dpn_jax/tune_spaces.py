"""Search spaces for ``dpn-jax tune``: the file format, its checks, and a default per model family.

A space maps an option (any training or model option but ``seed``) to how it is searched::

    lr:           {log_uniform: [1.0e-4, 1.0e-2]}   # random search: log-uniform between the bounds
    dropout:      {uniform: [0.0, 0.5]}             # random search: uniform between the bounds
    embedding_l2: {values: [0, 0.01, 0.05, 0.1]}    # grid: every value; random: one of them
    hidden:       {choice: ["400,400,400", [200, 200]]}  # same as values

``values`` and ``choice`` list the candidates (a grid enumerates them, random search draws one
uniformly); ``uniform`` and ``log_uniform`` are random search only. An integer option drawn
from a range gets integers (``log_uniform`` rounds); a drawn float keeps 3 significant digits,
so every trial reads as it would be typed after ``--set``. Every value and every bound is
checked against the option's declared range (``dpn_jax.options``) when the space is read.

Defaults (:func:`default_space`) follow BARS (Zhu et al., "BARS: Towards Open Benchmarking for
Recommender Systems", SIGIR 2022): the training protocol stays fixed (batch 4096, early stopping
on validation AUC) and each model gets the same small grid over the regularisers that decide
CTR models' results — embedding L2, dense-kernel L2 and dropout — with two learning rates; the
model's own size (embedding dimension, widths) stays at the paper's values. Families add what
their models add: DPN models their generator's rank, behaviour models the scale of their
embedding init (flat starts on small logs, docs/results/behaviour_models.md).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dpn_jax.errors import ConfigError
from dpn_jax.models import model_options
from dpn_jax.options import kind_of, shown
from dpn_jax.train.config import TrainConfig, split_overrides

KINDS = ("values", "choice", "uniform", "log_uniform")

# One block per family; a model's default space is the union of the blocks its options call for
# (:func:`families`). Values are written as a user would type them after ``--set``.
SPACES: dict[str, dict[str, dict[str, list]]] = {
    # every model: two learning rates (BARS tunes around Adam's 1e-3) and the embedding L2 grid
    "base": {"lr": {"values": [1e-3, 3e-3]},
             "embedding_l2": {"values": [0, 0.01, 0.05, 0.1]}},
    # models with dense kernels (all but lr, fm and hofm): a light kernel L2
    "dense": {"net_l2": {"values": [0, 1e-5]}},
    # models with a dropout option: BARS' net_dropout grid
    "deep": {"dropout": {"values": [0, 0.1, 0.2, 0.3]}},
    # DPN models (the DPO's low-rank generator): rank trades cost against capacity
    "dpn": {"rank": {"values": [2, 4, 8]}},
    # behaviour models: their 1e-4 embedding init can stall on small logs; 1e-2 avoids it
    "behaviour": {"embedding_init_std": {"values": [1e-4, 1e-2]}},
}

NO_DENSE_KERNELS = ("lr", "fm", "hofm")  # no parameter named "kernel": net_l2 does nothing


def families(model: str) -> list[str]:
    """The blocks of :data:`SPACES` that make ``model``'s default space."""
    opts = model_options(model)
    out = ["base"]
    if model not in NO_DENSE_KERNELS:
        out.append("dense")
    if "dropout" in opts:
        out.append("deep")
    if "rank" in opts:
        out.append("dpn")
    if "attention_groups" in opts:  # every behaviour model groups behaviours for its attention
        out.append("behaviour")
    return out


def default_space(model: str) -> dict[str, dict[str, list]]:
    return {k: dict(v) for fam in families(model) for k, v in SPACES[fam].items()}


def space_yaml(space: dict[str, dict[str, Any]]) -> str:
    """A space as a YAML file (one option a line)."""
    return "".join(f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip()}\n"
                   for k, v in space.items())


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched option: ``candidates`` (typed values) or a ``low``..``high`` range."""

    name: str
    kind: str  # one of KINDS
    candidates: tuple = ()
    low: float = 0.0
    high: float = 0.0
    integer: bool = False

    @property
    def discrete(self) -> bool:
        return self.kind in ("values", "choice")

    def size(self) -> int | None:
        """How many distinct values it can take (None: a continuous range)."""
        if self.discrete:
            return len(self.candidates)
        return int(self.high) - int(self.low) + 1 if self.integer else None

    def draw(self, rng: np.random.Generator) -> Any:
        if self.discrete:
            return self.candidates[int(rng.integers(len(self.candidates)))]
        if self.kind == "uniform":
            if self.integer:
                return int(rng.integers(int(self.low), int(self.high) + 1))
            x = float(rng.uniform(self.low, self.high))
        else:
            x = math.exp(float(rng.uniform(math.log(self.low), math.log(self.high))))
            if self.integer:
                return min(max(round(x), int(self.low)), int(self.high))
        return min(max(float(f"{x:.3g}"), self.low), self.high)  # readable, still within bounds


def _defaults(model: str) -> dict[str, Any]:
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {**train, **model_options(model)}


def _typed(model: str, key: str, raw: Any, where: str) -> Any:
    """``raw`` typed and range-checked as ``--set key=raw`` would be (errors name ``where``)."""
    train, own = split_overrides([f"{key}={shown(raw)}"], model_options(model), model, flag=where)
    return {**train, **own}[key]


def parse_space(model: str, space: dict[str, Any] | str | Path | None) -> list[Dimension]:
    """A space (a mapping, a YAML file, or None for :func:`default_space`) as checked
    dimensions; any problem is one ConfigError line naming the file and the option."""
    where = "space"
    if space is None:
        where, space = "default space", default_space(model)
    elif isinstance(space, (str, Path)):
        where = str(space)
        try:
            space = yaml.safe_load(Path(space).read_text())
        except OSError as err:
            raise ConfigError(f"--space {space}: cannot read it ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    example = "e.g. lr: {log_uniform: [1.0e-4, 1.0e-2]} or dropout: {values: [0, 0.1, 0.2]}"
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: expected a mapping of options to how each is searched, {example}")
    defaults = _defaults(model)
    dims = []
    for key, spec in space.items():
        key = str(key)
        if key == "seed":
            raise ConfigError(f"{where}: seed is not a hyper-parameter; give seeds with --seeds")
        if key == "protocol":
            raise ConfigError(f"{where}: protocol is a preset of options, not one option; "
                              "fix it with --set protocol=NAME")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: {key}: expected one of {', '.join(KINDS)}, {example}")
        kind, arg = next(iter(spec.items()))
        if key not in defaults:  # one line naming the key, with the closest known one
            split_overrides([f"{key}=0"], model_options(model), model, flag=f"{where}:")
        if kind in ("values", "choice"):
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}: {key}: {kind} must be a non-empty list")
            typed = [_typed(model, key, v, f"{where}:") for v in arg]
            if len({shown(v) for v in typed}) < len(typed):
                raise ConfigError(f"{where}: {key}: {kind} lists a value twice")
            dims.append(Dimension(key, kind, tuple(typed)))
            continue
        if not isinstance(arg, list) or len(arg) != 2:
            raise ConfigError(f"{where}: {key}: {kind} takes [low, high], e.g. {kind}: [1.0e-4, 1.0e-2]")
        if kind_of(defaults[key]) not in ("int", "float"):
            raise ConfigError(f"{where}: {key}: {kind} needs a numeric option; list the values with "
                              f"{key}: {{choice: [...]}}")
        low, high = (_typed(model, key, v, f"{where}:") for v in arg)
        if not low < high:
            raise ConfigError(f"{where}: {key}: {kind} [{shown(low)}, {shown(high)}]: low must be below high")
        if kind == "log_uniform" and low <= 0:
            raise ConfigError(f"{where}: {key}: log_uniform [{shown(low)}, {shown(high)}]: both bounds "
                              "must be > 0 (use values with 0 among them to include 0)")
        dims.append(Dimension(key, kind, low=float(low), high=float(high),
                              integer=kind_of(defaults[key]) == "int"))
    return dims


def space_record(dims: list[Dimension]) -> dict[str, dict[str, Any]]:
    """The checked space as a mapping (JSON- and YAML-ready), for reports and resume checks."""
    return {d.name: {d.kind: [shown(v) if isinstance(v, (tuple, list)) else v for v in d.candidates]
                     if d.discrete else [d.low, d.high]} for d in dims}
