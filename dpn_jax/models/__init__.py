"""CTR models, found by name: ``build_model(name, schema, **options)``."""

from dpn_jax.models import (  # noqa: F401  (importing registers the models)
    cross_family,
    deep_family,
    dien,
    dnn,
    dpn,
    fm_family,
    linear,
    sequence_family,
    transformer_family,
)
from dpn_jax.models.registry import (
    available_models,
    build_model,
    get_model_class,
    legacy_options,
    model_options,
    model_summary,
    register,
)

__all__ = ["available_models", "build_model", "get_model_class", "legacy_options", "model_options",
           "model_summary", "register"]
