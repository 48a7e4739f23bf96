"""Activations by name: the functions of :data:`dpn_jax.dpo.ACTIVATIONS` (the one table the DPO
generators and every tower use) plus DIN's Dice and PReLU, which carry parameters."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpn_jax.dpo import ACTIVATIONS
from dpn_jax.errors import ConfigError

Array = jax.Array
PARAMETRIC = ("dice", "prelu")  # activations with parameters: modules, not functions


class Dice(nn.Module):
    """Dice (Zhou et al., "Deep Interest Network", KDD 2018, Eqns. 9-10), per channel::

        f(s) = p(s)·s + (1 − p(s))·α·s,     p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + ε))

    ``E, Var``: statistics of the mini-batch when training (over every axis but the last, and
    only over ``mask``-ed positions when a mask is given), running averages in inference; kept
    in a scale- and shift-free ``BatchNorm`` named ``bn`` (so ``bn_recalibrate`` re-estimates
    them like any other BatchNorm).  ``α`` starts at 0 (DIN's code, DeepCTR, FuxiCTR).
    ``momentum`` uses Flax's convention (0.9 = PyTorch's 0.1, FuxiCTR's Dice; DIN's TF code and
    DeepCTR use 0.99; docs/results/protocol.md, §'BatchNorm statistics').  ``epsilon`` 1e-8 (DeepCTR; DIN's code: 1e-9).
    """

    momentum: float = 0.9
    epsilon: float = 1e-8
    alpha_init: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
        m = None if mask is None else jnp.broadcast_to(mask[..., None], x.shape)
        xn = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, use_bias=False, use_scale=False, name="bn")(x, mask=m)
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (x.shape[-1],))
        p = jax.nn.sigmoid(xn)
        return p * x + (1.0 - p) * alpha * x


class PReLU(nn.Module):
    """Per-channel PReLU ``max(0, s) + α·min(0, s)`` (He et al. 2015; DIN's alternative to Dice).
    ``α`` starts at 0.25 (He et al.; PyTorch's default)."""

    alpha_init: float = 0.25

    @nn.compact
    def __call__(self, x: Array) -> Array:
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (x.shape[-1],))
        return jnp.where(x >= 0, x, alpha * x)


def check_activation(name: str) -> str:
    """``name`` if it is an activation :class:`Activation` knows, else a one-line ConfigError."""
    if name not in PARAMETRIC and name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose dice, prelu or one of "
                          f"{sorted(ACTIVATIONS)}")
    return name


class Activation(nn.Module):
    """An activation by name: ``dice`` and ``prelu`` (with parameters) or a function of
    :data:`dpn_jax.dpo.ACTIVATIONS` (none: no parameters, so the name adds nothing to a model's
    parameter tree)."""

    kind: str
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
        kind = check_activation(self.kind)
        if kind == "dice":
            return Dice(self.momentum, name="dice")(x, train, mask)
        if kind == "prelu":
            return PReLU(name="prelu")(x)
        return ACTIVATIONS[kind](x)


def activation_layer(kind: str, momentum: float = 0.9,
                     name: str | None = None) -> Callable[[Array, bool], Array]:
    """``(x, train) -> y`` for a tower: dice and prelu as an :class:`Activation` module (their
    parameters under ``name``), any other kind as its plain function (nothing added to the
    model's variables)."""
    if check_activation(kind) in PARAMETRIC:
        return Activation(kind, momentum, name=name)
    f = ACTIVATIONS[kind]
    return lambda x, train: f(x)
