"""The early-stopping / learning-rate state machine, against its rules: a new best resets the
count, ``patience`` bad epochs stop, ``min_epochs`` holds both stop and lr cut, the cut is
times ``reduce_lr_factor`` floored at ``min_lr`` and never raises, ``min_delta`` is a margin."""

from __future__ import annotations

import math

import pytest

from dpn_jax.train.config import TrainConfig
from dpn_jax.train.early_stopping import Decision, Rules, StopState, update, warming_up


def _run(rules: Rules, scores, lr: float = 1e-3, state: StopState | None = None):
    """Feed ``scores`` epoch by epoch, applying each decision's lr: ``(state, decisions)``."""
    state, out = state or StopState(), []
    for score in scores:
        state, d = update(rules, state, score, lr)
        out.append(d)
        lr = d.lr
    return state, out


def test_patience_and_bests():
    rules = Rules(patience=2)
    state, ds = _run(rules, [0.7, 0.71, 0.70, 0.72, 0.72, float("nan")])
    assert [d.improved for d in ds] == [True, True, False, True, False, False]
    assert [d.stop for d in ds] == [False] * 5 + [True]  # two bad in a row; equal is not better
    assert state == StopState(best=0.72, best_epoch=4, epoch=6, bad_epochs=2)
    # a NaN score is never a best, even the first
    state, (d,) = _run(rules, [float("nan")])
    assert not d.improved and state.best == -math.inf and state.bad_epochs == 1


def test_min_epochs_holds_stop_and_lr_cut():
    rules = Rules(patience=1, min_epochs=3, reduce_lr_factor=0.5)
    state = StopState()
    state, d = update(rules, state, 0.7, 1e-3)
    assert d == Decision(True, False, 1e-3) and warming_up(rules, state)
    state, d = update(rules, state, 0.6, 1e-3)  # bad, but only 2 of 3 epochs: no stop, no cut
    assert d == Decision(False, False, 1e-3) and warming_up(rules, state)
    state, d = update(rules, state, 0.6, 1e-3)
    assert d == Decision(False, True, 1e-3) and not warming_up(rules, state)
    assert (state.epoch, state.bad_epochs, state.best) == (3, 2, 0.7)


def test_resumed_state_keeps_its_counters_and_takes_rules_from_the_config():
    state, _ = _run(Rules(patience=1, min_epochs=3), [0.7, 0.6, 0.6])
    again = StopState.restore(state._asdict())
    assert again == state
    # a checkpoint from before the rules left the state keeps loading (extra keys are ignored)
    assert StopState.restore({**state._asdict(), "patience": 1, "min_delta": 0.0}) == state
    rules = Rules.of(TrainConfig(patience=4, min_epochs=5, reduce_lr_factor=0.1, min_lr=1e-5))
    assert rules == Rules(patience=4, min_epochs=5, min_delta=0.0, reduce_lr_factor=0.1, min_lr=1e-5)
    assert warming_up(rules, again)
    _, d = update(rules, again, 0.5, 1e-3)  # 3 bad < patience 4, and epoch 4 < 5: go on, uncut
    assert d == Decision(False, False, 1e-3)


def test_lr_cut_floored_never_raised_off_at_zero():
    """The one lr rule of fit and the sweep: times the factor, floored at min_lr, never raised,
    none while warming up or with the factor 0."""
    rules = Rules(patience=3, reduce_lr_factor=0.1, min_lr=1e-5)
    good, _ = _run(rules, [0.7])

    def cut(lr, r=rules, state=good):
        return update(r, state, 0.6, lr)[1].lr

    assert cut(1e-3) == pytest.approx(1e-4)
    assert cut(5e-5) == 1e-5  # floored
    assert cut(1e-6) == 1e-6  # below the floor already: not raised
    assert cut(0.0) == 0.0  # a zero lr stays zero (not raised to min_lr)
    assert cut(1e-3, rules._replace(reduce_lr_factor=0.0)) == 1e-3
    warm, _ = _run(rules._replace(min_epochs=3), [0.7])
    assert cut(1e-3, rules._replace(min_epochs=3), warm) == 1e-3
    # consecutive bad epochs cut again each time, until patience stops (then the lr stays)
    _, ds = _run(rules, [0.7, 0.6, 0.6, 0.6], lr=1e-2)
    assert [d.lr for d in ds] == pytest.approx([1e-2, 1e-3, 1e-4, 1e-4]) and ds[-1].stop


def test_min_delta_is_a_margin():
    rules = Rules(patience=5, min_delta=0.01)
    state, ds = _run(rules, [0.70, 0.705, 0.711, 0.72])
    assert [d.improved for d in ds] == [True, False, True, False]
    assert state.best == 0.711 and state.best_epoch == 3 and state.bad_epochs == 1


def test_scripted_plateau_matches_fit():
    """The sequence of test_train.test_reduce_lr_on_plateau_and_early_stop, on the state machine."""
    rules = Rules.of(TrainConfig(patience=3, reduce_lr_factor=0.1))
    state, ds = _run(rules, [0.70, 0.72, 0.71, 0.69, 0.68], lr=1e-2)
    assert [d.lr for d in ds] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-4, 1e-4])
    assert [d.stop for d in ds] == [False] * 4 + [True] and state.best_epoch == 2
