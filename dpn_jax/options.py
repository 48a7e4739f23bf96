"""Declared types and ranges of options, checked up front with one-line errors.

Training options declare theirs on :class:`dpn_jax.train.config.TrainConfig` (``lr: float =
option(1e-3, gt=0)``); model options in one table, :data:`dpn_jax.models.options.MODEL_OPTIONS`.
:func:`check` raises a :class:`~dpn_jax.errors.ConfigError` naming the key, the value and what
is allowed, e.g. ``--set dropout=1.5: dropout must be >= 0 and < 1``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

from dpn_jax.errors import ConfigError

Kind = Literal["int", "float", "ints", "bool", "str"]


@dataclasses.dataclass(frozen=True)
class Range:
    """What an option accepts: ``kind`` (``ints`` = a list of integers, each in range) with
    bounds ``ge``/``gt``/``le``/``lt``, or ``choices`` for a string. Floats must be finite."""

    kind: Kind
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None

    def bounds(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                            ("<", self.lt)) if v is not None]  # fmt: skip
        return " and ".join(parts)

    def describe(self) -> str:
        """The allowed values, as the end of "``key`` must be ...". """
        if self.choices is not None:
            return f"one of {', '.join(self.choices)}"
        b = self.bounds()
        two_sided = (self.ge, self.gt) != (None, None) and (self.le, self.lt) != (None, None)
        return {
            "int": f"{b} (an integer)" if b else "an integer",
            "float": b if two_sided else f"{b} and finite" if b else "a finite number",
            "ints": f"a list of integers {b}".rstrip(),
            "bool": "true or false",
            "str": "a string",
        }[self.kind]

    def accepts(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if self.kind == "ints":
            return (isinstance(value, Sequence) and not isinstance(value, str)
                    and all(_is_int(v) and self._within(v) for v in value))  # fmt: skip
        if self.kind == "int":
            return _is_int(value) and self._within(value)
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value) and self._within(value))  # fmt: skip

    def _within(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def shown(value: Any) -> str:
    """A value as a user would type it after ``--set key=``."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check(key: str, value: Any, rng: Range, where: str = "", text: str | None = None) -> None:
    """A ConfigError ``{where}{key}={value}: {key} must be {range}`` unless ``rng`` accepts it;
    ``text``: the value as the user typed it (default: :func:`shown`)."""
    if rng.accepts(value):
        return
    given = text if text is not None else shown(value)
    if rng.choices is not None:  # "optimizer=sgd: choose one of adam, lazy_adam"
        raise ConfigError(f"{where}{key}={given}: choose one of {', '.join(rng.choices)}")
    raise ConfigError(f"{where}{key}={given}: {key} must be {rng.describe()}")


def kind_of(default: Any) -> Kind:
    """The kind of an option from its default value (bool before int: True is an int too)."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, numbers.Integral):
        return "int"
    if isinstance(default, numbers.Real):
        return "float"
    if isinstance(default, (tuple, list)):
        return "ints"
    return "str"


def option(default: Any, **bounds: Any) -> Any:
    """A dataclass field with its default and its :class:`Range` (kind from the default)."""
    if "choices" in bounds:
        bounds["choices"] = tuple(bounds["choices"])
    rng = Range(kind_of(default), **bounds)
    if not rng.accepts(default):
        raise ValueError(f"default {default!r} is outside its own range ({rng.describe()})")
    return dataclasses.field(default=default, metadata={"range": rng})


def check_fields(obj: Any, where: str = "") -> None:
    """Check every dataclass field of ``obj`` that declares a range (see :func:`option`)."""
    for f in dataclasses.fields(obj):
        rng = f.metadata.get("range")
        if rng is not None:
            check(f.name, getattr(obj, f.name), rng, where)
