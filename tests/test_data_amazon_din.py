"""Built-ins ``amazon_electronics`` / ``amazon_books``: DIN's preprocessing of the raw McAuley 2014
files (dpn_jax.data.behaviour.read_amazon_folder), on generated files in the exact layout, plus a
build on the real 5-core Musical Instruments reviews (skipped when the data dir lacks them)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from dpn_jax.data import behaviour, load_dataset
from dpn_jax.data.behaviour import BUILTINS, HIST_SEP, read_amazon_meta, read_amazon_reviews
from dpn_jax.data.frappe import find_data_dir
from dpn_jax.data.schema import split_len
from dpn_jax.errors import DataError

# (user, asin, unixReviewTime) in file order. U3's rows are out of time order; U4's times tie.
REVIEWS = [
    ("U1", "A", 100), ("U1", "B", 200), ("U1", "C", 300), ("U1", "D", 400),
    ("U2", "E", 50), ("U3", "B", 10), ("U2", "A", 60), ("U3", "G", 5), ("U2", "F", 70),
    ("U4", "C", 1), ("U4", "D", 1), ("U4", "E", 1),
    ("U5", "H", 1), ("U5", "A", 2), ("U5", "B", 3), ("U5", "C", 4), ("U5", "D", 5),
]  # fmt: skip
ITEMS = set("ABCDEFGH")

# Meta records (written as Python dict literals, one as JSON). G has no record, C no categories,
# Z is not reviewed; B has two category paths (DIN takes the last path's last element).
KIDS = "Kids' Stuff, Toys"  # a quote and a comma: repr() writes it in double quotes
META = [
    {"asin": "A", "title": "USB cable", "price": 3.5,
     "related": {"also_bought": ["B", "Z"]}, "salesRank": {"Electronics": 12},
     "categories": [["Electronics", "Computers & Accessories", "Cables"]]},
    {"asin": "Z", "categories": [["Electronics", "Zzz"]]},
    {"asin": "B", "imUrl": "http://x/y.jpg",
     "categories": [["Electronics", "Camera & Photo"],
                    ["Electronics", "Accessories & Supplies", "Audio & Video Accessories"]]},
    {"asin": "C", "title": "no categories here"},
    {"asin": "D", "categories": [["Electronics", KIDS]]},
    {"asin": "E", "categories": [["Electronics", "Headphones"]]},
    {"asin": "F", "categories": [["Electronics", "GPS"]]},
]  # fmt: skip
META_JSON = {"asin": "H", "categories": [["Electronics", "Cables"]]}  # a JSON line also works
NONE = "(none)"  # (not "": the sequence encoder would drop it from hist_cats)
CAT = {"A": "Cables", "B": "Audio & Video Accessories", "C": NONE, "D": KIDS, "E": "Headphones",
       "F": "GPS", "G": NONE, "H": "Cables"}  # fmt: skip

# Hand computation: per user time order U1 ABCD, U2 EAF, U3 GB, U4 CDE (ties: file order),
# U5 HABCD; every item after the first is a positive with the earlier ones as history; the last
# goes to test, the one before to valid.
EXPECTED = {  # role -> (user, target, history)
    "train": [("U1", "B", "A"), ("U5", "A", "H"), ("U5", "B", "HA")],
    "valid": [("U1", "C", "AB"), ("U2", "A", "E"), ("U4", "D", "C"), ("U5", "C", "HAB")],
    "test": [("U1", "D", "ABC"), ("U2", "F", "EA"), ("U3", "B", "G"), ("U4", "E", "CD"),
             ("U5", "D", "HABC")],
}  # fmt: skip


def review_line(u: str, i: str, t: int) -> str:
    return json.dumps({"reviewerID": u, "asin": i, "reviewerName": "x", "helpful": [0, 0],
                       "reviewText": "ok", "overall": 5.0, "summary": "s",
                       "unixReviewTime": t, "reviewTime": "01 1, 2014"}) + "\n"  # fmt: skip


def meta_lines() -> list[str]:
    lines = [repr(r) + "\n" for r in META]
    lines.insert(2, "\n")  # a blank line is skipped
    lines.append(json.dumps(META_JSON) + "\n")
    return lines


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def make_folder(data_dir: Path, *, gz: bool = True, cat: str = "Electronics") -> Path:
    ext = ".gz" if gz else ""
    folder = data_dir / f"amazon_{cat.lower()}"
    write(folder / f"reviews_{cat}_5.json{ext}", [review_line(*r) for r in REVIEWS])
    write(folder / f"meta_{cat}.json{ext}", meta_lines())
    return folder


def read_built(d: Path) -> dict[str, list[dict[str, str]]]:
    out = {}
    for role in ("train", "valid", "test"):
        with open(d / f"{role}.csv", newline="", encoding="utf-8") as fh:
            out[role] = list(csv.DictReader(fh))
    return out


def test_meta_lines_are_python_literals() -> None:
    assert meta_lines()[0].startswith("{'asin': 'A', 'title': 'USB cable'")
    assert "[['Electronics', 'Computers & Accessories', 'Cables']]" in meta_lines()[0]
    assert '"Kids\' Stuff, Toys"' in meta_lines()[5]


def test_din_rows_from_raw_files_match_the_hand_computation(tmp_path: Path) -> None:
    make_folder(tmp_path / "data")
    ds = load_dataset("amazon_electronics", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    assert ds.schema.field_names == ("user", "item", "cat", "hist_items", "hist_cats")
    d = Path(ds.meta["behaviour_dir"])
    rows = read_built(d)
    for role, want in EXPECTED.items():
        assert split_len(getattr(ds, role)) == len(rows[role]) == 2 * len(want), role
        pos, neg = rows[role][0::2], rows[role][1::2]
        got = [(r["user"], r["item"], r["hist_items"].replace(HIST_SEP, "")) for r in pos]
        assert sorted(got) == sorted(want), role
        for p, n in zip(pos, neg, strict=True):
            assert (p["label"], n["label"]) == ("1", "0")
            hist = p["hist_items"].split(HIST_SEP)
            assert p["cat"] == CAT[p["item"]]  # last element of the last categories path
            assert p["hist_cats"].split(HIST_SEP) == [CAT[h] for h in hist]
            assert (n["user"], n["hist_items"], n["hist_cats"]) == (
                p["user"], p["hist_items"], p["hist_cats"]
            )  # fmt: skip
            reviewed = {i for u, i, _ in REVIEWS if u == p["user"]}
            assert n["item"] in ITEMS - reviewed and n["cat"] == CAT[n["item"]]
    # encoded: every history item has its category (none dropped as an empty token)
    for _, split in ds.splits():
        lens = [(np.asarray(split[f"seq/{f}"]) != ds.schema.field(f).pad_id).sum(axis=1)
                for f in ("hist_items", "hist_cats")]  # fmt: skip
        np.testing.assert_array_equal(*lens)
        assert lens[0].min() >= 1 and lens[0].max() <= 4
    # the last behaviour of every user is the test positive
    last = {u: max((t, k, i) for k, (uu, i, t) in enumerate(REVIEWS) if uu == u)[2]
            for u in {u for u, _, _ in REVIEWS}}  # fmt: skip
    assert {(r["user"], r["item"]) for r in rows["test"][0::2]} == set(last.items())
    # the counts of the meta reader are in the built spec's comment
    spec = (d / "spec.yaml").read_text(encoding="utf-8")
    for fact in ("reviews 17", "items 8", "meta_blank 1", "meta_not_reviewed 1",
                 "meta_no_category 1", "meta_kept 7", "items_without_meta 1"):  # fmt: skip
        assert fact in spec, fact


def test_plain_files_give_the_same_rows_and_gz_wins_when_both(tmp_path: Path) -> None:
    make_folder(tmp_path / "a")
    folder = make_folder(tmp_path / "b", gz=False)
    gz, plain = (
        load_dataset("amazon_electronics", data_dir=tmp_path / d, cache_dir=tmp_path / "c",
                     max_len=3)
        for d in ("a", "b")
    )  # fmt: skip
    assert gz.meta["behaviour_dir"] != plain.meta["behaviour_dir"]
    assert read_built(Path(gz.meta["behaviour_dir"])) == read_built(
        Path(plain.meta["behaviour_dir"])
    )
    assert BUILTINS["amazon_electronics"].paths(folder) == [
        folder / "reviews_Electronics_5.json", folder / "meta_Electronics.json"
    ]  # fmt: skip
    make_folder(tmp_path / "b")  # now both: the .gz files are read
    assert BUILTINS["amazon_electronics"].paths(folder) == [
        folder / "reviews_Electronics_5.json.gz", folder / "meta_Electronics.json.gz"
    ]  # fmt: skip


def test_books_and_cache_hit_does_not_reread_the_raw_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path / "data", cat="Books")
    kw = dict(data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    first = load_dataset("amazon_books", **kw)
    assert split_len(first.test) == 10

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("raw files re-read on a cache hit")

    monkeypatch.setattr(behaviour, "read_amazon_folder", boom)
    again = load_dataset("amazon_books", **kw)
    assert again.meta["behaviour_dir"] == first.meta["behaviour_dir"]


def test_meta_reader_rules(tmp_path: Path) -> None:
    p = write(tmp_path / "meta.json.gz", meta_lines())
    stats: dict[str, int] = {}
    cats = read_amazon_meta(p, ITEMS, stats=stats)
    assert cats == {k: v if v != NONE else "" for k, v in CAT.items() if k != "G"}
    assert stats["meta_lines"] == 9 and stats["meta_kept"] == 7
    assert read_amazon_meta(p)["Z"] == "Zzz"  # no asin filter: every record
    assert read_amazon_meta(p, categories_list=0)["B"] == "Camera & Photo"  # first path instead
    write(p, ["{'asin': 'A', 'categories': [['x', ' a^b ']]}\n", "{'asin': 'A'}\n"])
    stats = {}
    assert read_amazon_meta(p, stats=stats) == {"A": "a_b"}  # "^" separates history tokens
    assert stats["meta_duplicate"] == 1 and stats["meta_category_renamed"] == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{'asin': 'A', 'categories': [['x', 'y']\n", "line 3: neither JSON nor a Python literal"),
        ("{'asin': 'A', 'categories': __import__('os').getcwd()}\n", "line 3: neither JSON"),
        ("{'asin': 'G', 'categories': 'Cables'}\n", "line 3: 'categories' of 'G' is not a list"),
        ("['A', 'B']\n", "line 3: not a meta record with an 'asin'"),
    ],
)
def test_malformed_meta_line_names_file_and_line(tmp_path: Path, bad: str, match: str) -> None:
    folder = make_folder(tmp_path / "data")
    lines = meta_lines()
    lines[2] = bad  # (the blank line's place)
    write(folder / "meta_Electronics.json.gz", lines)
    with pytest.raises(DataError, match=r"meta_Electronics\.json\.gz: " + match) as e:
        load_dataset("amazon_electronics", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    assert "\n" not in str(e.value)


def test_malformed_review_lines(tmp_path: Path) -> None:
    p = tmp_path / "reviews.json.gz"
    rec = json.loads(review_line("U1", "A", 5))
    del rec["unixReviewTime"]
    write(p, [review_line("U1", "A", 5), json.dumps(rec) + "\n"])
    with pytest.raises(DataError, match=r"reviews\.json\.gz: line 2: .*'unixReviewTime'"):
        read_amazon_reviews(p)
    write(p, [review_line("U1", "A", 5), "\n", '{"reviewerID": "U1", "asin": \n'])
    with pytest.raises(DataError, match=r"reviews\.json\.gz: line 3: neither JSON"):
        read_amazon_reviews(p)
    write(p, [review_line("U1", "A", 5).replace("5, ", '"soon", ', 1)])
    with pytest.raises(DataError, match="line 1: unixReviewTime 'soon' is not a number"):
        read_amazon_reviews(p)
    p.write_bytes(b"not gzip at all\n")
    with pytest.raises(DataError, match=r"reviews\.json\.gz: line 1: unreadable"):
        read_amazon_reviews(p)


def test_missing_folder_or_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("amazon_electronics", data_dir=tmp_path, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{tmp_path / 'amazon_electronics' / 'reviews_Electronics_5.json.gz'} not found" in msg
    for part in ("amazon_electronics/ with reviews_Electronics_5.json.gz, meta_Electronics.json.gz",
                 "DPN_DATA_DIR", "--data-dir",
                 "`dpn-jax data download amazon_electronics --to DIR`"):  # fmt: skip
        assert part in msg, part
    write(tmp_path / "amazon_books" / "reviews_Books_5.json", [review_line("U1", "A", 1)])
    with pytest.raises(DataError, match=r"amazon_books/meta_Books\.json\.gz not found"):
        load_dataset("amazon_books", data_dir=tmp_path, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_5core_reviews_with_generated_meta(tmp_path: Path) -> None:
    rel = "amazon_musical_instruments_5core/reviews_Musical_Instruments_5.json.gz"
    try:
        real = find_data_dir() / rel
    except DataError:
        pytest.skip(f"no data dir (../shared/data or $DPN_DATA_DIR) holding {rel}")
    if not real.is_file():
        pytest.skip(f"{real} not found: this test needs {rel} in the data dir")
    folder = tmp_path / "data" / "amazon_electronics"
    folder.mkdir(parents=True)
    (folder / "reviews_Electronics_5.json.gz").symlink_to(real)
    log = read_amazon_reviews(real)
    asins = sorted(set(log.item.tolist()))
    cats = {a: f"c{k % 7}" for k, a in enumerate(asins) if k % 2 == 0}  # meta for half the items
    records = [
        {"asin": a, "title": "t", "categories": [["Musical Instruments", c]]}
        for a, c in cats.items()
    ] + [{"asin": "NOT-REVIEWED", "categories": [["x"]]}]
    write(folder / "meta_Electronics.json.gz", [repr(r) + "\n" for r in records])

    ds = load_dataset("amazon_electronics", data_dir=tmp_path / "data", cache_dir=tmp_path / "c")
    per_user: dict[str, int] = {}
    for u in log.user.tolist():
        per_user[u] = per_user.get(u, 0) + 1
    n = {role: split_len(s) for role, s in ds.splits()}
    # each user with n reviews gives n-1 positives and n-1 negatives
    assert sum(n.values()) == 2 * sum(k - 1 for k in per_user.values())
    assert n["test"] == 2 * sum(k >= 2 for k in per_user.values())
    assert n["valid"] == 2 * sum(k >= 3 for k in per_user.values())
    rows = read_built(Path(ds.meta["behaviour_dir"]))
    for role in rows.values():
        for r in role:
            assert r["cat"] == cats.get(r["item"], "(none)")
    spec = (Path(ds.meta["behaviour_dir"]) / "spec.yaml").read_text(encoding="utf-8")
    assert f"items_without_meta {len(asins) - len(cats)}" in spec
