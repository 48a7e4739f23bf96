"""bfloat16 matrix products computed by Intel MKL on the CPU (``matmul_dtype="bfloat16_mkl"``).

XLA:CPU in jaxlib 0.10 does not use the AMX tiles of recent Xeons: its bfloat16 dots run at
140-210 GFLOP/s on this 2-core Sapphire Rapids, slower than its float32 ones, while PyTorch's
oneDNN reaches 830-1770 GFLOP/s on the same products (experiments/results/step_anatomy_cpu.md).
MKL's ``cblas_gemm_bf16bf16f32`` uses the tiles too. This module builds a small XLA FFI handler
(``dpn_jax/native/mkl_gemm.cc``, :mod:`dpn_jax.native`) on first use, hands it the MKL function
resolved at run time and registers it as a CPU custom call; :func:`mkl_dot` is that product, and
:func:`dpn_jax.nn.precision.mkl_bf16_matmul` is :func:`dpn_jax.nn.precision.bf16_matmul` with its
three products done by it. Same numbers up to float32 summation order (tested).

Needs: the ``mkl`` wheel (``pip install -e ".[mkl]"``; it is in ``[dev]``), a C++17 compiler
and the CPU backend. ``DPN_JAX_MKL`` may name the ``libmkl_rt`` file to use; ``KMP_BLOCKTIME``
defaults to 0 (see :func:`_load_mkl`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dpn_jax import native
from dpn_jax.errors import ConfigError

TARGET = "dpn_jax_bf16_gemm"
OPTION = "matmul_dtype=bfloat16_mkl"
PORTABLE = "matmul_dtype=bfloat16"  # the same products by XLA, on any backend


def _mkl_candidates() -> list[str]:
    if os.environ.get("DPN_JAX_MKL"):
        return [os.environ["DPN_JAX_MKL"]]
    # the mkl wheel installs its libraries into <prefix>/lib, outside the loader's search path
    prefixed = [str(Path(sys.prefix) / "lib" / f"libmkl_rt.so.{v}") for v in (3, 2)]
    found = ctypes.util.find_library("mkl_rt")
    return prefixed + ([found] if found else [])


def _load_mkl() -> ctypes.CDLL:
    # MKL's OpenMP threads spin 200 ms after each product by default, taking the cores from
    # XLA's own threads between the products (docs/results/speed.md, §'Where a train step goes').
    # Read when the OpenMP runtime starts, so set before loading MKL.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    tried = _mkl_candidates()
    for path in tried:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "cblas_gemm_bf16bf16f32"):
            return lib
    raise ConfigError(f"{OPTION}: no MKL library with cblas_gemm_bf16bf16f32 (tried {tried}); "
                      "install it with pip install -e \".[mkl]\" or set DPN_JAX_MKL to libmkl_rt's path")


@functools.cache
def load() -> None:
    """Build (once per source and jaxlib version), load and register the handler."""
    mkl = _load_mkl()
    lib = native.load("mkl_gemm.cc", (("DpnJaxBf16Gemm", TARGET),), OPTION)
    lib.dpn_jax_set_gemm(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p))


def unavailable_reason() -> str | None:
    """None when the MKL products can run here, else why not."""
    reason = native.cpu_only(OPTION, PORTABLE)
    if reason:
        return reason
    try:
        load()
    except ConfigError as err:
        return str(err)
    return None


def mkl_dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` in float32 for 2-D bfloat16 ``a``, ``b`` (``op`` transposes when asked)."""
    reason = unavailable_reason()
    if reason:
        raise ConfigError(reason)
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    return call(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), trans_a=trans_a, trans_b=trans_b)
