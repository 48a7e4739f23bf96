"""Native kernels' shared libraries: built and loaded only from a private folder, and rebuilt when
they no longer match the hash of the source they were built from."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest

from dpn_jax import native
from dpn_jax.errors import ConfigError

pytestmark = pytest.mark.skipif(native.shutil.which("g++") is None and native.shutil.which("c++") is None,
                                reason="no C++ compiler")
PROBE = 'extern "C" int dpn_probe() { return 7; }\n'


@pytest.fixture
def probe_source(tmp_path: Path, monkeypatch) -> str:
    """A one-line source in place of dpn_jax/native (compiles in a blink)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "probe.cc").write_text(PROBE)
    monkeypatch.setattr(native, "HERE", src)
    monkeypatch.setenv("DPN_CACHE_DIR", str(tmp_path / "cache"))
    return "probe.cc"


def test_library_folder_is_private_and_others_are_refused(tmp_path: Path, probe_source: str) -> None:
    lib = native.build(probe_source, "test")
    assert lib.parent == tmp_path / "cache" / "ffi" and lib.parent.stat().st_mode & 0o777 == 0o700
    assert ctypes.CDLL(str(lib)).dpn_probe() == 7
    os.chmod(lib.parent, 0o777)  # anyone could now swap the library for theirs
    with pytest.raises(ConfigError, match=r"lazy_adam_kernel=native: \S+/ffi is not a private folder "
                                          r"\(owner uid \d+, mode 0777"):
        native.build(probe_source, "lazy_adam_kernel=native")
    os.chmod(lib.parent, 0o755)
    assert native.build(probe_source, "test") == lib  # not writable by others: fine
    if os.getuid() == 0:
        os.chown(lib.parent, 12345, 12345)
        with pytest.raises(ConfigError, match="owner uid 12345"):
            native.build(probe_source, "test")


def test_unwritable_cache_falls_back_to_a_private_per_user_folder(tmp_path: Path, probe_source: str,
                                                                  monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder should be: it cannot be created
    monkeypatch.setenv("DPN_CACHE_DIR", str(blocker))
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(shared_tmp))
    planted = shared_tmp / f"dpn_jax_ffi-{os.getuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)  # someone prepared the predictable folder, writable by all
    with pytest.raises(ConfigError, match="is not a private folder"):
        native.build(probe_source, "test")
    planted.rmdir()
    lib = native.build(probe_source, "test")
    assert lib.parent == planted and planted.stat().st_mode & 0o777 == 0o700
    assert ctypes.CDLL(str(lib)).dpn_probe() == 7


def test_a_library_that_does_not_match_its_recorded_hashes_is_rebuilt(probe_source: str) -> None:
    lib = native.build(probe_source, "test")
    good = lib.read_bytes()
    lib.write_bytes(good[: len(good) // 2])  # a truncated (or swapped) library
    assert native.build(probe_source, "test") == lib and lib.read_bytes() != good[: len(good) // 2]
    record = json.loads(Path(f"{lib}.sha256").read_text())
    assert set(record) == {"source", "library"} and lib.name.split("-")[1][:16] == record["source"][:16]
    assert json.loads(Path(f"{lib}.sha256").read_text())["library"] == native._sha256(lib.read_bytes())
    Path(f"{lib}.sha256").unlink()  # no record of what it was built from
    stale = lib.stat().st_mtime_ns
    native.build(probe_source, "test")
    assert lib.stat().st_mtime_ns != stale and Path(f"{lib}.sha256").exists()
    assert ctypes.CDLL(str(lib)).dpn_probe() == 7
