"""Native CPU kernels: small C++ XLA FFI handlers, compiled on first use.

XLA:CPU leaves two parts of a CTR train step far from this hardware: bfloat16 matrix products
(no AMX path; ``mkl_gemm.cc`` hands them to MKL) and the embedding rows' sparse updates (every
gather and scatter is an element-wise loop; ``sparse_adam.cc`` updates the rows in one pass).
Each ``.cc`` here needs only jaxlib's FFI headers. :func:`load` compiles it with ``$CXX`` (else
``g++``, ``c++``, ``clang++``) into ``$DPN_CACHE_DIR/ffi`` (default ``~/.cache/dpn_jax/ffi``),
keyed by the source and the jaxlib version, and registers its handlers as CPU custom calls.

Loading a shared library runs its code, so the folder must be private: it is created with mode
0700, and one that is group- or world-writable, or owned by another user, is refused. When the
cache cannot be written, the per-user ``<tmp>/dpn_jax_ffi-<uid>`` is used under the same rules.
Beside each library, ``.sha256`` records the source hash it was built from and its own hash;
a library that does not match them (stale, truncated, replaced) is rebuilt before it is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import stat
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


def _private(folder: Path, option: str) -> Path | None:
    """``folder``, created 0700 if missing; None when it cannot be created or written; a
    ConfigError when another user could put a library in it."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    uid = os.getuid() if hasattr(os, "getuid") else None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid) \
            or st.st_mode & 0o022:
        raise ConfigError(f"{option}: {folder} is not a private folder (owner uid {st.st_uid}, mode "
                          f"{stat.S_IMODE(st.st_mode):04o}; expected a folder of uid {uid} that only "
                          f"its owner can write): native code is not built or loaded from it; "
                          f"`chmod go-w` it, or set DPN_CACHE_DIR to a folder of your own")
    return folder if os.access(folder, os.W_OK) else None


def library_dir(option: str) -> Path:
    """Where native libraries are built and loaded from (module docstring)."""
    folder = _private(cache_dir(), option)
    if folder is None:  # a read-only home: a per-user folder in the temporary directory instead
        user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
        fallback = Path(tempfile.gettempdir()) / f"dpn_jax_ffi-{user}"
        folder = _private(fallback, option)
        if folder is None:
            raise ConfigError(f"{option}: cannot write the native kernel's library to {cache_dir()} "
                              f"or {fallback}; set DPN_CACHE_DIR to a writable folder")
    return folder


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _matches(lib: Path, source_hash: str) -> bool:
    """``lib`` exists, was built from the source with ``source_hash``, and is unchanged since."""
    try:
        recorded = json.loads(lib.with_name(lib.name + ".sha256").read_text())
        return recorded["source"] == source_hash and recorded["library"] == _sha256(lib.read_bytes())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build(source: str, option: str) -> Path:
    """The shared library of ``dpn_jax/native/<source>``, compiled once per source and jaxlib."""
    path = HERE / source
    source_hash = _sha256(path.read_bytes() + metadata.version("jaxlib").encode())
    out = library_dir(option) / f"lib{path.stem}-{source_hash[:16]}.so"
    if _matches(out, source_hash):
        return out
    # build beside the target and rename: concurrent processes (pytest -n) never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler(option), "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", str(path), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise ConfigError(f"{option}: compiling {path} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    record = {"source": source_hash, "library": _sha256(Path(tmp).read_bytes())}
    fd, tmp_record = tempfile.mkstemp(suffix=".sha256", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, out)
    os.replace(tmp_record, out.with_name(out.name + ".sha256"))
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
