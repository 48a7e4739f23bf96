"""Native CPU kernels: small C++ XLA FFI handlers, compiled on first use.

XLA:CPU leaves two parts of a CTR train step far from this hardware: bfloat16 matrix products
(no AMX path; ``mkl_gemm.cc`` hands them to MKL) and the embedding rows' sparse updates (every
gather and scatter is an element-wise loop; ``sparse_adam.cc`` updates the rows in one pass).
Each ``.cc`` here needs only jaxlib's FFI headers. :func:`load` compiles it with ``$CXX`` (else
``g++``, ``c++``, ``clang++``) into ``$DPN_CACHE_DIR/ffi`` (default ``~/.cache/dpn_jax/ffi``),
keyed by the source and the jaxlib version, and registers its handlers as CPU custom calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import jax

from dpn_jax.errors import ConfigError

HERE = Path(__file__).parent


def cache_dir() -> Path:
    base = os.environ.get("DPN_CACHE_DIR") or Path.home() / ".cache" / "dpn_jax"
    return Path(base) / "ffi"


def compiler(option: str) -> str:
    """The C++ compiler to use; ``option`` (what the user set) goes into the error."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise ConfigError(f"{option}: no C++ compiler found ($CXX, g++, c++, clang++) to build the "
                      f"native kernel; install one (e.g. apt install g++)")


def build(source: str, option: str) -> Path:
    """The shared library of ``dpn_jax/native/<source>``, compiled once per source and jaxlib."""
    path = HERE / source
    text = path.read_bytes()
    key = hashlib.sha256(text + metadata.version("jaxlib").encode()).hexdigest()[:16]
    out = cache_dir() / f"lib{path.stem}-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build in the temporary directory instead
        out = Path(tempfile.gettempdir()) / "dpn_jax_ffi" / out.name
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes (pytest -n) never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler(option), "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", str(path), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise ConfigError(f"{option}: compiling {path} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@functools.cache
def load(source: str, handlers: tuple[tuple[str, str], ...], option: str) -> ctypes.CDLL:
    """Build and load ``source``; register each ``(symbol, target)`` handler on the CPU."""
    lib = ctypes.CDLL(str(build(source, option)))
    for symbol, target in handlers:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def cpu_only(option: str, instead: str, backend: str | None = None) -> str | None:
    """Why ``--set option`` cannot run on ``backend`` (default: this process's), or None on the
    CPU; ``instead`` is the setting that runs everywhere."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return None
    return f"--set {option} runs on the CPU only; this run's backend is {backend}: use {instead}"
