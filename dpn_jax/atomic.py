"""Outputs that appear whole or not at all.

Every file or folder dpn-jax hands to a user is written under a temporary name beside its target
(``scores.tmp-1a2b3c4d.csv``, ``run.tmp-1a2b3c4d``) and renamed onto the target only when it is
complete. A failure or an interruption leaves the previous output untouched and removes the
temporary (a SIGKILL can leave the temporary behind, never a half-written target).

A folder is swapped in one step where the kernel offers it (Linux ``renameat2`` with
``RENAME_EXCHANGE``), else by two renames with the old folder kept until the new one is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from dpn_jax import faults
from dpn_jax.errors import DpnError


def temporary_name(path: Path, folder: bool = False) -> Path:
    """A fresh name beside ``path``; a file keeps its suffix (writers pick formats by it)."""
    tag = secrets.token_hex(4)
    if folder:
        return path.with_name(f"{path.name}.tmp-{tag}")
    return path.with_name(f"{path.stem}.tmp-{tag}{path.suffix}")


def _target(path: str | Path) -> Path:
    """The path written, absolute: through a symbolic link to where it points (the link stays)."""
    p = Path(path).expanduser()
    return p.resolve() if p.is_symlink() else p.absolute()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; file systems that cannot are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to (by any writer); renamed onto ``path``
    when the block ends without an error, removed when it raises."""
    target = _target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DpnError(f"cannot write {target}: {err.strerror or err} ({err.filename})") from None
    tmp = temporary_name(target)
    try:
        yield tmp
        if not tmp.exists():
            raise DpnError(f"{target}: nothing was written")
        _fsync(tmp)
        try:
            if target.is_file():
                os.chmod(tmp, target.stat().st_mode & 0o7777)  # the file keeps who may read it
            faults.point("rename")
            os.replace(tmp, target)
        except OSError as err:
            raise DpnError(f"cannot write {target}: {err.strerror or err}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    faults.point("installed")
    _fsync(target.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open(path, mode)`` for a new ``path`` that replaces the old one only when complete."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_write mode {mode!r}: expected 'w' or 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path) as fh:
        fh.write(text)
    return Path(path)


def save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure to ``path`` (format from the suffix) whole or not at all, and
    close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A new, empty folder ``path.tmp-XXXX`` to fill; when the block ends without an error it
    takes ``path``'s place (the old folder is then deleted), when it raises it is deleted and
    ``path`` is untouched. ``keep(name)``: entries of the old folder to carry into the new one
    just before the swap, e.g. a run's checkpoints beside its bundle (:func:`_carry`)."""
    target = _target(path)
    if target.exists() and not target.is_dir():
        raise DpnError(f"{target} is a file; expected a folder (or a path that does not exist yet)")
    tmp = temporary_name(target, folder=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as err:
        raise DpnError(f"cannot write {target}: {err.strerror or err} ({err.filename})") from None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        try:
            _install(tmp, target, keep)
        except OSError as err:
            raise DpnError(f"cannot replace {target}: {err.strerror or err}; the previous content "
                           f"is unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(target.parent)


def _install(new: Path, target: Path, keep: Callable[[str], bool] | None) -> None:
    """Put the finished folder ``new`` at ``target``, carrying ``keep``'s entries of the old one."""
    if not target.is_dir():
        faults.point("rename")
        os.rename(new, target)  # fails rather than merging if something appeared at target meanwhile
        faults.point("installed")
        return
    os.chmod(new, target.stat().st_mode & 0o7777)  # the folder keeps who may read it
    moved = []
    try:
        for entry in sorted(target.iterdir()):
            if keep is not None and keep(entry.name) and not (new / entry.name).exists():
                faults.point("rename")
                if not _carry(entry, new / entry.name):
                    os.rename(entry, new / entry.name)
                    moved.append(entry.name)
        faults.point("rename")
        old = _swap(new, target)
    except BaseException:
        for name in moved:  # the swap did not happen: the old folder gets its entries back
            with contextlib.suppress(OSError):
                os.rename(new / name, target / name)
        raise
    faults.point("installed")
    shutil.rmtree(old, ignore_errors=True)


def _carry(entry: Path, dst: Path) -> bool:
    """``entry`` also at ``dst``, made of hard links: no data is copied, and the old folder keeps
    the entry whole until the swap, so a process killed in between loses nothing (a move would
    leave it only in the unfinished new folder). False where the file system has no hard links;
    the caller then moves the entry."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, dst, follow_symlinks=False)
    except OSError:
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                dst.unlink()
        return False
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    """libc's ``renameat2`` (Linux, glibc >= 2.28), else None."""
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


def _swap(new: Path, target: Path) -> Path:
    """``new`` becomes ``target``; returns where the old ``target`` folder now is."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        rc = renameat2(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE)
        if rc == 0:
            return new  # one atomic step: `new` now names the old folder
    # two renames: between them `target` is briefly missing, never half-written
    old = target.with_name(f"{target.name}.old-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old
