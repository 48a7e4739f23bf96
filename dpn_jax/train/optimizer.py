"""The optimiser interface of the train step: an optax transformation that may be row-sparse.

An :class:`Optimizer` is shaped as ``optax.GradientTransformationExtraArgs`` -- ``init(params)``
and ``update(grads, state, params, **extra_args) -> (updates, state)`` -- with two more hooks,
which a dense optimiser leaves at their defaults and a sparse one (lazy Adam,
:mod:`dpn_jax.train.lazy_adam`) fills in:

* ``lookup(model, params, batch) -> (model, params, batch, extra_args)``: what the loss is
  differentiated in -- dense: the parameters and model as they are; lazy Adam: the batch's
  embedding rows and a model sized to them -- and the extra args ``update`` takes (the rows);
* ``apply_updates(params, updates)``: the parameters after the step -- dense:
  ``optax.apply_updates``; lazy Adam: its table "updates" are the tables' new values, written row
  by row in ``update`` (a row-sparse step added as a dense update would touch every row).

The train step (:func:`dpn_jax.train.state.make_train_step`) calls the four in that order and
never asks which optimiser it has. The learning rate is data in every optimiser's state
(``optax.inject_hyperparams``); :func:`learning_rate` and :func:`with_learning_rate` read and
replace it wherever in the state it sits, so reduce-on-plateau and sweeps need no recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

LEARNING_RATE = "learning_rate"  # the injected hyper-parameter's name


def dense_lookup(model, params, batch: dict) -> tuple[Any, Any, dict, dict]:
    """The default ``lookup``: the model and parameters as they are, no extra args."""
    return model, params, batch, {}


class Optimizer(NamedTuple):
    """``optax.GradientTransformationExtraArgs`` plus the hooks of a row-sparse optimiser."""

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]
    lookup: Callable[[Any, Any, dict], tuple[Any, Any, dict, dict]] = dense_lookup
    apply_updates: Callable[[Any, Any], Any] = optax.apply_updates

    @classmethod
    def dense(cls, tx: optax.GradientTransformation) -> Optimizer:
        return cls(tx.init, tx.update)


def learning_rate(opt_state) -> jnp.ndarray:
    """The learning rate held in ``opt_state`` (one per replica in a stacked sweep state)."""
    lr = optax.tree_utils.tree_get(opt_state, LEARNING_RATE)
    if lr is None:
        raise ValueError("this optimiser state holds no injected learning_rate")
    return lr


def with_learning_rate(opt_state, lr) -> Any:
    """``opt_state`` with its learning rate replaced by ``lr`` (same dtype; any shape it has)."""
    old = learning_rate(opt_state)
    return optax.tree_utils.tree_set(opt_state, **{LEARNING_RATE: jnp.asarray(lr, dtype=old.dtype)})
