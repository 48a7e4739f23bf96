"""Serving: `dpn-jax export` -> load_exported (jax + numpy only), `dpn-jax predict` streaming,
`dpn-jax bench --latency`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from test_serving_data import eval_scores, read_raw, trained_bundle

import dpn_jax
from dpn_jax.cli import main
from dpn_jax.serving.exported import ExportError, load_exported

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return trained_bundle(tmp_path_factory, "dnn")


@pytest.fixture(scope="module")
def exported(bundle: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "dnn"
    assert main(["export", "--model", str(bundle), "--out", str(out)]) == 0
    return out


def test_exported_scores_equal_evaluation_scores(bundle: Path, exported: Path) -> None:
    meta = json.loads((exported / "export.json").read_text())
    assert meta["model"] == "dnn" and set(meta["platforms"]) == {"cpu", "cuda"}
    assert [x["name"] for x in meta["inputs"]] == ["cat", "num", "seq/genres", "seq/hist"]
    served = load_exported(exported)
    expected, _ = eval_scores(dpn_jax.load(bundle), bundle.parent / "spec.yaml")
    raw = read_raw(bundle.parent / "test.csv")
    for batch_size in (1, 64):  # one symbolic-batch program, two concrete batch sizes
        np.testing.assert_allclose(served.predict(raw, batch_size=batch_size), expected, **TOL)
    encoded = dpn_jax.load(bundle).encode(raw)
    np.testing.assert_allclose(served.predict(encoded, batch_size=16), expected, **TOL)


def test_loader_needs_only_jax_and_numpy(bundle: Path, exported: Path) -> None:
    script = textwrap.dedent(f"""
        import csv, json, sys
        from dpn_jax.serving import load_exported
        with open({str(bundle.parent / 'test.csv')!r}, newline="") as fh:
            rows = list(csv.DictReader(fh))
        probs = load_exported({str(exported)!r}).predict({{k: [r[k] for r in rows] for k in rows[0]}})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "optax", "pyarrow", "yaml", "pandas")
                       or m.startswith(("dpn_jax.models", "dpn_jax.data", "dpn_jax.nn", "dpn_jax.train")))
        print(json.dumps({{"heavy": heavy, "probs": probs.tolist()}}))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    expected, _ = eval_scores(dpn_jax.load(bundle), bundle.parent / "spec.yaml")
    np.testing.assert_allclose(out["probs"], expected, **TOL)


def test_broken_exports_are_rejected(exported: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "e"
    shutil.copytree(exported, d)
    meta = json.loads((d / "export.json").read_text())
    (d / "export.json").write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(ExportError, match="version 7 is not readable"):
        load_exported(d)
    (d / "export.json").write_text(json.dumps(meta))
    (d / "model.jaxexport").unlink()
    with pytest.raises(ExportError, match="model.jaxexport is missing"):
        load_exported(d)
    with pytest.raises(ExportError, match="export.json not found"):
        load_exported(tmp_path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_command_streams_in_order(bundle: Path, tmp_path: Path, capsys, suffix: str) -> None:
    src = bundle.parent / "test.csv"
    if suffix == ".parquet":  # a parquet input too: written from the csv, cells kept as text
        table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(
            column_types={c: "string" for c in read_raw(src)}, strings_can_be_null=True))
        src = tmp_path / "test.parquet"
        pq.write_table(table, src, row_group_size=40)
    out = tmp_path / f"scores{suffix}"
    code = main(["predict", "--model", str(bundle), "--input", str(src), "--output", str(out),
                 "--id-column", "id", "--batch-size", "7"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 150
    table = pacsv.read_csv(out) if suffix == ".csv" else pq.read_table(out)
    assert table.column_names == ["id", "probability"]
    raw = read_raw(bundle.parent / "test.csv")
    assert table.column("id").to_pylist() == raw["id"]  # every row, in input order
    in_memory = dpn_jax.load(bundle).predict(raw)
    np.testing.assert_allclose(table.column("probability").to_numpy(), in_memory, **TOL)


def test_predict_command_reads_a_headerless_csv(bundle: Path, tmp_path: Path, capsys) -> None:
    """``--columns id,...``: a csv without a header line (Criteo's layout), its columns the id
    then the model's raw columns in the bundle's order, scores as the file with a header."""
    raw = read_raw(bundle.parent / "test.csv")
    features = list(dpn_jax.load(bundle).raw_columns)
    src = tmp_path / "headerless.csv"
    src.write_text("".join(",".join([raw["id"][i], *(raw[c][i] for c in features)]) + "\n"
                           for i in range(len(raw["id"]))))
    out = tmp_path / "scores.csv"
    assert main(["predict", "--model", str(bundle), "--input", str(src), "--output", str(out),
                 "--id-column", "id", "--columns", "id,...", "--batch-size", "32"]) == 0
    capsys.readouterr()
    table = pacsv.read_csv(out)
    assert table.column("id").to_pylist() == raw["id"]
    np.testing.assert_allclose(table.column("probability").to_numpy(),
                               dpn_jax.load(bundle).predict(raw), **TOL)
    for spec, fragment in (("...", "--columns gave"), ("id,...,...", "'...' at most once"),
                           (f"id,{features[0]},...", "given twice"), ("id,,...", "comma-separated")):
        assert main(["predict", "--model", str(bundle), "--input", str(src), "--output",
                     str(tmp_path / "o.csv"), "--columns", spec]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], (spec, err)


def test_predict_command_errors_are_one_line(bundle: Path, tmp_path: Path, capsys) -> None:
    src = bundle.parent / "test.csv"
    cases = [
        (["--input", str(src), "--output", str(tmp_path / "o.txt")], "o.txt"),
        (["--input", str(src), "--output", str(tmp_path / "o.csv"), "--id-column", "nope"], "'nope' not found"),
        (["--input", str(tmp_path / "none.csv"), "--output", str(tmp_path / "o.csv")], "none.csv"),
    ]
    for extra, fragment in cases:
        assert main(["predict", "--model", str(bundle), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dpn-jax: error:") and fragment in err[0], err
    assert not (tmp_path / "o.csv").exists()
    assert main(["predict", "--model", str(tmp_path), "--input", str(src), "--output", str(tmp_path / "o.csv")]) == 2
    assert "bundle.json not found" in capsys.readouterr().err


def test_bench_latency_reports_a_table(capsys, tmp_path) -> None:
    out_base = tmp_path / "lat.v1"  # a dot in the name must not eat the suffix
    code = main(["bench", "--latency", "--models", "lr,fm", "--batches", "1,4", "--requests", "3",
                 "--out", str(out_base)])
    assert code == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and "model" not in ln]
    cells = [tuple(c.strip() for c in ln.strip("|").split("|")[:3]) for ln in lines]
    assert cells == [(m, b, p) for m in ("lr", "fm") for b in ("1", "4") for p in ("jit", "exported")]
    written = (tmp_path / "lat.v1.md").read_text()
    assert "Command: `" in written and "| lr | 1 | jit |" in written and "Machine:" in written
    record = json.loads((tmp_path / "lat.v1.json").read_text())
    assert [(r["model"], r["batch"], r["path"]) for r in record["rows"]] == [(m, int(b), p) for m, b, p in cells]
    assert main(["bench", "--latency", "--models", "nosuch"]) == 2


def test_behaviour_model_round_trips_through_bundle_and_export(tmp_path_factory) -> None:
    """dyjoint (feature DPO + Transformer encoder with the dynamic convolution + query-generated
    decoder) over the history that shares item_id's vocabulary: raw rows -> bundle -> predict and
    -> export -> load_exported give the scores evaluation gave, for two batch sizes."""
    bundle = trained_bundle(tmp_path_factory, "dyjoint")
    model = dpn_jax.load(bundle)
    expected, _ = eval_scores(model, bundle.parent / "spec.yaml")
    raw = read_raw(bundle.parent / "test.csv")  # includes over-long and unseen histories
    np.testing.assert_allclose(model.predict(raw, batch_size=7), expected, **TOL)
    out = tmp_path_factory.mktemp("export") / "dyjoint"
    assert main(["export", "--model", str(bundle), "--out", str(out)]) == 0
    served = load_exported(out)
    for batch_size in (1, 32):
        np.testing.assert_allclose(served.predict(raw, batch_size=batch_size), expected, **TOL)


def test_latency_uses_a_behaviour_schema_for_sequence_models() -> None:
    from dpn_jax.benchmark.schemas import behaviour_like_schema, is_behaviour_model, random_batch

    assert is_behaviour_model("dyjoint") and is_behaviour_model("din") and not is_behaviour_model("dpn")
    schema = behaviour_like_schema()
    batch = random_batch(schema, 64)
    for name in ("hist_item", "hist_cate"):
        f = schema.field(name)
        ids = batch[f"seq/{name}"]
        valid = ids != f.pad_id
        assert valid[:, 0].all() and (valid[:, :-1] >= valid[:, 1:]).all()  # right-padded, length >= 1
        assert ((ids[valid] >= f.offset + 2) & (ids[valid] < f.offset + f.vocab_size)).all()
