"""Early stopping on a metric that should increase (validation AUC)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
    """``update(value)`` returns True when ``value`` is a new best (by more than ``min_delta``);
    ``should_stop`` turns True after ``patience`` consecutive epochs without one, and not before
    ``min_epochs`` epochs; ``warming_up`` (no learning-rate cut) while fewer have run."""

    patience: int = 2
    min_epochs: int = 0
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0
    bad_epochs: int = 0

    @classmethod
    def for_config(cls, cfg, saved: dict | None = None) -> EarlyStopping:
        """The stopper of a ``TrainConfig`` (its ``patience`` and ``min_epochs``), continuing the
        counters of ``saved`` (a :meth:`state_dict`) when resuming."""
        return cls(**{**(saved or {}), "patience": cfg.patience, "min_epochs": cfg.min_epochs})

    def update(self, value: float) -> bool:
        self.epoch += 1
        if math.isfinite(value) and value > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience and not self.warming_up

    @property
    def warming_up(self) -> bool:
        return self.epoch < self.min_epochs

    def lr_after_bad_epoch(self, lr: float, cfg) -> float:
        """The learning rate after an epoch without gain that did not stop the run: times
        ``cfg.reduce_lr_factor`` and floored at ``cfg.min_lr`` (never raised above ``lr``); ``lr``
        itself while warming up or when the factor is 0 (cuts off)."""
        if cfg.reduce_lr_factor <= 0 or self.warming_up:
            return lr
        return min(lr, max(cfg.min_lr, lr * cfg.reduce_lr_factor))

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)
