"""Every training and model option has a declared type and range, checked before any work: at
``--set``/``--grid`` parsing, at TrainConfig construction and where the registry builds a model.
A bad value is one line naming the key, the value and the allowed range (exit status 2)."""

from __future__ import annotations

import dataclasses

import pytest

from dpn_jax.cli import main
from dpn_jax.errors import ConfigError
from dpn_jax.models import available_models, build_model, model_options
from dpn_jax.sweep_runner import configurations
from dpn_jax.train.config import TrainConfig, split_overrides

BAD_SETS = [  # --set item, what the one-line message must say
    ("batch_size=0", "--set batch_size=0: batch_size must be >= 1 (an integer)"),
    ("batch_size=-5", "--set batch_size=-5: batch_size must be >= 1"),
    ("eval_batch_size=0", "--set eval_batch_size=0: eval_batch_size must be >= 1"),
    ("max_epochs=0", "--set max_epochs=0: max_epochs must be >= 1"),
    ("lr=-1", "--set lr=-1: lr must be > 0 and finite"),
    ("lr=0", "--set lr=0: lr must be > 0"),
    ("lr=nan", "--set lr=nan: lr must be > 0 and finite"),
    ("lr=inf", "--set lr=inf: lr must be > 0 and finite"),
    ("patience=-1", "--set patience=-1: patience must be >= 0"),
    ("reduce_lr_factor=1.5", "--set reduce_lr_factor=1.5: reduce_lr_factor must be >= 0 and < 1"),
    ("optimizer=sgd", "--set optimizer=sgd: choose one of adam, lazy_adam"),
    ("monitor=loss", "--set monitor=loss: choose one of auc, auc-logloss"),
    ("on_nonfinite=ignore", "--set on_nonfinite=ignore: choose one of stop, skip"),
    ("lazy_adam_kernel=fast", "--set lazy_adam_kernel=fast: choose one of xla, native"),
    ("embedding_dim=0", "--set embedding_dim=0: embedding_dim must be >= 1 (an integer)"),
    ("dropout=1.5", "--set dropout=1.5: dropout must be >= 0 and < 1"),
    ("dropout=-0.1", "--set dropout=-0.1: dropout must be >= 0 and < 1"),
    ("hidden=400,0", "--set hidden=400,0: hidden must be a list of integers >= 1"),
]


@pytest.mark.parametrize("item, message", BAD_SETS)
def test_set_values_outside_their_range_are_one_line(item, message):
    with pytest.raises(ConfigError) as err:
        split_overrides([item], model_options("dnn"), "dnn")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_good_values_pass_and_keep_their_types():
    train, model = split_overrides(["lr=3e-4", "patience=0", "reduce_lr_factor=0", "dropout=0",
                                    "hidden=64,32", "monitor=auc-logloss"], model_options("dnn"), "dnn")
    assert train == {"lr": 3e-4, "patience": 0, "reduce_lr_factor": 0.0, "monitor": "auc-logloss"}
    assert model == {"dropout": 0.0, "hidden": (64, 32)}
    TrainConfig(**train)


def test_train_config_checks_at_construction():
    for kw, message in [({"lr": 0.0}, "lr=0.0: lr must be > 0 and finite"),
                        ({"batch_size": 2.5}, "batch_size=2.5: batch_size must be >= 1 (an integer)"),
                        ({"max_epochs": True}, "max_epochs=true: max_epochs must be >= 1"),
                        ({"bn_recalibrate": 1}, "bn_recalibrate=1: bn_recalibrate must be true or false"),
                        ({"optimizer": "sgd"}, "optimizer=sgd: choose one of adam, lazy_adam")]:
        with pytest.raises(ConfigError) as err:
            TrainConfig(**kw)
        assert str(err.value).startswith(message)
    with pytest.raises(ConfigError, match="min_lr=-1.0: min_lr must be >= 0"):
        TrainConfig().replace(min_lr=-1.0)


def test_every_train_option_declares_a_range_its_default_meets():
    from dpn_jax.options import Range, kind_of

    for f in dataclasses.fields(TrainConfig):
        rng = f.metadata.get("range")
        assert isinstance(rng, Range), f"TrainConfig.{f.name} declares no range"
        assert rng.kind == kind_of(f.default) and rng.accepts(f.default), f.name


def test_choices_are_what_the_training_code_accepts():
    from dpn_jax.train.config import MONITORS
    from dpn_jax.train.loop import monitor_score
    from dpn_jax.train.state import make_optimizer

    for opt in ("adam", "lazy_adam"):
        make_optimizer(TrainConfig(optimizer=opt))
    for name in MONITORS:
        monitor_score(name, {"auc": 0.5, "logloss": 0.7})


def test_sweep_grid_values_are_checked_before_any_work():
    with pytest.raises(ConfigError) as err:
        configurations("dnn", {"lr": ["1e-3", "-1"]}, ["dropout=0.1"])
    assert str(err.value) == "--grid lr=-1: lr must be > 0 and finite"
    with pytest.raises(ConfigError, match=r"^--grid dropout=1.5: dropout must be >= 0 and < 1$"):
        configurations("dnn", {"dropout": ["0.1", "1.5"]}, [])
    assert [c.train_kw for c in configurations("dnn", {"lr": ["1e-3"]}, ["lr=3e-4"])] == [{"lr": 1e-3}]


def test_every_numeric_model_option_has_a_declared_range():
    """Every int, float or list-of-int option of every registered model has an entry in the one
    table of model options; its default meets it."""
    from dpn_jax.models.options import MODEL_OPTIONS
    from dpn_jax.options import kind_of

    seen = set()
    for name in available_models():
        for key, default in model_options(name).items():
            kind = kind_of(default)
            if kind not in ("int", "float", "ints"):
                continue
            seen.add(key)
            assert key in MODEL_OPTIONS, f"model {name!r}: option {key!r} has no declared range"
            rng = MODEL_OPTIONS[key]
            assert rng.kind == kind or (rng.kind == "float" and kind == "int"), (name, key)
            assert rng.accepts(default), f"model {name!r}: default {key}={default!r} is out of range"
    assert set(MODEL_OPTIONS) <= seen  # no entry for an option no model has


def test_build_model_checks_option_ranges(tiny_synthetic):
    for kw, message in [({"embedding_dim": 0}, "model 'dnn': embedding_dim=0: embedding_dim must be >= 1"),
                        ({"dropout": 1.5}, "model 'dnn': dropout=1.5: dropout must be >= 0 and < 1"),
                        ({"hidden": (16, -3)}, "model 'dnn': hidden=16,-3: hidden must be a list of integers >= 1"),
                        ({"bn_momentum": float("nan")}, "model 'dnn': bn_momentum=nan: bn_momentum must be")]:
        with pytest.raises(ConfigError) as err:
            build_model("dnn", tiny_synthetic.schema, **kw)
        assert str(err.value).startswith(message)
    for name, kw, message in [("dpn", {"rank": 0}, "rank=0: rank must be >= 1"),
                              ("hofm", {"order": 1}, "order=1: order must be >= 2"),
                              ("bst", {"encoder_dropout": 1.0}, "encoder_dropout=1.0: encoder_dropout must be")]:
        with pytest.raises(ConfigError, match=message):
            build_model(name, tiny_synthetic.schema, **kw)
    build_model("dnn", tiny_synthetic.schema, hidden=(), dropout=0.0)  # no hidden layer is fine


@pytest.mark.parametrize("item, fragment", [("batch_size=0", "batch_size must be >= 1"),
                                            ("dropout=1.5", "dropout must be >= 0 and < 1"),
                                            ("lr=nan", "lr must be > 0 and finite")])
def test_cli_exits_2_with_one_line(item, fragment, capsys):
    code = main(["train", "--model", "dnn", "--data", "synthetic", "--set", item, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"dpn-jax: error: --set {item}: {fragment}" + err[0].split(fragment)[1]]
    assert "Traceback" not in err[0]
