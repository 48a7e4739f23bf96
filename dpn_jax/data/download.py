"""Download dataset files robustly -- resume, verify, extract -- with the standard library only.

``fetch([RemoteFile(url, name, sha256=..., extract=True)], dest)`` is the mechanism behind
``dpn-jax data download NAME --to DIR`` (which URLs to fetch is the dataset registry's business).
For every file, in order:

1. **Skip** it when ``DEST/NAME`` is already there and verifies (log: "already present, sha256
   ok"). A present file that does not verify is moved to ``NAME.corrupt`` and downloaded again.
2. **Download** into ``DEST/NAME.part``. An existing ``.part`` is resumed with ``Range:
   bytes=<size>-``: a 206 appends, a 200 (the server ignores ranges) starts over from zero, and a
   416 for a part that is already complete goes straight to verification. A connection that drops
   or stalls (``IncompleteRead``, reset, read timeout) and HTTP 408/429/5xx are retried up to
   ``retries`` times in a row without progress, resuming each time, after ``BACKOFF_S * attempt``
   seconds. Every socket operation (connect, each read) has ``timeout`` and the host name is
   resolved under the same limit, so nothing hangs. ``http(s)_proxy`` variables are honoured.
3. **Verify** the ``.part``: its size (when given), then md5 / sha256 (when given). A mismatch
   renames it ``NAME.corrupt`` and raises :class:`~dpn_jax.errors.DataError` naming the expected
   and actual digests and the URL. When no checksum is published, the sha256 of the first download
   is recorded in ``DEST/CHECKSUMS.sha256`` (``sha256sum`` format, so ``sha256sum -c`` works there)
   and later runs verify against that record ("trust on first use"). Only a verified ``.part``
   becomes ``NAME``, by ``os.replace``: an interrupted run never leaves a file that looks finished.
4. **Extract** when ``extract=True``: ``.zip``; ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
   ``.tar.xz``; or a single-file ``.gz`` (to ``NAME`` without ``.gz``). A member with an absolute
   path or a ``..`` component is refused before it is written; tar members also go through
   ``filter="data"`` (no links out of DEST, no devices) where Python has it, and links are refused
   where it does not. Everything is unpacked into a hidden temporary folder inside DEST, then
   moved into place (merged into existing folders), and a stamp ``NAME.extracted`` holding the
   archive's sha256 makes reruns skip it. An interrupted extraction leaves nothing half-written
   in place (at worst an orphan ``.NAME.extracting-*`` folder).

Errors are :class:`~dpn_jax.errors.DataError` with one line (the CLI prints ``str(err)``). No
network (DNS failure, connection refused, unreachable, connect timeout) names the URL and host,
says there appears to be no network access, and says to download the file elsewhere and place it
as ``DEST/NAME``, then rerun -- present, verified files are skipped. HTTP errors name the status;
401/403 add that the source may need a login (e.g. Kaggle).

Progress: a rich bar (bytes, MB/s, ETA) when stderr is a terminal (``progress=None``) or
``progress=True``; otherwise a log line at most every ~10% (every 10 s when the size is unknown).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import socket
import ssl
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from dpn_jax.errors import DataError

__all__ = ["CHECKSUMS", "RemoteFile", "fetch"]

CHECKSUMS = "CHECKSUMS.sha256"
BACKOFF_S = 0.5  # sleep BACKOFF_S * attempt before a retry; tests set it to 0
CHUNK = 1 << 16
USER_AGENT = "dpn-jax-download/1 (+python urllib)"  # some hosts refuse urllib's default agent
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# A connection that breaks or stalls once it is up: worth another try, resuming.
_TRANSIENT = (http.client.HTTPException, ConnectionError, TimeoutError)
_NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL)
_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # tarfile's data filter: Python 3.11.4+

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """``url`` -> ``DEST/name``, with what is published to verify it, and whether to unpack it."""

    url: str
    name: str  # file name written under the destination folder
    sha256: str | None = None  # published checksums, when known (either or both)
    md5: str | None = None
    size: int | None = None  # expected byte size, when known
    extract: bool = False  # after verifying: unpack .zip / .tar(.gz) / .tgz / .gz next to it

    def __post_init__(self) -> None:
        n = self.name
        if not n or n in (".", "..", CHECKSUMS) or "/" in n or "\\" in n or n.startswith("."):
            raise DataError(f"download {self.url}: {n!r} is not a plain file name")
        for algo, digest, width in (("sha256", self.sha256, 64), ("md5", self.md5, 32)):
            if digest is not None and (len(digest) != width or not _is_hex(digest)):
                raise DataError(f"download {self.url}: {algo} {digest!r} is not {width} hex digits")
        if self.extract and _archive_kind(n) is None:
            raise DataError(f"download {self.url}: cannot extract {n!r} "
                            "(not .zip, .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz or .gz)")


def fetch(files: Sequence[RemoteFile], dest: str | Path, *, timeout: float = 30.0, retries: int = 3,
          progress: bool | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Download every file into dest (created), resuming, verifying, extracting. Returns the paths.

    ``timeout`` bounds each connect / DNS lookup / read; ``retries`` is how many times in a row a
    broken transfer is retried without new bytes; ``progress=None`` shows a bar on a terminal.
    Raises :class:`DataError` (one line) on no network, HTTP errors and checksum mismatches."""
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download folder {dest}: {e.strerror or e}") from None
    show = sys.stderr.isatty() if progress is None else bool(progress)
    return [_fetch_one(f, dest, timeout, max(int(retries), 0), show, log) for f in files]


# ------------------------------------------------------------------------------------ one file


def _fetch_one(f: RemoteFile, dest: Path, timeout: float, retries: int, show: bool,
               log: Log) -> Path:  # fmt: skip
    final, part = dest / f.name, dest / f"{f.name}.part"
    if final.exists():
        sha, problem, label = _verify(f, final, dest)
        if problem is None:
            if not label:  # placed by hand, or the record was deleted: trust it from now on
                _record(dest, f.name, sha)
                label = (f"no checksum published; recorded its sha256 in {CHECKSUMS} "
                         "(trust on first use)")  # fmt: skip
            log(f"{f.name}: already present, {label}")
            part.unlink(missing_ok=True)
            if f.extract:
                _extract(f, final, dest, sha, log)
            return final
        os.replace(final, dest / f"{f.name}.corrupt")
        log(f"{f.name}: present but does not verify ({problem}); moved to {f.name}.corrupt, "
            "downloading it again")  # fmt: skip
    _download(f, part, dest, timeout, retries, show, log)
    sha, problem, label = _verify(f, part, dest)
    if problem is not None:
        corrupt = dest / f"{f.name}.corrupt"
        os.replace(part, corrupt)
        hint = "rerun to download it again"
        if not (f.sha256 or f.md5):
            hint = (f"if the source changed on purpose, delete the line for {f.name} in "
                    f"{dest / CHECKSUMS} and rerun")  # fmt: skip
        raise DataError(f"{f.url}: the download does not verify ({problem}); kept as {corrupt}; "
                        f"{hint}")  # fmt: skip
    if not label:
        _record(dest, f.name, sha)
        label = (f"no checksum published: recorded sha256 {sha} in {CHECKSUMS}; later runs verify "
                 "against it (trust on first use)")  # fmt: skip
    os.replace(part, final)  # the only way the final name ever appears
    log(f"{f.name}: {label}")
    if f.extract:
        _extract(f, final, dest, sha, log)
    return final


def _download(f: RemoteFile, part: Path, dest: Path, timeout: float, retries: int, show: bool,
              log: Log) -> None:  # fmt: skip
    _resolve(f, dest, timeout)
    bar = _Progress(f.name, show, log)
    best, failures, t0 = _size(part), 0, time.monotonic()
    try:
        while True:
            have = _size(part)
            if f.size is not None and have > f.size:  # longer than the file can be: start over
                part.unlink()
                have = 0
            if f.size is not None and have == f.size:
                break  # complete already: verification decides
            try:
                _attempt(f, part, have, dest, timeout, bar, log)
                break
            except _Retry as e:
                now = _size(part)
                if now > best:  # count only failures in a row that brought no new bytes
                    best, failures = now, 0
                failures += 1
                if failures > retries:
                    raise DataError(e.final) from None
                log(f"{f.name}: {e.why}; retry {failures}/{retries} from byte {now:,}")
                time.sleep(BACKOFF_S * failures)
    finally:
        bar.close()
    secs, got = time.monotonic() - t0, bar.received
    if got:
        mbs = got / 1e6 / max(secs, 1e-9)
        log(f"{f.name}: downloaded {got / 1e6:,.1f} MB in {secs:.1f} s ({mbs:.1f} MB/s)")
    else:
        log(f"{f.name}: {part.name} is complete already")


class _Retry(Exception):
    def __init__(self, why: str, final: str):
        super().__init__(why)
        self.why, self.final = why, final


def _attempt(f: RemoteFile, part: Path, have: int, dest: Path, timeout: float, bar: _Progress,
             log: Log) -> None:  # fmt: skip
    """One request: appends to (206) or rewrites (200) ``part``; raises _Retry when it breaks."""
    host = urlsplit(f.url).hostname or f.url
    resume = f"rerun to resume from {part}, or {_advice(f, dest)}"
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        req = urllib.request.Request(f.url, headers=headers)
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            if _range_total(e.headers.get("Content-Range")) == have:
                return  # nothing past the end of the part: it is whole
            part.unlink()
            raise _Retry("the server refused the resume range, starting over",
                         f"{host} keeps refusing to resume {f.url}; {_advice(f, dest)}") from None
        if e.code in _RETRY_STATUS:
            raise _Retry(f"HTTP {e.code} {e.reason}", f"HTTP {e.code} {e.reason} for {f.url} (host "
                         f"{host}), also after retries: the server is failing; try again later, or "
                         f"{_advice(f, dest)}") from None  # fmt: skip
        raise DataError(_http_message(f, dest, e.code, e.reason)) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, str):  # e.g. "no host given": the URL, not the network
            raise DataError(f"cannot download {f.url}: {_oneline(e.reason)}") from None
        reset = isinstance(e.reason, ConnectionError)
        if reset and not isinstance(e.reason, ConnectionRefusedError):  # reset while sending
            why = f"connection failed ({_oneline(e.reason)})"
            raise _Retry(why, _unreachable(f, dest, e.reason, timeout)) from None
        raise DataError(_unreachable(f, dest, e.reason, timeout)) from None
    except _TRANSIENT as e:  # connected, but no (valid) answer in time
        why = _reason(e, timeout)
        raise _Retry(f"no answer ({why})", f"{host} accepted the connection but gave no answer "
                     f"to {f.url} ({why}): the server is down or there appears to be no network "
                     f"access; {_advice(f, dest)}") from None  # fmt: skip
    except ValueError as e:
        raise DataError(f"cannot download {f.url}: {_oneline(e)}") from None
    with resp:
        start = _range_start(resp.headers.get("Content-Range")) if resp.status == 206 else 0
        if start not in (0, have):
            part.unlink()
            raise _Retry(f"the server answered another range (from byte {start}), starting over",
                         f"{host} keeps answering other ranges than asked for {f.url}; "
                         f"{_advice(f, dest)}")  # fmt: skip
        if have and start != have:
            log(f"{f.name}: the server does not resume (HTTP {resp.status}), starting over")
            have = 0
        length = resp.headers.get("Content-Length", "")
        expected = int(length) if length.isdigit() else None
        bar.begin(have, have + expected if expected is not None else f.size)
        got = 0
        try:
            with open(part, "ab" if have else "wb") as out:
                while True:
                    try:
                        chunk = resp.read1(CHUNK)  # what has arrived: read() would wait for all
                    except (*_TRANSIENT, OSError) as e:
                        why = f"connection broke off at byte {have + got:,} ({_reason(e, timeout)})"
                        raise _Retry(why, f"the download of {f.url}: {why}, also after retries; "
                                     f"{resume}") from None  # fmt: skip
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(have + got, len(chunk))
        except OSError as e:
            raise DataError(f"cannot write {part}: {e.strerror or e}") from None
    if expected is not None and got < expected:  # http.client returns b"" on an early close
        raise _Retry(f"connection closed at byte {have + got:,} of {have + expected:,}",
                     f"the download of {f.url} kept breaking off (last at byte {have + got:,} of "
                     f"{have + expected:,}); {resume}")  # fmt: skip


def _resolve(f: RemoteFile, dest: Path, timeout: float) -> None:
    """Look the host up in a thread under ``timeout``: getaddrinfo itself has none."""
    u = urlsplit(f.url)
    if u.scheme not in ("http", "https") or not u.hostname:
        return
    if u.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(u.hostname):
        return  # the proxy resolves it (and local DNS may well not)
    result: list[OSError | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(u.hostname, None, type=socket.SOCK_STREAM)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=lookup, daemon=True)  # left behind if the resolver hangs
    t.start()
    t.join(timeout)
    if not result:
        why = f"DNS lookup gave no answer within {timeout:g} s"
        raise DataError(_unreachable(f, dest, why, timeout))
    if result[0] is not None:
        raise DataError(_unreachable(f, dest, result[0], timeout))


# ------------------------------------------------------------------------------------ messages


def _advice(f: RemoteFile, dest: Path) -> str:
    return (f"download the file elsewhere and place it as {dest / f.name}, then rerun "
            "(files already present and verified are skipped)")  # fmt: skip


def _unreachable(f: RemoteFile, dest: Path, reason: object, timeout: float) -> str:
    host = urlsplit(f.url).hostname or f.url
    if isinstance(reason, ssl.SSLError):  # reachable, but TLS failed (clock, proxy, certificates)
        return f"TLS error talking to {host} for {f.url} ({_oneline(reason)}); {_advice(f, dest)}"
    return (f"cannot reach {host} to download {f.url} ({_reason(reason, timeout)}): there appears "
            f"to be no network access; {_advice(f, dest)}")  # fmt: skip


def _reason(e: object, timeout: float) -> str:
    if isinstance(e, socket.gaierror):
        return f"DNS lookup failed: {e.strerror or e}"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(e, OSError) and e.errno in _NO_ROUTE:
        return e.strerror or "unreachable"
    return _oneline(e) or type(e).__name__


def _http_message(f: RemoteFile, dest: Path, code: int, reason: str) -> str:
    head = f"HTTP {code} {reason} for {f.url} (host {urlsplit(f.url).hostname})"
    if code in (401, 403):
        return (f"{head}: the source may need a login or accepting its terms (e.g. Kaggle); "
                f"{_advice(f, dest)}")  # fmt: skip
    if code == 404:
        return f"{head}: the file is not there (it may have moved); {_advice(f, dest)}"
    return f"{head}; {_advice(f, dest)}"


def _oneline(e: object) -> str:
    return " ".join(str(e).split())


# ---------------------------------------------------------------------------- verification


def _verify(f: RemoteFile, path: Path, dest: Path) -> tuple[str, str | None, str]:
    """(sha256, problem or None, what was checked -- "" when nothing is known to check against)."""
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        return "", f"size mismatch: expected {f.size:,} bytes, got {size:,}", ""
    sha_h = hashlib.sha256()
    md5_h = hashlib.md5(usedforsecurity=False) if f.md5 else None
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            sha_h.update(chunk)
            if md5_h is not None:
                md5_h.update(chunk)
    sha, checked = sha_h.hexdigest(), []
    if md5_h is not None:
        if md5_h.hexdigest() != f.md5.lower():
            return sha, f"md5 mismatch: expected {f.md5.lower()}, got {md5_h.hexdigest()}", ""
        checked.append("md5")
    want, where = f.sha256, ""
    if not (f.sha256 or f.md5):
        want = _read_records(dest).get(f.name)
        where = f" (recorded in {dest / CHECKSUMS} on first use)"
    if want:
        if sha != want.lower():
            return sha, f"sha256 mismatch: expected {want.lower()}{where}, got {sha}", ""
        checked.append("sha256")
    return sha, None, " and ".join(checked) + " ok" if checked else ""


def _read_records(dest: Path) -> dict[str, str]:
    p, out = dest / CHECKSUMS, {}
    if p.exists():
        for line in p.read_text().splitlines():
            digest, _, name = line.strip().partition(" ")
            name = name.strip().removeprefix("*")  # sha256sum writes "*name" in binary mode
            if _is_hex(digest) and name:
                out[name] = digest.lower()
    return out


def _record(dest: Path, name: str, sha: str) -> None:
    records = {**_read_records(dest), name: sha}
    tmp = dest / f".{CHECKSUMS}.tmp"
    tmp.write_text("".join(f"{h}  {n}\n" for n, h in sorted(records.items())))
    os.replace(tmp, dest / CHECKSUMS)


def _is_hex(s: str) -> bool:
    return bool(s) and all(c in "0123456789abcdefABCDEF" for c in s)


def _size(p: Path) -> int:
    return p.stat().st_size if p.exists() else 0


def _range_start(header: str | None) -> int | None:  # "bytes 100-199/200" -> 100
    try:
        return int(header.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _range_total(header: str | None) -> int | None:  # "bytes */200" -> 200
    try:
        return int(header.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


# ------------------------------------------------------------------------------ extraction


def _archive_kind(name: str) -> str | None:
    n = name.lower()
    if n.endswith(".zip"):
        return "zip"
    if n.endswith(_TAR_SUFFIXES):
        return "tar"
    return "gz" if n.endswith(".gz") and len(n) > 3 else None


def _extract(f: RemoteFile, archive: Path, dest: Path, sha: str, log: Log) -> None:
    stamp = dest / f"{f.name}.extracted"
    if stamp.exists() and stamp.read_text().split()[:1] == [sha]:
        log(f"{f.name}: already extracted ({stamp.name})")
        return
    log(f"{f.name}: extracting into {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{f.name}.extracting-", dir=dest))
    try:
        kind = _archive_kind(f.name)
        try:
            if kind == "zip":
                with zipfile.ZipFile(archive) as zf:
                    for info in zf.infolist():  # every name is checked before anything is written
                        _check_member(archive, info.filename, dest)
                    zf.extractall(tmp)
            elif kind == "tar":
                _untar(archive, tmp, dest)
            else:
                with gzip.open(archive, "rb") as src, open(tmp / f.name[:-3], "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except _FILTER_ERROR as e:
            raise DataError(f"refusing to extract {archive}: {_oneline(e)}") from None
        except (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile,
                tarfile.TarError) as e:  # fmt: skip
            raise DataError(f"cannot extract {archive} ({_oneline(e)}); delete it and rerun to "
                            "download it again") from None  # fmt: skip
        entries = sorted(p.name for p in tmp.iterdir())
        keep = {f.name, CHECKSUMS, stamp.name, f"{f.name}.part", f"{f.name}.corrupt"}
        if clash := keep.intersection(entries):
            raise DataError(f"refusing to extract {archive}: it would overwrite {sorted(clash)}")
        _merge(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp.write_text(f"{sha}  {f.name}\n" + "".join(f"{n}\n" for n in entries))
    log(f"{f.name}: extracted {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}")


def _check_member(archive: Path, name: str, dest: Path) -> None:
    n = name.replace("\\", "/")
    if n.startswith("/") or (len(n) > 1 and n[1] == ":") or ".." in n.split("/"):
        raise DataError(f"refusing to extract {archive}: member {name!r} would be written "
                        f"outside {dest} (absolute path or '..'); the archive is broken or "
                        "malicious")  # fmt: skip


def _untar(archive: Path, tmp: Path, dest: Path) -> None:
    has_filter = hasattr(tarfile, "data_filter")  # Python 3.11.4+ / 3.10.12+

    with tarfile.open(archive, "r:*") as tf:

        def members():  # checked one by one as the (possibly huge) archive streams past once
            for m in tf:
                _check_member(archive, m.name, dest)
                if not has_filter and not (m.isfile() or m.isdir()):
                    raise DataError(f"refusing to extract {archive}: member {m.name!r} is a "
                                    "link or device (this Python has no tarfile data filter)")
                yield m

        if has_filter:
            tf.extractall(tmp, members=members(), filter="data")
        else:  # pragma: no cover - old Pythons
            tf.extractall(tmp, members=members())


def _merge(src: Path, dst: Path) -> None:
    """Move src's entries into dst, merging into existing folders, replacing files."""
    for p in src.iterdir():
        t = dst / p.name
        p_dir, t_dir = p.is_dir() and not p.is_symlink(), t.is_dir() and not t.is_symlink()
        if p_dir and t_dir:
            _merge(p, t)
            continue
        if t_dir:
            shutil.rmtree(t)
        elif p_dir and (t.exists() or t.is_symlink()):
            t.unlink()
        os.replace(p, t)


# -------------------------------------------------------------------------------- progress


class _Progress:
    """A rich bar (bytes, MB/s, ETA) on a terminal, else a log line at most every ~10%."""

    def __init__(self, name: str, enabled: bool, log: Log):
        self.name, self.enabled, self.log = name, enabled, log
        self.total: int | None = None
        self._bar = self._task = None
        self._t0 = self._last = time.monotonic()
        self._d0, self._next = 0, 0.1
        self.received = 0  # bytes over the wire, all attempts together

    def begin(self, done: int, total: int | None) -> None:  # once per attempt
        self.total, self._d0 = total, done
        self._t0 = self._last = time.monotonic()
        self._next = (int(done * 10 / total) + 1) / 10 if total else 0.1
        if not self.enabled:
            return
        if self._bar is None:
            from rich import progress as rp
            from rich.console import Console

            self._bar = rp.Progress(
                rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=Console(stderr=True),
                transient=True)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.name, total=total, completed=done)
        else:
            self._bar.reset(self._task, total=total, completed=done)

    def update(self, done: int, received: int) -> None:
        self.received += received
        if self._bar is not None:
            self._bar.update(self._task, completed=done)
            return
        now = time.monotonic()
        rate = (done - self._d0) / 1e6 / max(now - self._t0, 1e-9)
        if self.total:
            frac = done / self.total
            if self._next <= frac < 1:
                mb, total = done / 1e6, self.total / 1e6
                self.log(f"{self.name}: {frac:.0%} ({mb:,.1f} of {total:,.1f} MB, {rate:.1f} MB/s)")
                self._next = (int(frac * 10) + 1) / 10
        elif now - self._last >= 10:
            self.log(f"{self.name}: {done / 1e6:,.1f} MB so far ({rate:.1f} MB/s)")
            self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()  # also on errors: rich leaves the cursor hidden otherwise
            self._bar = None
