"""Early stopping and the learning-rate rule: a pure function of the validation history.

After each epoch's validation, ``update(rules, state, score, lr) -> (state, decision)`` says
whether the epoch is a new best (keep its parameters), whether training stops, and the learning
rate of the next epoch. ``fit`` and every replica of a sweep call it alike, so a change to the
protocol (a new rule, a warm-up, ``min_delta``) is made here once. ``score`` should increase
(:func:`dpn_jax.train.engine.monitor_score`); the state is plain numbers, saved in checkpoints
as ``state._asdict()``.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Rules(NamedTuple):
    """The protocol, from the training config (:meth:`of`)."""

    patience: int = 2  # stop after this many consecutive epochs without a new best ...
    min_epochs: int = 0  # ... but not before this many epochs (nor cut the learning rate)
    min_delta: float = 0.0  # a new best must beat the old one by more than this
    reduce_lr_factor: float = 0.0  # lr times this after an epoch without gain; 0 = never
    min_lr: float = 1e-6  # ... floored here (never raised, though, when already below)

    @classmethod
    def of(cls, cfg) -> Rules:
        return cls(patience=cfg.patience, min_epochs=cfg.min_epochs, min_delta=cfg.min_delta,
                   reduce_lr_factor=cfg.reduce_lr_factor, min_lr=cfg.min_lr)


class StopState(NamedTuple):
    """What the rules remember of the validation history."""

    best: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0  # epochs scored so far
    bad_epochs: int = 0  # consecutive epochs without a new best

    @classmethod
    def restore(cls, saved: dict) -> StopState:
        """From ``state._asdict()`` (keys this state no longer has are ignored)."""
        return cls(**{k: saved[k] for k in cls._fields if k in saved})


class Decision(NamedTuple):
    improved: bool  # a new best: keep this epoch's parameters
    stop: bool  # end training now (never together with ``improved``)
    lr: float  # the learning rate of the next epoch (``lr`` itself when unchanged)


def warming_up(rules: Rules, state: StopState) -> bool:
    """Fewer than ``min_epochs`` epochs scored: neither an early stop nor a learning-rate cut."""
    return state.epoch < rules.min_epochs


def update(rules: Rules, state: StopState, score: float, lr: float) -> tuple[StopState, Decision]:
    """Score one more epoch trained at learning rate ``lr``. A non-finite score is never a best."""
    epoch = state.epoch + 1
    if math.isfinite(score) and score > state.best + rules.min_delta:
        return StopState(score, epoch, epoch, 0), Decision(True, False, lr)
    state = state._replace(epoch=epoch, bad_epochs=state.bad_epochs + 1)
    if warming_up(rules, state):
        return state, Decision(False, False, lr)
    if state.bad_epochs >= rules.patience:
        return state, Decision(False, True, lr)
    if rules.reduce_lr_factor > 0:
        lr = min(lr, max(rules.min_lr, lr * rules.reduce_lr_factor))
    return state, Decision(False, False, lr)
