"""Profile-guided XLA:CPU defaults, set before jax creates its CPU backend.

jaxlib 0.10 sends dots on the CPU to YNNPACK fusions by default. Profiling the DNN train step
(Criteo shape, batch 4096) on our 2-core AVX2 machines showed those dots running at about half
of Eigen's rate; with ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions, Eigen
dots) the step is 7-15% faster (experiments/results/xla_cpu_ab.md, docs/results/speed.md). The flag is set only when all of these
hold: the user's ``XLA_FLAGS`` does not mention it, ``DPN_JAX_XLA_DEFAULTS=0`` is not set, and
the installed jaxlib is a series known to have the flag (an unknown flag aborts XLA).
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
KNOWN_SERIES = ("0.10.",)


def cpu_defaults(env: dict | None = None, jaxlib_version: str | None = None) -> str | None:
    """The ``XLA_FLAGS`` value to use, or None to leave the environment as it is."""
    env = os.environ if env is None else env
    if env.get("DPN_JAX_XLA_DEFAULTS", "1") == "0":
        return None
    flags = env.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return None
    if jaxlib_version is None:
        try:
            jaxlib_version = metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return None
    if not jaxlib_version.startswith(KNOWN_SERIES):
        return None
    return f"{flags} {YNN_OFF}".strip()


def apply() -> None:
    value = cpu_defaults()
    if value is not None:
        os.environ["XLA_FLAGS"] = value
