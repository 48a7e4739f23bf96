"""CTR models, found by name: ``build_model(name, schema, **options)``."""

from dpn_jax.models import cross_family, dnn, dpn, fm_family, linear  # noqa: F401  (registers the models)
from dpn_jax.models.registry import (
    available_models,
    build_model,
    get_model_class,
    model_options,
    model_summary,
    register,
)

__all__ = ["available_models", "build_model", "get_model_class", "model_options",
           "model_summary", "register"]
