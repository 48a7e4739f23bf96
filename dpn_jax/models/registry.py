"""One registry of CTR models, found by name.

A model is a Flax Linen module whose dataclass fields are its hyper-parameters plus the dataset
``schema``; ``__call__(batch, train=False)`` returns logits ``[B]``. Registering a class makes it
available to ``dpn-jax train --model NAME`` and to ``--set key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from dpn_jax.data.schema import Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models.options import check_model_options

_REGISTRY: dict[str, type[nn.Module]] = {}
_LEGACY: dict[str, dict[str, Any]] = {}
_NOT_OPTIONS = {"schema", "parent", "name"}


def register(name: str, legacy: Mapping[str, Any] | None = None
             ) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a model class under ``name``.

    ``legacy``: options added after models of this name were first saved, with the value that
    reproduces the model from before they existed.  A saved configuration (bundle, results JSON)
    records every option, so one that lacks such an option predates it and gets this value
    instead of today's default (:func:`legacy_options`)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"model name {name!r} registered twice")
        _REGISTRY[name] = cls
        _LEGACY[name] = dict(legacy or {})
        return cls

    return deco


def legacy_options(name: str, saved: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy value of each option that the saved configuration ``saved`` does not record."""
    get_model_class(name)
    return {k: v for k, v in _LEGACY[name].items() if k not in saved}


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; available: {', '.join(available_models())}")
    return _REGISTRY[name]


def model_options(name: str) -> dict[str, Any]:
    """Hyper-parameters of a model and their defaults."""
    cls = get_model_class(name)
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.name not in _NOT_OPTIONS and f.default is not dataclasses.MISSING
    }


def model_summary(name: str) -> str:
    doc = (get_model_class(name).__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def build_model(name: str, schema: Schema, **options: Any) -> nn.Module:
    cls = get_model_class(name)
    allowed = model_options(name)
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"model {name!r} has no option {key!r}; its options are: {', '.join(sorted(allowed))}"
            )
    check_model_options(name, options)  # every value in its declared range (models/options.py)
    return cls(schema=schema, **options)
