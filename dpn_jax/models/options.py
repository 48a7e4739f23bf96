"""The range of every numeric model option, in one table keyed by option name.

An option means the same in every model that has it (``dropout`` is a rate in [0, 1) wherever
it appears), so one entry covers all of them. :func:`dpn_jax.models.registry.build_model` and
``--set`` parsing check values against this table before any layer is built; a test asserts
that every numeric option of every registered model has an entry here. String options (an
activation, a generator family, field lists) are checked by the models that read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpn_jax.options import Range, check

_COUNT = Range("int", ge=1)  # layers, heads, units: at least one
_AUTO = Range("int", ge=0)  # 0 picks a size from the data (see each model's docstring)
_RATE = Range("float", ge=0, lt=1)  # a dropout rate
_WIDTHS = Range("ints", ge=1)  # hidden layer sizes, e.g. 400,400,400 (empty: no hidden layer)

MODEL_OPTIONS: dict[str, Range] = {
    "embedding_dim": _COUNT,
    # hidden layer sizes
    "hidden": _WIDTHS, "dnn_hidden": _WIDTHS, "attention_hidden": _WIDTHS, "aux_hidden": _WIDTHS,
    "fs_hidden": _WIDTHS, "hypernet_hidden": _WIDTHS, "mlp1_hidden": _WIDTHS,
    "mlp2_hidden": _WIDTHS, "cin_layer_sizes": _WIDTHS,
    # dropout rates
    "dropout": _RATE, "attention_dropout": _RATE, "bi_dropout": _RATE, "encoder_dropout": _RATE,
    # counts and sizes
    "attention_layers": _COUNT, "attention_dim": _COUNT, "num_heads": _COUNT, "heads": _COUNT,
    "generator_heads": _COUNT, "rank": _COUNT, "num_kernels": _COUNT, "num_experts": _COUNT,
    "log_neurons": _COUNT, "layers": _COUNT, "kernel_size": _COUNT,
    "num_layers": Range("int", ge=0),  # 0 cross layers: the cross tower passes x0 through
    "blocks": Range("int", ge=0),  # 0 Transformer blocks: behaviours go straight to the decoder
    "order": Range("int", ge=2),  # HOFM: order 2 is the FM
    # 0 = automatic: embedding size (features, gru_dim), 4x it (ffn_dim), one kernel per channel
    # (conv_heads), the history length (max_positions), full rank (low_rank), no
    # over-parameterisation (overparam)
    "features": _AUTO, "gru_dim": _AUTO, "ffn_dim": _AUTO, "conv_heads": _AUTO,
    "max_positions": _AUTO, "low_rank": _AUTO, "overparam": _AUTO,
    # scales
    "bn_momentum": Range("float", ge=0, lt=1),
    "log_eps": Range("float", gt=0),
    "embedding_init_std": Range("float", gt=0),
    "dynamic_scale": Range("float", ge=0),
    "aux_loss_weight": Range("float", ge=0),
}  # fmt: skip


def check_model_option(key: str, value: Any, where: str = "", text: str | None = None) -> None:
    """A ConfigError naming ``key``, ``value`` (as typed: ``text``) and the range when the
    table's entry rejects it."""
    rng = MODEL_OPTIONS.get(key)
    if rng is not None:
        check(key, value, rng, where, text)


def check_model_options(model: str, options: Mapping[str, Any]) -> None:
    for key, value in options.items():
        check_model_option(key, value, where=f"model {model!r}: ")
