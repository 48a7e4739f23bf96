"""Bucketised numeric fields (``type: numeric, buckets: B``): the fitting rules, one lookup for
training and serving, old bundles, the cache key and the per-field log lines.

The property tests go through the public encoder (``fit_encoders`` / ``transform``) and the
exported-model encoder (``RawEncoder``), so they run against any dpn-jax version."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import dpn_jax
from dpn_jax.data import DatasetSpec, FieldSpec, FittedEncoders, cache, fit_encoders, load_dataset
from dpn_jax.data.schema import FIRST, OOV
from dpn_jax.serving.exported import RawEncoder

NAN, INF = float("nan"), float("inf")


def numeric_spec(buckets: int, *names: str) -> DatasetSpec:
    fields = tuple(FieldSpec(n, "numeric", n, buckets=buckets) for n in names or ("x",))
    return DatasetSpec(name="t", format="csv", label="y", fields=fields, train=())


def fit(col: np.ndarray, buckets: int) -> FittedEncoders:
    return fit_encoders(numeric_spec(buckets), {"x": col})


def ids(enc: FittedEncoders, values, name: str = "x") -> np.ndarray:
    """Local ids (FIRST + bucket, or OOV) of ``values`` under the training encoder."""
    info = enc.schema.field(name)
    return enc.transform({name: np.asarray(values, dtype=np.float64)})["cat"][:, info.column] - info.offset


def n_buckets(enc: FittedEncoders, name: str = "x") -> int:
    return enc.schema.field(name).vocab_size - FIRST


# ----------------------------------------------------------------------------- columns


FINITE = st.one_of(
    st.integers(-40, 40).map(float),  # ties
    st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False),
)


@st.composite
def columns(draw) -> tuple[np.ndarray, int]:
    """(a train column, buckets): mass points, ties, NaN/inf, constant and two-valued columns."""
    buckets = draw(st.integers(2, 12))
    kind = draw(st.sampled_from(["mixed", "mixed", "constant", "two_valued", "few", "missing"]))
    values: list[float] = []
    if kind == "constant":
        values = [draw(FINITE)] * draw(st.integers(1, 40))
    elif kind == "two_valued":
        a, b = draw(st.lists(FINITE, min_size=2, max_size=2, unique=True))
        values = [a] * draw(st.integers(1, 60)) + [b] * draw(st.integers(1, 60))
    elif kind == "few":
        for v in draw(st.lists(FINITE, min_size=1, max_size=buckets, unique=True)):
            values += [v] * draw(st.integers(1, 30))
    elif kind == "mixed":
        for v in draw(st.lists(FINITE, max_size=3, unique=True)):  # mass points (most of them)
            values += [v] * draw(st.integers(1, 150))
        values += draw(st.lists(FINITE, max_size=150))
    values += draw(st.lists(st.sampled_from([NAN, INF, -INF]), max_size=10))
    if not values:
        values = [NAN]
    col = np.asarray(values, dtype=np.float64)
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(col), buckets


def segments(values: np.ndarray, counts: np.ndarray, buckets: int) -> int:
    """Mass points plus maximal runs of other values between them (what must fit in buckets for
    every mass point to be alone)."""
    mass = counts * buckets > counts.sum()
    runs = int(np.count_nonzero(~mass & np.append(True, mass[:-1])))  # a non-mass value after a mass one
    return int(mass.sum()) + runs


@settings(max_examples=150, deadline=None)
@given(case=columns())
def test_bucket_rules_hold_on_random_columns(case) -> None:
    col, buckets = case
    enc = fit(col, buckets)
    finite = col[np.isfinite(col)]
    nb = n_buckets(enc)
    assert 1 <= nb <= buckets  # never more than asked for
    assert (ids(enc, [NAN, INF, -INF]) == OOV).all()  # missing / non-finite -> OOV
    if finite.size == 0:
        assert (ids(enc, [0.0, 1.0]) == OOV).all()
        return
    values, counts = np.unique(finite, return_counts=True)
    lo, hi = values[0], values[-1]
    train = ids(enc, finite)
    assert ((train >= FIRST) & (train < FIRST + nb)).all()
    # No bucket is empty on the train values.
    assert (np.bincount(train - FIRST, minlength=nb) > 0).all()
    # Monotone, out-of-range values included: larger value -> bucket id >=.
    gaps = (values[:-1] + values[1:]) / 2
    probe = np.sort(np.concatenate([values, gaps, [lo - 1 - abs(lo), hi + 1 + abs(hi)]]))
    got = ids(enc, probe)
    assert (np.diff(got) >= 0).all() and (got != OOV).all()
    # Values outside the train range go to the end buckets.
    assert ids(enc, [lo - 1 - abs(lo)])[0] == FIRST and ids(enc, [hi + 1 + abs(hi)])[0] == FIRST + nb - 1
    value_ids = ids(enc, values)
    if values.size <= buckets:  # k distinct values -> k buckets, one each
        assert nb == values.size
        np.testing.assert_array_equal(value_ids, FIRST + np.arange(values.size))
    elif segments(values, counts, buckets) <= buckets:  # each mass point alone in its bucket
        for v, c in zip(values, counts, strict=True):
            if c * buckets > finite.size:
                mine = value_ids == ids(enc, [v])[0]
                assert mine.sum() == 1, f"mass point {v} shares its bucket with {values[mine]}"


@settings(max_examples=80, deadline=None)
@given(case=columns())
def test_serving_encoder_buckets_like_training(case) -> None:
    """The exported model's numpy encoder and the training encoder give the same ids for train
    values, values between and outside them, mass points, NaN, inf and missing cells."""
    col, buckets = case
    enc = fit(col, buckets)
    state = json.loads(json.dumps(enc.to_json()))  # as stored in a bundle / export
    finite = col[np.isfinite(col)]
    extra = [-1e9, 1e9, NAN, INF, -INF] + ([finite.min() - 1, finite.max() + 1] if finite.size else [])
    probe = np.concatenate([col, (finite[:-1] + finite[1:]) / 2, extra])
    want = enc.transform({"x": probe})["cat"]
    np.testing.assert_array_equal(RawEncoder(state).encode({"x": probe})["cat"], want)
    cells = [None if v != v else repr(float(v)) for v in probe]  # text cells, "" / None = missing
    np.testing.assert_array_equal(RawEncoder(state).encode({"x": cells})["cat"], want)
    np.testing.assert_array_equal(FittedEncoders.from_json(state).transform({"x": probe})["cat"], want)


# ----------------------------------------------------------------------------- the columns


def zero_inflated(n: int, rng: np.random.Generator, zeros: float = 0.92) -> np.ndarray:
    rest = np.exp(rng.uniform(np.log(100), np.log(99999), n)).round()
    return np.where(rng.random(n) < zeros, 0.0, rest)


def test_zero_inflated_column_keeps_its_information() -> None:
    x = zero_inflated(20_000, np.random.default_rng(0))
    enc = fit(x, 10)
    assert n_buckets(enc) == 10
    got = ids(enc, x)
    zero_id = ids(enc, [0.0])[0]
    np.testing.assert_array_equal(got == zero_id, x == 0)  # the zeros and nothing else
    rest = np.bincount(got[x > 0] - FIRST, minlength=10)[1:]  # nine buckets share the rest
    assert rest.min() > 0.9 * rest.mean() and rest.max() < 1.1 * rest.mean()


def test_mass_point_in_the_middle_gets_its_own_bucket() -> None:
    rng = np.random.default_rng(1)
    x = np.where(rng.random(10_000) < 0.3, 50.0, rng.uniform(0, 100, 10_000))
    enc = fit(x, 8)
    assert n_buckets(enc) == 8
    got, mid = ids(enc, x), ids(enc, [50.0])[0]
    np.testing.assert_array_equal(got == mid, x == 50.0)
    below, above = np.unique(got[x < 50]), np.unique(got[x > 50])
    assert below.max() < mid < above.min() and below.size + above.size == 7


def test_column_without_mass_points_keeps_the_plain_quantile_edges() -> None:
    """A column with no value above 1/buckets of the rows is fitted as before (np.quantile),
    so its buckets did not move."""
    x = np.random.default_rng(2).lognormal(size=5000)
    x[::50] = np.nan
    edges = np.unique(np.quantile(x[np.isfinite(x)], np.linspace(0, 1, 11)))
    assert fit(x, 10).field("x").edges == edges.tolist()


def test_fit_bucket_edges_docstring_examples() -> None:
    from dpn_jax.buckets import bucketize, fit_bucket_edges  # new in encoder version 2

    assert fit_bucket_edges([0.0] * 93 + [1, 2, 3, 4, 5, 6, 7], 4) == [0.0, 1.0, 3.0, 5.0, 7.0]
    assert fit_bucket_edges([5, 5, 9], 10) == [5.0, 9.0, 9.0]
    assert fit_bucket_edges([NAN, INF], 10) == []
    np.testing.assert_array_equal(bucketize([-1, 0, 0.5, 1, 2.9, 3, 7, 8, NAN], [0, 1, 3, 5, 7]),
                                  [0, 0, 0, 1, 1, 2, 3, 3, -1])
    np.testing.assert_array_equal(bucketize([1, NAN], [], first=2, missing=1), [1, 1])


# ----------------------------------------------------------------------------- old bundles


def _old_fit_edges(x: np.ndarray, buckets: int) -> list[float]:
    """How encoder version 1 (dpn-jax up to 66caf20) fitted edges."""
    ok = x[np.isfinite(x)]
    return np.unique(np.quantile(ok, np.linspace(0.0, 1.0, buckets + 1))).tolist() if ok.size else []


def test_bundle_with_old_edges_scores_as_it_was_trained(tmp_path: Path, monkeypatch) -> None:
    """A bundle stores its edges; the lookup of stored edges did not change, so a bundle fitted
    by the old rule loads and encodes raw rows exactly as its training data was encoded."""
    import dpn_jax.data.encode as encode
    from dpn_jax.data.schema import Dataset
    from dpn_jax.models import build_model
    from dpn_jax.serving.bundle import write_bundle

    rng = np.random.default_rng(3)
    n = 400
    train = {"clicks": zero_inflated(n, rng), "age": rng.uniform(18, 70, n).round(), "y": rng.random(n) < 0.3}
    spec = numeric_spec(6, "clicks", "age")
    monkeypatch.setattr(encode, "fit_bucket_edges", _old_fit_edges)
    old = fit_encoders(spec, train)  # what the old dpn-jax wrote into encoders.json
    monkeypatch.undo()
    assert old.field("clicks").edges == [0.0, train["clicks"].max()]  # the bug: one bucket

    raw = {"clicks": [0.0, 50.0, 150.0, 1e6, -3.0, NAN, None], "age": [10, 18, 40.5, 70, 99, None, 33]}

    def old_ids(name: str) -> np.ndarray:  # the old lookup, written out
        edges, x = old.field(name).edges, np.array([NAN if v is None else v for v in raw[name]], float)
        return np.where(np.isfinite(x), FIRST + np.searchsorted(edges[1:-1], x, side="right"), OOV)

    encoded = {"cat": np.zeros((len(raw["age"]), 2), np.int32), "num": np.zeros((len(raw["age"]), 0), np.float32)}
    for f in ("clicks", "age"):
        info = old.schema.field(f)
        encoded["cat"][:, info.column] = info.offset + old_ids(f)

    net = build_model("fm", old.schema)
    variables = net.init(jax.random.PRNGKey(0), encoded)
    split = old.transform(train)
    ds = Dataset("t", old.schema, split, split, split, meta={"encoders": old.to_json()})
    write_bundle(tmp_path / "b", model="fm", model_config={"embedding_dim": 10}, train_config={}, seed=0,
                 params_bytes=serialization.to_bytes({"params": variables["params"], "batch_stats": {}}),
                 dataset=ds, data="old.yaml", results={"test_auc": 0.5})
    model = dpn_jax.load(tmp_path / "b")
    np.testing.assert_array_equal(model.encode(raw)["cat"], encoded["cat"])
    np.testing.assert_array_equal(RawEncoder(old.to_json()).encode(raw)["cat"], encoded["cat"])
    want = jax.nn.sigmoid(net.apply(variables, encoded))
    np.testing.assert_allclose(model.predict(raw), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- cache and log lines


def test_encoder_version_is_part_of_the_cache_key(tmp_path: Path, monkeypatch) -> None:
    """Encodings cached by the old encoder are never read back: the key names the version."""
    from dpn_jax.data import encode

    assert encode.ENCODER_VERSION >= 2
    (tmp_path / "d.csv").write_text("y,x\n1,0\n0,5\n")
    spec = DatasetSpec(name="t", format="csv", label="y", fields=numeric_spec(4).fields,
                       train=(tmp_path / "d.csv",))
    key = cache.cache_key(spec)
    monkeypatch.setattr(cache, "ENCODER_VERSION", encode.ENCODER_VERSION - 1)
    assert cache.cache_key(spec) != key


def test_each_bucketised_field_gets_a_log_line_and_a_constant_one_a_warning(tmp_path: Path) -> None:
    from dpn_jax.data.encode import bucket_notes

    rng = np.random.default_rng(4)
    n = 2000
    clicks = zero_inflated(n, rng, zeros=0.995)  # still 99.5% in one bucket after the fix
    age = rng.uniform(18, 70, n).round(1)
    lines = ["y,clicks,age"] + [f"{int(rng.random() < 0.2)},{c:g},{a:g}" for c, a in zip(clicks, age, strict=True)]
    lines[5] = "0,,40"  # one missing value
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "s.yaml").write_text(
        "name: t\nformat: csv\ntrain: d.csv\nlabel: y\nsplit: {valid: 0.1, test: 0.1}\nfields:\n"
        "  - {name: clicks, type: numeric, buckets: 10}\n  - {name: age, type: numeric, buckets: 10}\n"
    )
    ds = load_dataset(tmp_path / "s.yaml", cache_dir=tmp_path / "cache")
    stats = ds.meta["bucket_stats"]
    assert stats["age"]["buckets"] == 10 and stats["age"]["largest_share"] < 0.15
    train_clicks = ds.train["cat"][:, ds.schema.field("clicks").column] - ds.schema.field("clicks").offset
    assert stats["clicks"]["largest_share"] == pytest.approx(np.bincount(train_clicks).max() / len(train_clicks))
    notes = bucket_notes(ds.meta)
    assert [s.split(":")[0] for s in notes] == ["data  bucketised clicks", "warn  bucketised clicks is nearly "
                                                "constant", "data  bucketised age"]
    assert "10 buckets" in notes[2] and "of train rows" in notes[2]
