"""Encoding (fit on train only), caching, dispatch and batching."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpn_jax.data import (
    DatasetSpec,
    FieldSpec,
    FittedEncoders,
    batches,
    cache,
    fit_encoders,
    load_dataset,
    load_spec,
    padded_batches,
    readers,
)
from dpn_jax.data.encode import carve, columns_needed
from dpn_jax.data.schema import FIRST, OOV, PAD, split_len
from dpn_jax.errors import DataError


def mem_spec(*fields: FieldSpec) -> DatasetSpec:
    """A spec for in-memory tests (fit_encoders only looks at fields and label)."""
    return DatasetSpec(name="t", format="csv", label="y", fields=fields, train=())


def cat(name: str, **kw) -> FieldSpec:
    return FieldSpec(name=name, type="categorical", column=kw.pop("column", name), **kw)


def seq(name: str, max_len: int, **kw) -> FieldSpec:
    return FieldSpec(name=name, type="sequence", column=name, sep="|", max_len=max_len, **kw)


def obj(*values) -> np.ndarray:
    return np.array(values, dtype=object)


# ----------------------------------------------------------------------------- categorical


def test_vocab_order_min_count_missing_and_oov() -> None:
    enc = fit_encoders(
        mem_spec(cat("u", min_count=2)), {"u": obj("b", "a", "b", "c", "a", "b", None, None)}
    )
    assert enc.field("u").vocab == ["b", "", "a"]  # freq desc, ties by string; missing is ""
    info = enc.schema.field("u")
    assert info.vocab_size == FIRST + 3 and enc.schema.table_size == 5
    split, counts = enc.transform_with_counts(
        {"u": obj("a", "b", "c", "zzz", None), "y": [1, 0, 1, 0, 1]}
    )
    # "c" was seen once (< min_count) and "zzz" never: both OOV and counted
    np.testing.assert_array_equal(split["cat"][:, 0], [FIRST + 2, FIRST, OOV, OOV, FIRST + 1])
    assert counts == {"u": 2}
    assert split["cat"].dtype == np.int32 and split["label"].dtype == np.float32


def test_transform_missing_column() -> None:
    enc = fit_encoders(mem_spec(cat("u")), {"u": obj("a")})
    with pytest.raises(DataError, match="column 'u' needed by field 'u' is missing"):
        enc.transform({"v": obj("a")})


# ----------------------------------------------------------------------------- numeric


def test_bucket_edges_and_ids() -> None:
    spec = mem_spec(FieldSpec("age", "numeric", "age", buckets=4))
    x = np.array([1, 2, 3, 4, 5, 6, 7, 8, np.nan], dtype=float)
    enc = fit_encoders(spec, {"age": x})
    edges = np.unique(np.quantile(x[:-1], np.linspace(0, 1, 5)))
    np.testing.assert_allclose(enc.field("age").edges, edges)
    assert enc.schema.field("age").kind == "cat" and enc.schema.field("age").vocab_size == FIRST + 4
    out, counts = enc.transform_with_counts(
        {"age": np.array([0.0, 1.0, 4.0, 4.5, 8.0, 100.0, np.nan])}
    )
    np.testing.assert_array_equal(out["cat"][:, 0], [2, 2, 3, 4, 5, 5, OOV])
    assert counts == {"age": 1}
    # constant column: one bucket
    enc = fit_encoders(spec, {"age": np.ones(5)})
    assert enc.schema.field("age").vocab_size == FIRST + 1


def test_standardisation() -> None:
    spec = mem_spec(FieldSpec("p", "numeric", "p"), FieldSpec("c", "numeric", "c"))
    enc = fit_encoders(spec, {"p": np.array([1.0, 3.0, np.nan]), "c": np.array([2.0, 2.0, 2.0])})
    assert (enc.field("p").mean, enc.field("p").std) == (2.0, 1.0)
    assert enc.field("c").std == 1.0  # std 0 -> 1
    out = enc.transform({"p": np.array([5.0, np.nan]), "c": obj("4", "")})
    np.testing.assert_allclose(out["num"], [[3.0, 2.0], [0.0, 0.0]])  # missing -> 0 (the mean)
    assert out["num"].dtype == np.float32


# ----------------------------------------------------------------------------- sequences


def test_sequence_padding_truncation_and_shared_vocab() -> None:
    spec = mem_spec(cat("item"), cat("user"), seq("hist", 3, share_vocab="item"), seq("tags", 2))
    train = {
        "item": obj("x", "y", "x"),
        "user": obj("u1", "u2", "u1"),
        "hist": obj("y|x", "", None),
        "tags": obj("a|b|a", "c", "a"),
    }
    enc = fit_encoders(spec, train)
    s = enc.schema
    item, user, hist, tags = (s.field(n) for n in ("item", "user", "hist", "tags"))
    assert s.field_names == ("item", "user", "hist", "tags")
    # shared: same block as the target; own vocab: after all categorical blocks
    assert (hist.offset, hist.vocab_size, hist.share_vocab) == (
        item.offset,
        item.vocab_size,
        "item",
    )
    assert tags.offset == user.offset + user.vocab_size
    assert enc.field("tags").vocab == ["a", "b", "c"]
    assert s.table_size == item.vocab_size + user.vocab_size + tags.vocab_size
    out, counts = enc.transform_with_counts(
        {
            "item": obj("x"),
            "user": obj("u1"),
            "hist": obj("q|x|y|x"),  # 4 tokens, max_len 3: the most recent (last) 3 are kept
            "tags": obj(""),
        }
    )
    x, y = item.offset + FIRST, item.offset + FIRST + 1
    np.testing.assert_array_equal(out["seq/hist"], [[x, y, x]])
    np.testing.assert_array_equal(out["seq/tags"], [[tags.pad_id, tags.pad_id]])  # empty -> padding
    out, counts = enc.transform_with_counts(
        {
            "item": obj("x", "x"),
            "user": obj("u1", "u1"),
            "hist": obj("zz|x", "y"),
            "tags": obj("a|zz", "b"),
        }
    )
    np.testing.assert_array_equal(
        out["seq/hist"], [[item.oov_id, x, item.pad_id], [y, item.pad_id, item.pad_id]]
    )
    np.testing.assert_array_equal(
        out["seq/tags"],
        [[tags.offset + FIRST, tags.oov_id], [tags.offset + FIRST + 1, tags.pad_id]],
    )
    assert counts["hist"] == 1 and counts["tags"] == 1
    assert out["seq/hist"].dtype == np.int32 and PAD == 0


def test_encoders_json_round_trip() -> None:
    spec = mem_spec(
        cat("u"),
        FieldSpec("a", "numeric", "a", buckets=3),
        FieldSpec("p", "numeric", "p"),
        seq("h", 2, share_vocab="u"),
    )
    raw = {
        "u": obj("a", "b", "a", None),
        "a": np.arange(4.0),
        "p": np.arange(4.0),
        "h": obj("a|b", "b", "", "c"),
        "y": np.ones(4),
    }
    enc = fit_encoders(spec, raw)
    again = FittedEncoders.from_json(json.loads(json.dumps(enc.to_json())))
    assert again.schema == enc.schema
    a, b = enc.transform(raw), again.transform(raw)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(DataError, match="format"):
        FittedEncoders.from_json({**enc.to_json(), "format": 99})


# ----------------------------------------------------------------------------- property


@settings(max_examples=40, deadline=None)
@given(
    cols=st.lists(
        st.lists(
            st.one_of(st.none(), st.sampled_from(["a", "b", "007", "7", "x y", ""])),
            min_size=1,
            max_size=30,
        ),
        min_size=1,
        max_size=4,
    ),
    min_count=st.integers(1, 3),
    batch_size=st.integers(1, 8),
)
def test_ids_stay_in_their_block_and_padded_batches_cover(cols, min_count, batch_size) -> None:
    n = min(len(c) for c in cols)
    raw = {f"c{i}": obj(*c[:n]) for i, c in enumerate(cols)}
    raw["y"] = np.zeros(n, np.float32)
    enc = fit_encoders(
        mem_spec(*(cat(f"c{i}", min_count=min_count) for i in range(len(cols)))), raw
    )
    split = enc.transform(raw)
    blocks = enc.schema.cat_fields
    assert enc.schema.table_size == sum(f.vocab_size for f in blocks)
    for f in blocks:
        ids = split["cat"][:, f.column]
        assert ((ids >= f.offset + OOV) & (ids < f.offset + f.vocab_size)).all()
    split["row"] = np.arange(n)
    seen = np.concatenate([b["row"][b["mask"] == 1] for b in padded_batches(split, batch_size)])
    np.testing.assert_array_equal(seen, np.arange(n))


# ----------------------------------------------------------------------------- batching


def test_batches_cover_every_row_once_per_epoch() -> None:
    split = {
        "label": np.arange(23, dtype=np.float32),
        "cat": np.arange(46, dtype=np.int32).reshape(23, 2),
    }
    e0 = list(batches(split, 5, shuffle=True, seed=1, epoch=0))
    assert [len(b["label"]) for b in e0] == [5, 5, 5, 5, 3]
    rows = np.concatenate([b["label"] for b in e0])
    assert sorted(rows.tolist()) == list(range(23)) and rows.tolist() != list(range(23))
    np.testing.assert_array_equal(
        np.concatenate([b["cat"][:, 0] for b in e0]) // 2, rows
    )  # rows stay aligned
    again = np.concatenate([b["label"] for b in batches(split, 5, shuffle=True, seed=1, epoch=0)])
    other = np.concatenate([b["label"] for b in batches(split, 5, shuffle=True, seed=1, epoch=1)])
    np.testing.assert_array_equal(rows, again)
    assert rows.tolist() != other.tolist()
    dropped = list(batches(split, 5, shuffle=False, seed=0, epoch=0, drop_last=True))
    assert len(dropped) == 4 and np.concatenate([b["label"] for b in dropped]).tolist() == list(
        range(20)
    )


def test_padded_batches_mask() -> None:
    split = {"label": np.arange(7, dtype=np.float32), "num": np.ones((7, 1), np.float32)}
    out = list(padded_batches(split, 3))
    assert len(out) == 3 and all(
        b["label"].shape == (3,) and b["mask"].dtype == np.float32 for b in out
    )
    np.testing.assert_array_equal(out[-1]["mask"], [1, 0, 0])
    np.testing.assert_array_equal(out[0]["mask"], [1, 1, 1])
    assert list(padded_batches({"label": np.zeros(0)}, 4)) == []


# ----------------------------------------------------------------------------- files, cache, dispatch

SPEC = """
name: toy
format: csv
train: train.csv
test: test.csv
split: {valid: 0.25, seed: 3}
label: y
fields:
  - {name: u, type: categorical}
  - {name: p, type: numeric}
  - {name: h, type: sequence, sep: "|", max_len: 2, share_vocab: u}
"""


def toy(tmp_path: Path) -> Path:
    rows = "\n".join(f"{i % 2},{'abc'[i % 3]},{i},{'a|b' if i % 2 else ''}" for i in range(20))
    (tmp_path / "train.csv").write_text("y,u,p,h\n" + rows + "\n")
    (tmp_path / "test.csv").write_text("y,u,p,h\n1,a,3,q|a\n0,zz,,\n")
    p = tmp_path / "toy.yaml"
    p.write_text(textwrap.dedent(SPEC))
    return p


def test_load_spec_dataset_end_to_end(tmp_path: Path) -> None:
    ds = load_dataset(str(toy(tmp_path)), cache_dir=tmp_path / "cache")
    assert (split_len(ds.train), split_len(ds.valid), split_len(ds.test)) == (15, 5, 2)
    assert ds.schema.field_names == ("u", "p", "h")
    assert ds.meta["oov_counts"]["test"] == {"u": 1, "h": 1}
    # statistics come from the train rows only (p == row number in the file)
    train_rows = carve(20, load_spec(tmp_path / "toy.yaml"))["train"]
    assert ds.meta["numeric_stats"]["p"]["mean"] == pytest.approx(train_rows.mean())
    assert ds.meta["numeric_stats"]["p"]["std"] == pytest.approx(train_rows.std())
    enc = FittedEncoders.from_json(ds.meta["encoders"])
    assert enc.schema == ds.schema
    json.dumps(ds.meta)  # meta is plain JSON (run logs can store it)


def test_carve_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    spec = DatasetSpec(name="t", format="csv", label="y", fields=(), train=())
    a, b = carve(100, spec), carve(100, spec)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert (len(a["train"]), len(a["valid"]), len(a["test"])) == (80, 10, 10)
    np.testing.assert_array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(100))


def test_carve_refuses_an_empty_eval_split() -> None:
    spec = DatasetSpec(name="t", format="csv", label="y", fields=(), train=(), source="s.yaml")
    with pytest.raises(
        DataError, match=r"s\.yaml: split\.valid = 0\.1 of 3 training rows is 0 rows"
    ):
        carve(3, spec)


def test_column_read_as_text_and_number() -> None:
    spec = mem_spec(cat("p_id", column="p"), FieldSpec("p", "numeric", "p"))
    assert columns_needed(spec) == {"p": "str"}
    enc = fit_encoders(spec, {"p": obj("1", "3", None)})
    out = enc.transform({"p": obj("3", "")})
    np.testing.assert_allclose(out["num"][:, 0], [1.0, 0.0])
    with pytest.raises(DataError, match="numeric column 'p' row 1: cannot parse 'x'"):
        enc.transform({"p": obj("x")})


def test_cache_hit_does_not_reread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = toy(tmp_path)
    first = load_dataset(str(spec), cache_dir=tmp_path / "cache")
    assert first.meta["cache"]["hit"] is False

    def boom(*a, **k):
        raise AssertionError("the reader must not run on a cache hit")

    monkeypatch.setattr(readers, "read_table", boom)
    second = load_dataset(str(spec), cache_dir=tmp_path / "cache")
    assert second.meta["cache"] == {"dir": first.meta["cache"]["dir"], "hit": True}
    assert isinstance(second.train["cat"], np.memmap)
    for role, split in first.splits():
        for k, v in split.items():
            np.testing.assert_array_equal(v, getattr(second, role)[k])
    assert second.schema == first.schema and second.meta["oov_counts"] == first.meta["oov_counts"]


def test_cache_invalidated_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = toy(tmp_path)
    first = load_dataset(str(spec), cache_dir=tmp_path / "cache")
    with (tmp_path / "test.csv").open("a") as fh:
        fh.write("1,b,4,b\n")
    second = load_dataset(str(spec), cache_dir=tmp_path / "cache")
    assert (
        second.meta["cache"]["hit"] is False
        and second.meta["cache"]["dir"] != first.meta["cache"]["dir"]
    )
    assert split_len(second.test) == 3


def test_default_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPN_CACHE_DIR", str(tmp_path / "envcache"))
    ds = load_dataset(str(toy(tmp_path)))
    assert ds.meta["cache"]["dir"].startswith(str(tmp_path / "envcache"))


def test_interrupted_write_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = toy(tmp_path)
    calls = {"n": 0}
    real_save = cache.integrity.save_npy  # writes each array (and its checksum)

    def flaky(path, arr, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user hits ^C half-way through writing
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(cache.integrity, "save_npy", flaky)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(str(spec), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # neither a final dir nor a temp dir
    monkeypatch.setattr(cache.integrity, "save_npy", real_save)
    assert load_dataset(str(spec), cache_dir=tmp_path / "cache").meta["cache"]["hit"] is False


def test_load_dataset_dispatch_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"unknown dataset 'kdd2012'.*\['frappe', 'synthetic', 'criteo'.*'amazon_grocery'.*\].*\.yaml"
    ):
        load_dataset("kdd2012")
    with pytest.raises(DataError, match="apply only to the synthetic"):
        load_dataset("frappe", n=5)
    with pytest.raises(DataError, match="nope.yaml"):
        load_dataset(str(tmp_path / "nope.yaml"))
