"""Serving: train -> bundle -> dpn_jax.load -> predict on raw rows; tampered bundles are rejected."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from flax import serialization
from test_serving_data import eval_scores, read_raw, trained_bundle

import dpn_jax
from dpn_jax.data.schema import OOV
from dpn_jax.errors import DpnError
from dpn_jax.metrics import auc, logloss_from_logits
from dpn_jax.serving.bundle import BUNDLE_FORMAT_VERSION, BundleError, write_bundle

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return trained_bundle(tmp_path_factory, "dnn")


def test_bundle_is_self_contained(bundle: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION and manifest["model"] == "dnn"
    assert set(manifest["files"]) == {"model.json", "params.msgpack", "schema.json", "encoders.json",
                                      "dataset.json", "results.json", "spec.yaml"}
    assert {"jax", "flax", "dpn_jax"} <= set(manifest["versions"])
    assert "test_auc" in manifest["metrics"]
    model = json.loads((bundle / "model.json").read_text())
    assert model["config"]["hidden"] == [16, 8] and model["config"]["embedding_dim"] == 10
    assert model["train"]["batch_size"] == 128
    enc = json.loads((bundle / "encoders.json").read_text())
    by_name = {f["name"]: f for f in enc["fields"]}
    assert by_name["age"]["edges"] and by_name["price"]["std"] > 0
    assert by_name["hist"]["share_vocab"] == "item_id" and by_name["genres"]["max_len"] == 3
    data = json.loads((bundle / "dataset.json").read_text())
    assert data["spec"]["label"] == "clicked" and data["raw_columns"]["price"] == "float"


def test_predict_raw_rows_equals_evaluation_scores(bundle: Path) -> None:
    model = dpn_jax.load(bundle)
    spec = bundle.parent / "spec.yaml"
    expected, labels = eval_scores(model, spec)
    raw = read_raw(bundle.parent / "test.csv")  # the raw test file, cells as text, "" = missing
    got = model.predict(raw)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, **TOL)
    # ... and these are the parameters training evaluated: its test metrics come back.
    results = json.loads((bundle / "results.json").read_text())
    assert auc(labels, expected) == pytest.approx(results["test_auc"], abs=1e-9)
    logits = np.log(got / (1 - got))
    assert logloss_from_logits(labels, logits) == pytest.approx(results["test_logloss"], abs=1e-4)

    # Other containers and batch sizes give the same scores in the same order.
    np.testing.assert_allclose(model.predict(pacsv.read_csv(bundle.parent / "test.csv")), expected, **TOL)
    np.testing.assert_allclose(model.predict(raw, batch_size=5), expected, **TOL)
    rev = {k: v[::-1] for k, v in raw.items()}
    np.testing.assert_allclose(model.predict(rev), expected[::-1], **TOL)
    encoded = model.encode(raw)
    np.testing.assert_allclose(model.predict(encoded), expected, **TOL)  # encoded arrays as is


class _Frame:
    """The slice of the pandas API predict relies on (pandas is optional)."""

    def __init__(self, cols: dict) -> None:
        self._cols = {k: np.asarray(v, dtype=object) for k, v in cols.items()}
        self.columns = list(cols)
        self.iloc = None

    def __getitem__(self, key):
        col = self._cols[key]
        return type("Series", (), {"to_numpy": lambda self: col})()


def test_unseen_missing_and_overlong_inputs(bundle: Path) -> None:
    model = dpn_jax.load(bundle)
    schema = model.schema
    rows = {
        "user_id": ["u1", "never-seen", None, float("nan")],
        "age": [30.0, None, float("nan"), "55"],
        "price": ["3.5", "", None, float("nan")],
        "genres": ["a|b", "a|b|c|d|e|zz", None, ["a", "qq"]],
        "item_id": ["i1", "i999", "", 7],
        "hist": ["i1^i2^i3^i4^i5^i6^i7", "", "i999^i1", None],
        "unused": [1, 2, 3, 4],
    }
    enc = model.encode(rows)
    user, age, item = (schema.field(n) for n in ("user_id", "age", "item_id"))
    assert enc["cat"][1, user.column] == user.offset + OOV
    assert enc["cat"][2, user.column] == enc["cat"][3, user.column]  # None and NaN: both missing
    assert (enc["cat"][1:3, age.column] == age.offset + OOV).all()  # missing bucketised -> OOV
    assert enc["cat"][1, item.column] == item.offset + OOV
    np.testing.assert_array_equal(enc["num"][1:, 0], 0.0)  # missing dense -> the train mean
    hist, genres = schema.field("hist"), schema.field("genres")
    idx = {t: model.encoders.field("item_id").index()[t] for t in ("i4", "i5", "i6", "i7")}
    np.testing.assert_array_equal(enc["seq/hist"][0], [hist.offset + idx[t] for t in ("i4", "i5", "i6", "i7")])
    assert (enc["seq/hist"][1] == hist.pad_id).all() and enc["seq/hist"][2, 0] == hist.offset + OOV
    assert enc["seq/genres"][1, -1] == genres.offset + OOV  # kept the last 3: "d", "e", "zz"
    probs = model.predict(rows)
    assert probs.shape == (4,) and np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(model.predict(_Frame(rows)), probs, **TOL)
    table = pa.table({k: pa.array([None if isinstance(v, float) and v != v else v for v in vals])
                      for k, vals in rows.items() if k not in ("age", "item_id", "genres")}
                     | {"age": pa.array([30.0, None, None, 55.0]), "item_id": pa.array(["i1", "i999", "", "7"]),
                        "genres": pa.array(["a|b", "a|b|c|d|e|zz", None, "a|qq"])})
    np.testing.assert_allclose(model.predict(table), probs, **TOL)
    pd = pytest.importorskip("pandas")
    np.testing.assert_allclose(model.predict(pd.DataFrame(rows)), probs, **TOL)


def test_bad_inputs_are_one_clear_line(bundle: Path) -> None:
    model = dpn_jax.load(bundle)
    raw = read_raw(bundle.parent / "test.csv")
    with pytest.raises(DpnError, match="'price' is missing"):
        model.predict({k: v for k, v in raw.items() if k != "price"})
    with pytest.raises(DpnError, match="'price' row 2: cannot parse 'cheap'"):
        model.predict({**raw, "price": ["1", "cheap"] + raw["price"][2:]})
    with pytest.raises(DpnError, match="dict of columns"):
        model.predict([1, 2, 3])


def _copy(bundle: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(bundle, d)
    return d


@pytest.mark.parametrize("tamper, fragments", [
    (lambda d: (d / "encoders.json").unlink(), ["encoders.json is missing", "retrain"]),
    (lambda d: (d / "bundle.json").unlink(), ["bundle.json not found", "older dpn-jax"]),
    (lambda d: _edit(d / "bundle.json", format_version=99), ["version 99", "reads version 1"]),
    (lambda d: _edit(d / "model.json", config={"hidden": [32, 8]}), ["model.json was modified", "restore"]),
    (lambda d: (d / "params.msgpack").write_bytes(b"\x00" * 10), ["params.msgpack was modified"]),
])  # fmt: skip
def test_tampered_bundles_are_rejected(bundle: Path, tmp_path: Path, tamper, fragments) -> None:
    d = _copy(bundle, tmp_path)
    tamper(d)
    with pytest.raises(BundleError) as err:
        dpn_jax.load(d)
    msg = str(err.value)
    assert "\n" not in msg and str(d) in msg
    for f in fragments:
        assert f in msg, (f, msg)


def _edit(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    for k, v in changes.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) else v
    path.write_text(json.dumps(doc))


def _list_outside(d: Path, name: str) -> None:
    import hashlib

    outside = d.parent / "outside.json"
    outside.write_text('{"secret": 1}')
    _edit(d / "bundle.json", files={name: hashlib.sha256(outside.read_bytes()).hexdigest()})


def _link_outside(d: Path, name: str) -> None:
    outside = d.parent / f"outside-{name}"
    shutil.copyfile(d / name, outside)  # the same bytes: its checksum still matches
    (d / name).unlink()
    (d / name).symlink_to(outside)


@pytest.mark.parametrize("escape", [
    lambda d: _list_outside(d, "../outside.json"),
    lambda d: _list_outside(d, str(d.parent / "outside.json")),
    lambda d: _link_outside(d, "model.json"),
    lambda d: _link_outside(d, "bundle.json"),
], ids=["dot-dot", "absolute", "symlinked-part", "symlinked-manifest"])  # fmt: skip
def test_bundle_files_must_stay_inside_the_bundle(bundle: Path, tmp_path: Path, capsys, escape) -> None:
    from dpn_jax.cli import main

    d = _copy(bundle, tmp_path)
    escape(d)
    with pytest.raises(BundleError, match=r"bundle\.json: bundle file '.+' is not inside the bundle folder"):
        dpn_jax.load(d)
    src = bundle.parent / "test.csv"
    assert main(["predict", "--model", str(d), "--input", str(src), "--output", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not inside the bundle folder" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o.csv").exists()


def test_consistent_checksums_still_need_matching_parameters(bundle: Path, tmp_path: Path) -> None:
    """A config edited AND re-checksummed no longer fits the parameters: rejected, not mis-scored."""
    import hashlib

    d = _copy(bundle, tmp_path)
    _edit(d / "model.json", config={"hidden": [32, 8]})
    _edit(d / "bundle.json", files={"model.json": hashlib.sha256((d / "model.json").read_bytes()).hexdigest()})
    with pytest.raises(BundleError, match="parameters do not match model 'dnn'"):
        dpn_jax.load(d)
    assert dpn_jax.load(bundle).predict(read_raw(bundle.parent / "test.csv")).shape == (150,)


def test_synthetic_bundle_takes_value_indices_or_encoded_arrays(tmp_path: Path, tiny_synthetic) -> None:
    """Built-in synthetic data is generated encoded: its bundle's raw format is one column per
    field holding the value index; the encoded arrays work too and give the same scores."""
    from dpn_jax.models import build_model

    ds = tiny_synthetic
    net = build_model("fm", ds.schema)
    test = {k: np.asarray(v[:50]) for k, v in ds.test.items()}
    variables = net.init(jax.random.PRNGKey(0), test)
    write_bundle(tmp_path, model="fm", model_config={"embedding_dim": 10}, train_config={}, seed=0,
                 params_bytes=serialization.to_bytes({"params": variables["params"], "batch_stats": {}}),
                 dataset=ds, data="synthetic", results={"test_auc": 0.5})
    model = dpn_jax.load(tmp_path)
    expected = jax.nn.sigmoid(net.apply(variables, test))
    np.testing.assert_allclose(model.predict(test), expected, **TOL)
    values = {f.name: test["cat"][:, f.column] - f.offset - 2 for f in ds.schema.fields}
    np.testing.assert_allclose(model.predict(values), expected, **TOL)
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["builtin"] == "synthetic" and info["synthetic"]["fields"] == 4


def test_an_option_a_bundle_predates_gets_its_legacy_value() -> None:
    """dpn_field bundles saved before ``context_norm`` existed had no context LayerNorm: they
    rebuild without one (and load); a bundle that records the option keeps its value."""
    from dpn_jax.benchmark.schemas import frappe_like_schema
    from dpn_jax.models import legacy_options, model_options
    from dpn_jax.serving.predictor import rebuild_model

    schema = frappe_like_schema()
    old = {k: v for k, v in model_options("dpn_field").items() if k != "context_norm"}
    assert legacy_options("dpn_field", old) == {"context_norm": False}
    assert rebuild_model("dpn_field", old, schema).context_norm is False
    assert rebuild_model("dpn_field", {**old, "context_norm": True}, schema).context_norm is True
    assert model_options("dpn_field")["context_norm"] is True  # today's default is unchanged
    assert legacy_options("dnn", {}) == {}
