"""Dataset spec parsing and validation: every error is one line naming the spec and the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dpn_jax.data.spec import DatasetSpec, load_spec, parse_spec
from dpn_jax.errors import DataError

GOOD = """
name: toy
format: csv
train: data/train-*.csv
test: data/test.csv
split: {valid: 0.2, seed: 7}
label: clicked
fields:
  - {name: user_id, type: categorical, min_count: 2}
  - {name: age, type: numeric, buckets: 4}
  - {name: price, type: numeric}
  - {name: genres, type: sequence, sep: "|", max_len: 3}
  - {name: hist, column: history, type: sequence, sep: "^", max_len: 5, share_vocab: user_id}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for f in ("train-2.csv", "train-1.csv", "test.csv", "other.libfm"):
        (data / f).write_text("clicked,user_id\n1,a\n")
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(DataError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg, "errors must be one line"
    assert str(p) in msg, "errors must name the spec file"
    return msg


def test_good_spec(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    assert isinstance(spec, DatasetSpec)
    assert spec.name == "toy" and spec.format == "csv" and spec.label == "clicked"
    # glob matches, resolved relative to the spec file, concatenated in sorted order
    assert [p.name for p in spec.train] == ["train-1.csv", "train-2.csv"]
    assert spec.train[0].parent == (tmp_path / "data").resolve()
    assert [p.name for p in spec.test] == ["test.csv"] and spec.valid == ()
    # a split with its own file carves nothing
    assert (spec.split.valid, spec.split.test, spec.split.seed) == (0.2, 0.0, 7)
    kinds = {f.name: f.kind for f in spec.fields}
    assert kinds == {"user_id": "cat", "age": "cat", "price": "num", "genres": "seq", "hist": "seq"}
    hist = spec.field("hist")
    assert (hist.column, hist.sep, hist.max_len, hist.share_vocab) == ("history", "^", 5, "user_id")
    assert spec.field("user_id").min_count == 2 and spec.field("price").buckets == 0


def test_defaults_and_tab_sep(tmp_path: Path) -> None:
    text = "format: csv\ntrain: data/test.csv\nlabel: clicked\nsep: '\\t'\nfields: [{name: a, type: categorical}]\n"
    spec = load_spec(write(tmp_path, text, name="my-data.yaml"))
    assert spec.name == "my-data"  # defaults to the file stem
    assert spec.sep == "\t"
    assert (spec.split.valid, spec.split.test, spec.split.seed) == (0.1, 0.1, 2021)
    assert load_spec(write(tmp_path, text), default_seed=5).split.seed == 5


def test_canonical_json_ignores_location(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = load_spec(write(tmp_path / "x", GOOD))
    b = load_spec(write(tmp_path / "y", GOOD))
    assert a.canonical_json() == b.canonical_json()
    c = load_spec(write(tmp_path, GOOD.replace("seed: 7", "seed: 8")))
    assert c.canonical_json() != a.canonical_json()


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("fields:", "fieldz:"))
    assert "'fieldz'" in msg and "did you mean 'fields'" in msg and "allowed keys" in msg


def test_unknown_field_key_suggests(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("min_count: 2", "min_cout: 2"))
    assert "'min_cout'" in msg and "did you mean 'min_count'" in msg


def test_key_of_another_field_type(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("buckets: 4", "sep: ','"))
    assert "field 'age'" in msg and "'sep'" in msg and "sequence" in msg


@pytest.mark.parametrize("key", ["train", "format", "label", "fields"])
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    lines = [ln for ln in GOOD.splitlines() if not ln.startswith(f"{key}:")]
    if key == "fields":
        lines = [ln for ln in lines if not ln.startswith("  - ")]
    msg = error(tmp_path, "\n".join(lines))
    assert f"missing required key '{key}'" in msg


def test_sequence_needs_max_len(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace(", max_len: 3", ""))
    assert "'max_len'" in msg and "'genres'" in msg


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("format: csv", "format: xlsx", "format 'xlsx' is not supported"),
        ("type: categorical, min_count: 2", "type: categorial", "did you mean 'categorical'"),
        ("min_count: 2", "min_count: 0", "min_count must be an integer >= 1, got 0"),
        ("min_count: 2", "min_count: true", "min_count must be an integer >= 1, got True"),
        ("buckets: 4", "buckets: 1", "buckets must be an integer >= 2"),
        ("label: clicked", "label: 3", "label must be a non-empty string"),
        ("label: clicked", "label: user_id", "reads the label column 'user_id'"),
        ('sep: "|", ', 'sep: "", ', "sep must be a non-empty string"),
    ],
)
def test_bad_values(tmp_path: Path, old: str, new: str, expect: str) -> None:
    assert old in GOOD
    assert expect in error(tmp_path, GOOD.replace(old, new, 1))


def test_share_vocab_unknown_or_not_categorical(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("share_vocab: user_id", "share_vocab: user_idd"))
    assert "share_vocab 'user_idd' is not a field" in msg and "did you mean 'user_id'" in msg
    msg = error(tmp_path, GOOD.replace("share_vocab: user_id", "share_vocab: age"))
    assert "must name a categorical field" in msg and "numeric" in msg
    msg = error(
        tmp_path, GOOD.replace("share_vocab: user_id", "share_vocab: user_id, min_count: 3")
    )
    assert "min_count does not apply with share_vocab" in msg


@pytest.mark.parametrize(
    "split", ["{valid: 1.0}", "{test: -0.1}", "{valid: 0.5, test: 0.5}", "{valid: x}"]
)
def test_split_fractions(tmp_path: Path, split: str) -> None:
    text = GOOD.replace("test: data/test.csv\n", "").replace(
        "split: {valid: 0.2, seed: 7}", f"split: {split}"
    )
    msg = error(tmp_path, text)
    assert "split" in msg


def test_unknown_split_key(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("seed: 7", "sed: 7"))
    assert "'sed'" in msg and "did you mean 'seed'" in msg


def test_duplicate_field_names(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("{name: price,", "{name: age,"))
    assert "duplicate field name" in msg and "'age'" in msg


def test_missing_file_names_resolved_path(tmp_path: Path) -> None:
    msg = error(tmp_path, GOOD.replace("data/test.csv", "data/nope.csv"))
    assert "data/nope.csv" in msg and str(tmp_path / "data" / "nope.csv") in msg
    msg = error(tmp_path, GOOD.replace("data/train-*.csv", "data/zzz-*.csv"))
    assert "no file matches" in msg and "zzz-*.csv" in msg


def test_invalid_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    assert "invalid YAML" in error(tmp_path, "name: [unclosed\n")
    assert "must be a YAML mapping" in error(tmp_path, "- a\n- b\n")


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_libfm_fields(tmp_path: Path) -> None:
    base = "format: libfm\ntrain: data/other.libfm\n"
    spec = load_spec(write(tmp_path, base + "num_fields: 3\n"))
    assert [f.name for f in spec.fields] == ["f0", "f1", "f2"]
    assert all(f.type == "categorical" for f in spec.fields) and spec.label == "label"
    spec = load_spec(
        write(tmp_path, base + "fields: [{name: user}, {name: item, type: categorical}]\n")
    )
    assert [f.name for f in spec.fields] == ["user", "item"]
    msg = error(tmp_path, base + "fields: [{name: user, type: numeric}]\n")
    assert "libfm fields" in msg and "categorical" in msg
    msg = error(tmp_path, base + "num_fields: 2\nfields: [{name: user}]\n")
    assert "either fields" in msg
    assert "missing required key 'fields'" in error(tmp_path, base)


def test_parse_spec_in_code(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("y,a\n1,x\n")
    raw = {
        "name": "c",
        "format": "csv",
        "train": "t.csv",
        "label": "y",
        "fields": [{"name": "a", "type": "categorical"}],
    }
    spec = parse_spec(raw, base_dir=tmp_path, source="<test>")
    assert spec.train == (tmp_path / "t.csv",)
    with pytest.raises(DataError, match=r"^<test>: "):
        parse_spec({**raw, "extra": 1}, base_dir=tmp_path, source="<test>")
