"""The encoded-split cache and the out-of-core shards check what they read back: a damaged file
(flipped bytes of the same size, a changed header, an id outside its field's block) is found on
load, named in a warning and re-encoded; ``dpn-jax data verify`` hashes every byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dpn_jax.cli import main
from dpn_jax.data import cache, load_dataset
from dpn_jax.data import out_of_core as ooc
from dpn_jax.data import tabular_builtins as tb
from dpn_jax.errors import DataError


def _spec(tmp_path: Path, n: int = 400) -> Path:
    rng = np.random.default_rng(0)
    rows = ["y,user,item,price"]
    for i in range(n):
        rows.append(f"{i % 2},u{rng.integers(0, 30)},i{rng.integers(0, 50)},{rng.normal():.4f}")
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    spec = tmp_path / "toy.yaml"
    spec.write_text("format: csv\ntrain: d.csv\nlabel: y\nfields:\n"
                    "  - {name: user, type: categorical}\n  - {name: item, type: categorical}\n"
                    "  - {name: price, type: numeric}\n")  # fmt: skip
    return spec


def _load(spec: Path, tmp_path: Path):
    return load_dataset(str(spec), cache_dir=tmp_path / "cache")


def _data_offset(path: Path) -> int:
    """Where a .npy file's array bytes start (after its header)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(fh)
        return fh.tell()


def _patch(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes in place: same size, same mtime order as a real bit flip."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_flipped_labels_are_found_named_and_reencoded(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    first = _load(spec, tmp_path)
    want = np.array(first.train["label"])
    path = Path(first.meta["cache"]["dir"]) / "train" / "label.npy"
    del first
    off = _data_offset(path)
    flipped = (1.0 - want).astype(np.float32).tobytes()  # every label flipped: same size
    _patch(path, off, flipped)
    with pytest.warns(UserWarning, match=r"train/label\.npy: content differs"):
        again = _load(spec, tmp_path)
    assert again.meta["cache"]["hit"] is False  # re-encoded ...
    np.testing.assert_array_equal(np.asarray(again.train["label"]), want)  # ... to the right labels
    assert _load(spec, tmp_path).meta["cache"]["hit"] is True  # and the new cache is sound


def test_out_of_range_id_and_changed_dtype_are_reencoded(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    ds = _load(spec, tmp_path)
    cat = np.array(ds.train["cat"])
    d = Path(ds.meta["cache"]["dir"])
    del ds
    _patch(d / "train" / "cat.npy", _data_offset(d / "train" / "cat.npy"), np.int32(10**6).tobytes())
    with pytest.warns(UserWarning, match=r"train/cat\.npy"):
        ds = _load(spec, tmp_path)
    np.testing.assert_array_equal(np.asarray(ds.train["cat"]), cat)
    del ds
    # a dtype changed in the header (same header length, so the same file size): '<i4' -> '<f4'
    head = (d / "valid" / "cat.npy").read_bytes()[:_data_offset(d / "valid" / "cat.npy")]
    assert b"'<i4'" in head
    _patch(d / "valid" / "cat.npy", head.index(b"'<i4'"), b"'<f4'")
    with pytest.warns(UserWarning, match=r"valid/cat\.npy: header declares float32 .* but int32"):
        ds = _load(spec, tmp_path)
    assert ds.valid["cat"].dtype == np.int32


def test_ids_outside_their_block_name_field_and_file(tmp_path: Path) -> None:
    """A writer that put an id outside its field's block (checksums then match the bad bytes):
    load refuses it, naming the field and the file."""
    ds = _load(_spec(tmp_path), tmp_path)
    item = ds.schema.field("item")
    train = {k: np.array(v) for k, v in ds.train.items()}
    train["cat"][7, item.column] = item.offset + item.vocab_size  # one past the block
    bad = type(ds)(ds.name, ds.schema, train, ds.valid, ds.test, {})
    d = cache.save(bad, tmp_path / "written")
    with pytest.raises(DataError, match=rf"written/train/cat\.npy: field 'item' holds id "
                                        rf"{item.offset + item.vocab_size} at row 8; its ids are "
                                        rf"{item.offset}\.\.{item.offset + item.vocab_size - 1}"):
        cache.load(d)
    train["label"][3] = 2.0
    train["cat"][7, item.column] = item.offset
    d = cache.save(type(ds)(ds.name, ds.schema, train, ds.valid, ds.test, {}), tmp_path / "w2")
    with pytest.raises(DataError, match=r"w2/train/label\.npy: label 2\.0 at row 4"):
        cache.load(d)


def test_cache_without_checksums_is_reencoded(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    d = Path(_load(spec, tmp_path).meta["cache"]["dir"])
    meta = json.loads((d / "meta.json").read_text())
    del meta["checksums"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no checksum was recorded"):
        assert _load(spec, tmp_path).meta["cache"]["hit"] is False
    assert "checksums" in json.loads((d / "meta.json").read_text())


def test_large_files_are_sampled_on_load_and_hashed_whole_by_verify(tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:  # fmt: skip
    """With blocks of 16 bytes a file of a few KiB stands for a multi-GB one: load reads only the
    sampled blocks (a byte between them passes), ``data verify`` hashes all and re-encodes."""
    from dpn_jax.data import integrity

    monkeypatch.setattr(integrity, "BLOCK", 16)
    spec = _spec(tmp_path, n=3000)
    args = ["data", "verify", "--data", str(spec), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert "ok:" in capsys.readouterr().out
    d = Path(_load(spec, tmp_path).meta["cache"]["dir"])
    path = d / "train" / "num.npy"
    size = path.stat().st_size
    assert size > 64 * 16
    sampled = {o + k for o in np.linspace(0, size - 16, 64).astype(np.int64).tolist() for k in range(16)}
    gap = next(o for o in range(_data_offset(path), size) if o not in sampled)
    original = path.read_bytes()
    _patch(path, gap, bytes([original[gap] ^ 0xFF]))
    assert cache.problems(d) == []  # the sampled check on load misses it ...
    full = cache.problems(d, full=True)
    assert len(full) == 1 and "train/num.npy: content differs" in full[0]  # ... every byte does not
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "damaged:" in out and "train/num.npy" in out and "re-encoded:" in out
    assert path.read_bytes() == original and main(args) == 0
    capsys.readouterr()
    # a byte in a sampled block is found on load
    _patch(path, size - 1, bytes([original[-1] ^ 0xFF]))
    assert "sampled checksum mismatch" in cache.problems(d)[0]
    # without --data: every cache in the directory; a damaged one is removed
    assert main(["data", "verify", "--cache-dir", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "damaged:" in out and f"removed {d}" in out and not d.exists()
    assert main(["data", "verify", "--cache-dir", str(tmp_path / "cache")]) == 0


def _frappe_x1(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    (d / "Frappe_x1").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        lines = ["label," + ",".join(tb.FRAPPE_X1)]
        lines += [f"{i % 2}," + ",".join(f"{c}{(i * 7 + k) % 5}" for k, c in enumerate(tb.FRAPPE_X1))
                  for i in range(30)]  # fmt: skip
        (d / "Frappe_x1" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return d


def test_streamed_builtin_cache_is_checked_and_reencoded(tmp_path: Path) -> None:
    d = _frappe_x1(tmp_path)
    ds = load_dataset("frappe_x1", data_dir=d, cache_dir=tmp_path / "c", progress=False)
    want = np.array(ds.test["label"])
    path = Path(ds.meta["cache"]["dir"]) / "test" / "label.npy"
    assert "checksums" in json.loads((path.parents[1] / "meta.json").read_text())
    del ds
    _patch(path, _data_offset(path), np.float32(1 - want[0]).tobytes())
    with pytest.warns(UserWarning, match=r"test/label\.npy: content differs"):
        ds = load_dataset("frappe_x1", data_dir=d, cache_dir=tmp_path / "c", progress=False)
    assert ds.meta["cache"]["hit"] is False
    np.testing.assert_array_equal(np.asarray(ds.test["label"]), want)


def test_damaged_shards_are_named_and_rewritten(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    split = {"cat": rng.integers(0, 9, (300, 3)).astype(np.int32),
             "label": (rng.random(300) < 0.5).astype(np.float32)}  # fmt: skip
    d = tmp_path / "shards"
    ooc.shard_split(split, d, rows_per_shard=100)
    shard = d / "label" / "00001.npy"
    _patch(shard, _data_offset(shard), np.float32(1 - split["label"][100]).tobytes())
    with pytest.raises(DataError, match=r"label/00001\.npy: content differs .*rewrite the shards"):
        ooc.ShardedSplit(d)
    with pytest.warns(UserWarning, match=r"rewriting the shards .*label/00001\.npy"):
        opened = ooc.shard_split(split, d, rows_per_shard=100)
    np.testing.assert_array_equal(opened["label"][0:300], split["label"])
