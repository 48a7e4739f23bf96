"""Out-of-core training data: a split as ``.npy`` shards on disk, streamed in bounded memory.

Layout of a shard directory::

    index.json                 rows, rows per shard, arrays (dtype, trailing shape), source
                               fingerprint, each file's checksum (dpn_jax.data.integrity)
    cat/00000.npy, cat/00001.npy, ...
    label/00000.npy, ...
    seq/<field>/00000.npy, ...

Write one with :func:`write_shards` (or :class:`ShardWriter` chunk by chunk, for data that never
fits in memory), open it with :class:`ShardedSplit`, or let :func:`shard_split` do both (it
rewrites the shards when the source data changed, or when a shard file fails its check). A
:class:`ShardedSplit` stands in for ``Dataset.train``: ``fit`` calls its
:meth:`~ShardedSplit.batches`. Opening one checks every shard file's size, header and a
sampled checksum (a few blocks a file).

Epoch order (shuffle=True), a deterministic function of ``(seed, epoch)`` and the window size:
``rng = default_rng((seed, epoch))``; the shards are visited in the order
``rng.permutation(n_shards)``, ``k`` at a time (a window; ``k`` is the most that fits
``memory_budget_mb``, see :meth:`ShardedSplit.window_shards`); the rows of a window plus the
fewer-than-``batch_size`` rows left over from the previous window are permuted by
``rng.permutation`` and cut into batches; the last leftover is the epoch's last (short) batch.
Every row comes exactly once per epoch. With ``k`` equal to the number of shards this is a full
shuffle (though not the same permutation as the in-memory ``dpn_jax.data.batches``);
with ``shuffle=False`` the batches are exactly the in-memory ones (rows in order).
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.data import integrity
from dpn_jax.data.schema import Split, split_len
from dpn_jax.errors import ConfigError, DataError

INDEX = "index.json"
VERSION = 2  # 2: per-file checksums
SAMPLE_BLOCKS = 4  # blocks of each shard file hashed when the shards are opened
DEFAULT_ROWS_PER_SHARD = 65536
DEFAULT_BUDGET_MB = 512
BATCH_COPIES = 2  # a prefetched batch may exist twice: as numpy and as its device copy (CPU)


def _shard_path(directory: Path, key: str, shard: int) -> Path:
    return directory / key / f"{shard:05d}.npy"  # "seq/<name>" -> a seq/<name>/ directory


def fingerprint(split: Split) -> str:
    """Keys, shapes, dtypes and a sample of rows: tells a stale shard directory from a current one
    without reading all the data (a change that misses every sampled row goes unnoticed)."""
    h = hashlib.sha256()
    n = split_len(split)
    sample = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 257)).astype(np.int64)) if n else []
    for key in sorted(split):
        v = split[key]
        h.update(f"{key}:{v.dtype.str}:{tuple(v.shape)}\n".encode())
        for i in sample:
            h.update(np.ascontiguousarray(v[int(i)]).tobytes())
    return h.hexdigest()[:20]


class ShardWriter:
    """Append chunks of rows (dicts of arrays with the same keys); every ``rows_per_shard`` rows
    become one ``.npy`` per array; :meth:`close` writes ``index.json`` (last: it marks a complete
    directory). Holds at most one shard plus one chunk in memory."""

    def __init__(self, directory: str | Path, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                 source: str | None = None):
        if rows_per_shard < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.directory = Path(directory)
        if (self.directory / INDEX).exists():
            raise DataError(f"{self.directory} already holds shards ({INDEX}); remove it or write elsewhere")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard, self.source = rows_per_shard, source
        self._buf: list[dict[str, np.ndarray]] = []
        self._buffered = 0
        self._shards: list[int] = []
        self._arrays: dict[str, dict] | None = None
        self._checksums: dict[str, dict] = {}

    def append(self, chunk: Mapping[str, np.ndarray]) -> None:
        chunk = {k: np.asarray(v) for k, v in chunk.items()}
        meta = {k: {"dtype": v.dtype.str, "shape": list(v.shape[1:])} for k, v in chunk.items()}
        if self._arrays is None:
            self._arrays = meta
        elif meta != self._arrays:
            raise DataError(f"chunk arrays {meta} differ from the first chunk's {self._arrays}")
        rows = {int(v.shape[0]) for v in chunk.values()}
        if len(rows) != 1:
            raise DataError(f"chunk arrays have different row counts {sorted(rows)}")
        self._buf.append(chunk)
        self._buffered += rows.pop()
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        joined = {k: np.concatenate([c[k] for c in self._buf]) for k in self._buf[0]}
        shard = len(self._shards)
        for k, v in joined.items():
            path = _shard_path(self.directory, k, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            rel = path.relative_to(self.directory).as_posix()
            self._checksums[rel] = integrity.save_npy(path, v[:rows], blocks=SAMPLE_BLOCKS)
        self._shards.append(rows)
        rest = {k: v[rows:] for k, v in joined.items()}
        self._buffered -= rows
        self._buf = [rest] if self._buffered else []

    def close(self) -> Path:
        if self._buffered:
            self._flush(self._buffered)
        if self._arrays is None:
            raise DataError("no rows were written: append at least one chunk")
        index = {"version": VERSION, "rows": sum(self._shards), "rows_per_shard": self.rows_per_shard,
                 "shards": self._shards, "arrays": self._arrays, "source": self.source,
                 "checksums": self._checksums}
        (self.directory / INDEX).write_text(json.dumps(index), encoding="utf-8")
        return self.directory


def write_shards(split: Split, directory: str | Path, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> Path:
    """Write ``split`` (arrays or memory maps) as shards, ``rows_per_shard`` rows at a time."""
    writer = ShardWriter(directory, rows_per_shard, source=fingerprint(split))
    n = split_len(split)
    for start in range(0, n, rows_per_shard):
        writer.append({k: np.asarray(v[start:start + rows_per_shard]) for k, v in split.items()})
    return writer.close()


def shard_split(split: Split, directory: str | Path, *, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
                memory_budget_mb: float = DEFAULT_BUDGET_MB) -> ShardedSplit:
    """Open the shards of ``split`` in ``directory``, writing them first when missing or stale."""
    d = Path(directory)
    if (d / INDEX).is_file():
        try:
            index = json.loads((d / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        if index.get("version") == VERSION and index.get("source") == fingerprint(split) \
                and index.get("rows_per_shard") == rows_per_shard:
            try:
                return ShardedSplit(d, memory_budget_mb=memory_budget_mb)
            except DataError as e:  # a damaged shard: write them again
                warnings.warn(f"rewriting the shards in {d}: {e}", stacklevel=2)
        shutil.rmtree(d)  # our own stale shards (it holds our index): rewrite them
    elif d.exists() and any(d.iterdir()):
        raise ConfigError(f"--out-of-core {d}: the directory holds files but no {INDEX}; "
                          "give an empty or new directory for the shards")
    write_shards(split, d, rows_per_shard)
    return ShardedSplit(d, memory_budget_mb=memory_budget_mb)


def _read_into(path: Path, out: np.ndarray) -> None:
    """Read a whole ``.npy`` straight into ``out`` (no temporary copy, no memory map)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        if fortran or dtype != out.dtype or tuple(shape) != out.shape:
            raise DataError(f"{path}: shard holds {dtype}{tuple(shape)}, index says {out.dtype}{out.shape}")
        if fh.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise DataError(f"{path} is truncated: rewrite the shards")


class Column:
    """One array of a :class:`ShardedSplit`: ``shape``, ``dtype`` and contiguous row slices."""

    def __init__(self, owner: ShardedSplit, key: str):
        self._owner, self.key = owner, key
        meta = owner.index["arrays"][key]
        self.dtype = np.dtype(meta["dtype"])
        self.shape = (owner.rows, *meta["shape"])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("a sharded column reads contiguous row slices only, like col[a:b]")
        start, stop, _ = item.indices(self.shape[0])
        parts = []
        for s, (lo, hi) in enumerate(self._owner.bounds):
            if hi > start and lo < stop:
                mm = np.load(_shard_path(self._owner.directory, self.key, s), mmap_mode="r")
                parts.append(np.array(mm[max(start, lo) - lo: min(stop, hi) - lo]))
                del mm  # unmap: the read pages leave this process
        if not parts:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.concatenate(parts)


class _Raised:
    def __init__(self, err: BaseException):
        self.err = err


class ShardedSplit(Mapping):
    """A split on disk (see :class:`ShardWriter`); a read-only mapping ``key -> Column``, so
    ``split_len`` and ``split[key][a:b]`` work, and :meth:`batches` streams epochs.

    ``memory_budget_mb`` bounds what :meth:`batches` holds: the shuffle window plus the prefetched
    batches (:meth:`memory_needed`). The model, optimiser and XLA's buffers come on top."""

    def __init__(self, directory: str | Path, memory_budget_mb: float = DEFAULT_BUDGET_MB, prefetch: int = 2):
        self.directory = Path(directory)
        try:
            self.index = json.loads((self.directory / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.directory} holds no {INDEX}: write shards there with write_shards") from None
        if self.index.get("version") != VERSION:
            raise DataError(f"{self.directory}: shard format {self.index.get('version')} != {VERSION}; rewrite them")
        sums = self.index.get("checksums", {})
        for s in range(len(self.index["shards"])):
            for key in self.index["arrays"]:
                path = _shard_path(self.directory, key, s)
                problem = integrity.quick_problem(path, sums.get(path.relative_to(self.directory).as_posix()))
                if problem is not None:
                    raise DataError(f"{path}: {problem}; rewrite the shards")
        self.rows = int(self.index["rows"])
        ends = np.cumsum(self.index["shards"]).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))
        self.memory_budget_mb, self.prefetch = memory_budget_mb, prefetch
        self._columns = {k: Column(self, k) for k in self.index["arrays"]}

    def __getitem__(self, key: str) -> Column:
        return self._columns[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)

    @property
    def row_bytes(self) -> int:
        return sum(c.dtype.itemsize * int(np.prod(c.shape[1:])) for c in self._columns.values())

    def memory_needed(self, batch_size: int, window_shards: int) -> int:
        """Bytes :meth:`batches` holds at most: the window buffer (leftover + ``k`` shards) and its
        int64 permutation, the leftover's copy, and the batches in flight (one being built, the
        queue, the one the train step reads and the one it may still be running on)."""
        window = batch_size + window_shards * int(self.index["rows_per_shard"])
        in_flight = (self.prefetch + 3) * BATCH_COPIES
        return window * (self.row_bytes + 8) + batch_size * self.row_bytes \
            + in_flight * batch_size * self.row_bytes

    def window_shards(self, batch_size: int) -> int:
        """The most shards a shuffle window may hold within ``memory_budget_mb``."""
        budget = self.memory_budget_mb * 2**20
        n = len(self.bounds)
        k = 1
        while k < n and self.memory_needed(batch_size, k + 1) <= budget:
            k += 1
        if self.memory_needed(batch_size, 1) > budget:
            need = self.memory_needed(batch_size, 1) / 2**20
            raise ConfigError(
                f"memory_budget_mb={self.memory_budget_mb:g} is too small for batch_size {batch_size} and "
                f"{self.index['rows_per_shard']} rows per shard ({self.row_bytes} bytes a row): streaming "
                f"needs at least {need:.1f} MB; raise the budget (--memory-budget-mb), or write the shards "
                "with fewer rows_per_shard")
        return k

    def _epoch(self, batch_size: int, shuffle: bool, seed: int, epoch: int, drop_last: bool,
               start_batch: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches of one epoch as numpy (see the module docstring for the order)."""
        rng = np.random.default_rng((seed, epoch))
        n_shards = len(self.bounds)
        order = rng.permutation(n_shards) if shuffle else np.arange(n_shards)
        k = self.window_shards(batch_size)
        cap = batch_size + k * int(self.index["rows_per_shard"])
        buf = {key: np.empty((cap, *c.shape[1:]), c.dtype) for key, c in self._columns.items()}
        fill, b = 0, 0  # rows held at the front of buf; batches cut so far
        for w in range(0, n_shards, k):
            for s in order[w:w + k]:
                lo, hi = self.bounds[s]
                for key, arr in buf.items():
                    _read_into(_shard_path(self.directory, key, int(s)), arr[fill:fill + hi - lo])
                fill += hi - lo
            perm = rng.permutation(fill) if shuffle else np.arange(fill)
            full = fill - fill % batch_size
            for start in range(0, full, batch_size):
                if b >= start_batch:  # skipped batches (a resumed epoch) are never gathered
                    idx = perm[start:start + batch_size]
                    yield {key: arr[idx] for key, arr in buf.items()}
                b += 1
            rest = perm[full:]
            for arr in buf.values():  # the leftover moves to the front of the next window
                arr[:len(rest)] = arr[rest]
            fill = len(rest)
            del perm, rest
        if fill and not drop_last and b >= start_batch:
            yield {key: arr[:fill].copy() for key, arr in buf.items()}

    def batches(self, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool = False,
                start_batch: int = 0, place: Callable[[dict], Any] | None = None) -> Iterator[Any]:
        """Like ``dpn_jax.data.batches``: every row once per epoch, the same batches for the same
        ``(seed, epoch)`` and budget. A background thread reads ahead and applies ``place``
        (e.g. ``jax.device_put``) to each batch, keeping at most ``prefetch`` ready."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.window_shards(batch_size)  # a too-small budget fails here, not in the thread
        return _prefetch(self._epoch(batch_size, shuffle, seed, epoch, drop_last, start_batch),
                         place, self.prefetch)


def _prefetch(items: Iterable, place: Callable | None, depth: int) -> Iterator:
    """``items`` (mapped by ``place``) produced by a daemon thread into a queue of ``depth``;
    errors re-raise in the consumer; closing the generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        it = iter(items)
        try:
            for item in it:
                if not put(place(item) if place is not None else item):
                    return
            put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(_Raised(err))
        finally:
            getattr(it, "close", lambda: None)()

    thread = threading.Thread(target=work, name="dpn-prefetch", daemon=True)

    def consume() -> Iterator:
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, _Raised):
                    raise item.err
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    return consume()
