"""Behaviour logs -> DIN-style CTR rows (dpn_jax.data.behaviour), on a generated log; plus one
fast real-data test per built-in (skipped when ../shared/data lacks its folder)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpn_jax.data import load_dataset
from dpn_jax.data.behaviour import (
    BUILTINS,
    HIST_SEP,
    InteractionLog,
    build_behaviour_dataset,
    load_behaviour,
    make_din_rows,
    read_din_text,
)
from dpn_jax.data.encode import FittedEncoders
from dpn_jax.data.frappe import find_data_dir
from dpn_jax.data.schema import FIRST, split_len
from dpn_jax.errors import DataError

N_ITEMS = 40


def gen_log(seed: int = 0, n_users: int = 25) -> InteractionLog:
    """Users with 1..14 distinct items each, integer times with many ties, rows in shuffled order;
    categories = item % 5 (item "i7" -> "c2")."""
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    for u in range(n_users):
        k = int(rng.integers(1, 15))
        for it in rng.choice(N_ITEMS, k, replace=False):
            users.append(f"u{u}")
            items.append(f"i{it}")
            times.append(int(rng.integers(0, 6)))  # few distinct times: ties on purpose
    perm = rng.permutation(len(users))
    cats = {f"i{i}": f"c{i % 5}" for i in range(N_ITEMS)}
    return InteractionLog(
        np.array(users, object)[perm],
        np.array(items, object)[perm],
        np.array(times)[perm],
        item_cat=cats,
    )


def sequences(log: InteractionLog) -> dict[str, list[str]]:
    """Each user's items in time order, ties in file order (computed independently)."""
    out: dict[str, list[tuple[float, int, str]]] = {}
    for j, (u, i, t) in enumerate(zip(log.user, log.item, log.time, strict=True)):
        out.setdefault(u, []).append((t, j, i))
    return {u: [i for _, _, i in sorted(v)] for u, v in out.items()}


def pairs(rows: dict[str, list[str]]) -> list[tuple[dict, dict]]:
    n = len(rows["label"])
    recs = [{c: rows[c][k] for c in rows} for k in range(n)]
    assert n % 2 == 0
    return [(recs[k], recs[k + 1]) for k in range(0, n, 2)]


def test_leave_last_out_split_and_history_strictly_before() -> None:
    log = gen_log()
    seqs = sequences(log)
    out = make_din_rows(log, max_len=100, seed=1)
    expected: dict[str, list[tuple[str, str, str]]] = {"train": [], "valid": [], "test": []}
    for u, s in sorted(seqs.items()):
        for p in range(1, len(s)):
            role = "test" if p == len(s) - 1 else "valid" if p == len(s) - 2 else "train"
            expected[role].append((u, s[p], HIST_SEP.join(s[:p])))
    for role, rows in out.items():
        got = [(pos["user"], pos["item"], pos["hist_items"]) for pos, _ in pairs(rows)]
        assert sorted(got) == sorted(expected[role]), role
    # every user with >= 2 interactions has exactly one test pair, >= 3 one valid pair
    n_test = sum(len(s) >= 2 for s in seqs.values())
    n_valid = sum(len(s) >= 3 for s in seqs.values())
    assert len(out["test"]["label"]) == 2 * n_test and len(out["valid"]["label"]) == 2 * n_valid
    # history strictly before the target in time (ties: earlier in the file)
    when = {(u, i): k for u, s in seqs.items() for k, i in enumerate(s)}
    for rows in out.values():
        for pos, _ in pairs(rows):
            hist = pos["hist_items"].split(HIST_SEP)
            assert all(when[pos["user"], h] < when[pos["user"], pos["item"]] for h in hist)


def test_negatives_paired_one_to_one_never_interacted_and_their_category() -> None:
    log = gen_log()
    seqs = sequences(log)
    out = make_din_rows(log, max_len=100, seed=2)
    universe = set(log.item.tolist())
    for rows in out.values():
        for pos, neg in pairs(rows):
            assert (pos["label"], neg["label"]) == ("1", "0")
            assert neg["user"] == pos["user"] and neg["hist_items"] == pos["hist_items"]
            assert neg["hist_cats"] == pos["hist_cats"]
            assert neg["item"] in universe and neg["item"] not in seqs[pos["user"]]
            for r in (pos, neg):  # a target's category (negatives included) is its item's
                assert r["cat"] == log.item_cat[r["item"]]
                hist = r["hist_items"].split(HIST_SEP)
                assert r["hist_cats"].split(HIST_SEP) == [log.item_cat[h] for h in hist]


def test_deterministic_by_seed() -> None:
    log = gen_log()
    a = make_din_rows(log, seed=5)
    assert a == make_din_rows(log, seed=5)
    assert a == make_din_rows(gen_log(), seed=5)  # a fresh but identical log
    b = make_din_rows(log, seed=6)
    assert a["train"]["item"] != b["train"]["item"]  # only the negatives differ
    assert a["train"]["item"][::2] == b["train"]["item"][::2]


def test_truncation_to_most_recent_max_len() -> None:
    log = gen_log()
    seqs = sequences(log)
    out = make_din_rows(log, max_len=3, seed=0)
    lens = set()
    for rows in out.values():
        for pos, _ in pairs(rows):
            s = seqs[pos["user"]]
            p = s.index(pos["item"])
            assert pos["hist_items"].split(HIST_SEP) == s[max(0, p - 3) : p]
            lens.add(len(pos["hist_items"].split(HIST_SEP)))
    assert lens == {1, 2, 3}


def test_max_users_is_a_seeded_subset() -> None:
    log = gen_log()
    a = make_din_rows(log, seed=3, max_users=7)
    users = {u for rows in a.values() for u in rows["user"]}
    assert len(users) <= 7 and a == make_din_rows(log, seed=3, max_users=7)
    seqs = sequences(log)
    for pos, _ in pairs(a["test"]):
        assert pos["item"] == seqs[pos["user"]][-1]


def test_user_with_every_item_is_an_error() -> None:
    log = InteractionLog(np.array(["a", "a", "b"]), np.array(["x", "y", "x"]))
    with pytest.raises(DataError, match="interacted with every one of the 2 items"):
        make_din_rows(log)


def test_csv_spec_and_encoding_through_the_spec_path(tmp_path: Path) -> None:
    log = gen_log(n_users=60)
    kw = dict(max_len=4, seed=7, out_dir=tmp_path / "built", cache_dir=tmp_path / "cache")
    ds = build_behaviour_dataset(log, "toy", **kw)
    d = Path(ds.meta["behaviour_dir"])
    assert d.parent == tmp_path / "built" and ds.meta["cache"]["hit"] is False
    spec = yaml.safe_load((d / "spec.yaml").read_text())
    assert spec["format"] == "csv" and spec["label"] == "label"
    assert {r: spec[r] for r in ("train", "valid", "test")} == {
        "train": "train.csv", "valid": "valid.csv", "test": "test.csv"
    }  # fmt: skip
    fields = {f["name"]: f for f in spec["fields"]}
    assert list(fields) == ["user", "item", "cat", "hist_items", "hist_cats"]
    assert (
        fields["hist_items"]["share_vocab"] == "item"
        and fields["hist_cats"]["share_vocab"] == "cat"
    )
    assert fields["hist_items"]["max_len"] == 4 and fields["hist_items"]["sep"] == HIST_SEP
    # the encoded sequences share the target's block and decode back to the CSV's tokens
    s = ds.schema
    assert s.field("hist_items").offset == s.field("item").offset
    assert s.field("hist_cats").offset == s.field("cat").offset
    enc = FittedEncoders.from_json(ds.meta["encoders"])
    vocab = ["<pad>", "<oov>", *enc.field("item").vocab]
    item = s.field("item")
    for role, split in ds.splits():
        with open(d / f"{role}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert split_len(split) == len(rows) and split["seq/hist_items"].shape[1] == 4
        np.testing.assert_array_equal(split["label"], [float(r["label"]) for r in rows])
        for k in range(0, len(rows), 7):
            ids = np.asarray(split["seq/hist_items"][k]) - item.offset
            toks = [vocab[i] for i in ids if i != 0]
            want = rows[k]["hist_items"].split(HIST_SEP)
            assert toks == [t if t in vocab[FIRST:] else "<oov>" for t in want]
    # a second call reuses both the CSV directory and the encoded cache
    again = build_behaviour_dataset(log, "toy", **kw)
    assert again.meta["behaviour_dir"] == str(d) and again.meta["cache"]["hit"] is True
    other = build_behaviour_dataset(log, "toy", **{**kw, "seed": 8})
    assert other.meta["behaviour_dir"] != str(d)


def test_din_text_reader(tmp_path: Path) -> None:
    p = tmp_path / "din.txt"
    p.write_text("1 2 3;7 7 8;4;9;1\n5;6;2;7;0\n")
    rows = read_din_text(p)
    assert rows == {
        "item": ["4", "2"], "cat": ["9", "7"], "hist_items": ["1^2^3", "5"],
        "hist_cats": ["7^7^8", "6"], "label": ["1", "0"],
    }  # fmt: skip
    p.write_text("1 2;7;4;9;1\n")
    with pytest.raises(DataError, match="line 1: 2 history items but 1 cats"):
        read_din_text(p)


def test_builtin_missing_folder_and_bad_option(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"amazon_grocery_rechorus/train\.csv not found.*DPN_DATA_DIR"
    ):
        load_dataset("amazon_grocery", data_dir=tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"options \['rows'\] do not apply to 'amazon_grocery'"):
        load_dataset("amazon_grocery", data_dir=tmp_path, rows=3)


# ----------------------------------------------------------------------------- real data


def real_folder(name: str) -> Path:
    try:
        d = find_data_dir()
    except DataError:
        pytest.skip(f"no data dir (../shared/data or $DPN_DATA_DIR) for {name}")
    b = BUILTINS[name]
    missing = [f for f in b.files if not (d / b.folder / f).is_file()]
    if missing:
        pytest.skip(
            f"{d / b.folder / missing[0]} not found: {name} needs {b.folder}/ in the data dir"
        )
    return d


LOGS = {  # name -> has categories
    "amazon_videogames": False,
    "amazon_grocery": True,
    "amazon_instruments": False,
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(LOGS))
def test_real_log_builder(name: str, tmp_path: Path) -> None:
    d = real_folder(name)
    ds = load_behaviour(name, data_dir=d, cache_dir=tmp_path, max_users=300, max_len=20)
    n = {role: split_len(s) for role, s in ds.splits()}
    assert n["test"] > 0 and n["valid"] > 0 and n["train"] > n["valid"]
    assert n["test"] <= 2 * 300 and n["valid"] <= n["test"]
    names = ["user", "item"] + (["cat"] if LOGS[name] else [])
    seqs = ["hist_items"] + (["hist_cats"] if LOGS[name] else [])
    assert ds.schema.field_names == (*names, *seqs)
    for role, split in ds.splits():
        assert float(np.mean(split["label"])) == 0.5  # one negative per positive
        h = np.asarray(split["seq/hist_items"])
        assert h.shape[1] == 20 and (h[:, 0] != ds.schema.field("hist_items").pad_id).all()
        cat = np.asarray(split["cat"])
        assert (cat[0::2, 0] == cat[1::2, 0]).all()  # a pair shares its user
        if role == "train":  # (in valid/test both targets may be unseen in train, i.e. OOV)
            assert (cat[0::2, 1] != cat[1::2, 1]).all()  # ... but not its target item


@pytest.mark.realdata
def test_real_din_text_fixture(tmp_path: Path) -> None:
    d = real_folder("amazon_electronics_din")
    ds = load_dataset("amazon_electronics_din", data_dir=d, cache_dir=tmp_path)
    assert [split_len(s) for _, s in ds.splits()] == [80, 10, 10]
    assert ds.schema.field_names == ("item", "cat", "hist_items", "hist_cats")
    assert sum(float(s["label"].sum()) for _, s in ds.splits()) == 48


@pytest.mark.realdata
def test_real_fuxictr_tiny_seq(tmp_path: Path) -> None:
    d = real_folder("fuxictr_tiny_seq")
    ds = load_dataset("fuxictr_tiny_seq", data_dir=d, cache_dir=tmp_path)
    assert [split_len(s) for _, s in ds.splits()] == [100, 100, 100]
    s = ds.schema
    assert len(s.cat_fields) == 14 and s.field("click_sequence").share_vocab == "adgroup_id"
    assert ds.train["seq/click_sequence"].shape == (100, 5)
    assert float(ds.train["label"].sum()) == 4
