"""bfloat16 matrix products computed by Intel MKL on the CPU (``matmul_dtype="bfloat16_mkl"``).

XLA:CPU in jaxlib 0.10 does not use the AMX tiles of recent Xeons: its bfloat16 dots run at
140-210 GFLOP/s on this 2-core Sapphire Rapids, slower than its float32 ones, while PyTorch's
oneDNN reaches 830-1770 GFLOP/s on the same products (experiments/results/step_anatomy_cpu.md).
MKL's ``cblas_gemm_bf16bf16f32`` uses the tiles too. This module compiles a small XLA FFI
handler (``mkl_gemm.cc``, against jaxlib's FFI headers) on first use, hands it the MKL function
resolved at run time, and registers it as a CPU custom call; :func:`mkl_bf16_matmul` is
:func:`dpn_jax.nn.precision.bf16_matmul` with its three products done there. Same numbers up to
float32 summation order (tested).

Needs: the ``mkl`` wheel (``pip install -e ".[mkl]"``; it is in ``[dev]``), a C++17 compiler
(``$CXX``, else ``g++`` or ``c++``) and the CPU backend. The built library is cached under
``$DPN_CACHE_DIR`` (default ``~/.cache/dpn_jax``) in ``ffi/``, keyed by the source and jaxlib
version. ``DPN_JAX_MKL`` may name the ``libmkl_rt`` file to use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp

from dpn_jax.errors import ConfigError

SOURCE = Path(__file__).with_name("mkl_gemm.cc")
TARGET = "dpn_jax_bf16_gemm"
OPTION = "matmul_dtype=bfloat16_mkl"


def _cache_dir() -> Path:
    base = os.environ.get("DPN_CACHE_DIR") or Path.home() / ".cache" / "dpn_jax"
    return Path(base) / "ffi"


def _mkl_candidates() -> list[str]:
    if os.environ.get("DPN_JAX_MKL"):
        return [os.environ["DPN_JAX_MKL"]]
    # the mkl wheel installs its libraries into <prefix>/lib, outside the loader's search path
    prefixed = [str(Path(sys.prefix) / "lib" / f"libmkl_rt.so.{v}") for v in (3, 2)]
    found = ctypes.util.find_library("mkl_rt")
    return prefixed + ([found] if found else [])


def _load_mkl() -> ctypes.CDLL:
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


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise ConfigError(f"{OPTION}: no C++ compiler found ($CXX, g++, c++, clang++) to build "
                      f"{SOURCE.name}; install one (e.g. apt install g++) or use matmul_dtype=bfloat16")


def _build() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + metadata.version("jaxlib").encode()).hexdigest()[:16]
    out = _cache_dir() / f"libdpn_jax_mkl_gemm-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes (pytest -n) never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
           str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise ConfigError(f"{OPTION}: compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def load() -> None:
    """Build (once per source and jaxlib version), load and register the handler."""
    mkl = _load_mkl()
    lib = ctypes.CDLL(str(_build()))
    lib.dpn_jax_set_gemm(ctypes.cast(mkl.cblas_gemm_bf16bf16f32, ctypes.c_void_p))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DpnJaxBf16Gemm), platform="cpu")


def unavailable_reason() -> str | None:
    """None when the MKL products can run here, else why not."""
    if jax.default_backend() != "cpu":
        return f"{OPTION} runs on the CPU backend only (this one is {jax.default_backend()})"
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


@jax.custom_vjp
def mkl_bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [n,m] @ w [m,k]`` with bfloat16 operands and a float32 result, by MKL; the backward
    products likewise (gradients in the inputs' dtypes)."""
    return mkl_dot(x, w)


def _fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return mkl_dot(xb, wb), (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _bwd(res, g):
    xb, wb, x_like, w_like = res
    gb = g.astype(jnp.bfloat16)
    # the transposes are MKL's flags: no xᵀ or Wᵀ is materialised
    dx = mkl_dot(gb, wb, trans_b=True)
    dw = mkl_dot(xb, gb, trans_a=True)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


mkl_bf16_matmul.defvjp(_fwd, _bwd)
