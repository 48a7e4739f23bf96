"""The benchmark harness: workload shapes, one tiny harness run, the CLI, the FuxiCTR peer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dpn_jax.benchmark.harness import format_markdown, run_bench
from dpn_jax.benchmark.schemas import criteo_like_schema
from dpn_jax.benchmark.workloads import get_workload, zipf_ids
from dpn_jax.cli import main
from dpn_jax.errors import ConfigError
from dpn_jax.train.config import TrainConfig


def test_criteo_workload_shape_and_zipf_ids():
    schema = criteo_like_schema()
    assert len(schema.cat_fields) == 39
    assert sum(f.vocab_size - 2 for f in schema.cat_fields) == 1_000_000
    rows = get_workload("criteo").rows(2000, seed=0)
    assert rows["cat"].shape == (2000, 39) and rows["cat"].dtype == np.int32
    for f in schema.cat_fields:  # every id inside its own field's block, never pad/OOV
        col = rows["cat"][:, f.column]
        assert col.min() >= f.offset + 2 and col.max() < f.offset + f.vocab_size
    # Zipf: the most frequent id of a field takes a large share, far above uniform 1/25641.
    ids = zipf_ids(np.random.default_rng(0), 25_641, 20_000)
    top = np.bincount(ids).max() / ids.size
    assert 0.05 < top < 0.3


def test_unknown_workload_is_named():
    with pytest.raises(ConfigError, match="'criteo2' is not known"):
        get_workload("criteo2")


def test_tiny_harness_run_reports_every_row(tmp_path, capsys):
    result = run_bench(["dnn", "lr"], workloads=["frappe"], batch_size=64, steps=2,
                       latency_batches=(1, 4), requests=2, log=lambda s: None)
    got = [(r["model"], r["workload"], r["impl"]) for r in result["rows"]]
    assert got == [("dnn", "frappe", "dpn-jax adam"), ("dnn", "frappe", "dpn-jax lazy_adam"),
                   ("lr", "frappe", "dpn-jax adam"), ("lr", "frappe", "dpn-jax lazy_adam")]
    for r in result["rows"]:
        assert r["samples_per_s"] > 0 and r["compile_s"] > 0 and r["num_params"] > 0
        assert set(r["latency_ms"]) == {1, 4}
        assert all(p50 <= p99 for p50, p99 in r["latency_ms"].values())
    assert set(result["pipeline"]) == {"frappe"} and result["pipeline"]["frappe"] > 0
    text = format_markdown(result, "dpn-jax bench ...")
    assert "| dnn | frappe | dpn-jax lazy_adam |" in text and "1.00x" in text  # dnn's cost vs itself
    assert result["rows"][2]["cost_vs_dnn"] == pytest.approx(
        result["rows"][0]["samples_per_s"] / result["rows"][2]["samples_per_s"])


def test_matmul_dtypes_add_rows_for_models_with_the_option():
    result = run_bench(["dnn", "lr"], workloads=["frappe"], optimizers=("adam",), batch_size=64,
                       steps=2, latency_batches=(1,), requests=2, matmul_dtypes=("float32", "bfloat16"),
                       log=lambda s: None)
    got = [(r["model"], r["impl"]) for r in result["rows"]]
    # lr has no Dense tower: float32 only
    assert got == [("dnn", "dpn-jax adam"), ("dnn", "dpn-jax adam bfloat16"), ("lr", "dpn-jax adam")]
    with pytest.raises(ConfigError, match="matmul_dtype='float16'"):
        run_bench(["dnn"], matmul_dtypes=("float16",), log=lambda s: None)


def test_rounds_keep_each_rows_median_round():
    logged = []
    result = run_bench(["lr"], workloads=["frappe"], optimizers=("adam",), batch_size=64, steps=2,
                       latency_batches=(1,), requests=2, rounds=3, log=logged.append)
    assert len(result["rows"]) == 1 and result["rounds"] == 3
    per_round = [float(re.search(r"([\d,]+) samples/s", line)[1].replace(",", "")) for line in logged
                 if "(round" in line]
    assert len(per_round) == 3
    # the row's samples/s is one of the rounds' (rounded in the log): their median
    assert result["rows"][0]["samples_per_s"] == pytest.approx(sorted(per_round)[1], rel=1e-3, abs=1)
    assert "median of 3 rounds" in format_markdown(result, "dpn-jax bench --rounds 3")
    with pytest.raises(ConfigError, match="--rounds 0"):
        run_bench(["lr"], rounds=0, log=lambda s: None)


def test_behaviour_models_get_the_behaviour_workload():
    from dpn_jax.benchmark.harness import workloads_for

    assert workloads_for("din", None) == ["behaviour"]
    assert workloads_for("dnn", None) == ["criteo", "frappe"]
    assert workloads_for("dnn", ["frappe", "behaviour"]) == ["frappe"]


def test_cli_writes_markdown_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--models", "lr", "--workloads", "frappe", "--optimizers", "adam",
                 "--batch-size", "32", "--steps", "2", "--batches", "1", "--requests", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["rows"][0]["model"] == "lr" and "command" in data
    assert "| lr | frappe | dpn-jax adam |" in out.with_suffix(".md").read_text()
    assert main(["bench", "--models", "lr", "--optimizers", "sgd"]) == 2
    assert "not known" in capsys.readouterr().err


def test_fuxictr_peer_matches_our_parameter_count():
    """Same architecture on both sides: the parameter counts differ only by the biases FuxiCTR's
    MLP_Block keeps in front of BatchNorm (1200 = 400+400+400; BatchNorm's shift makes them
    redundant, our MLP leaves them out)."""
    from dpn_jax.benchmark import peer_fuxictr

    why = peer_fuxictr.available()
    if why:
        pytest.skip(f"the optional peer is not installed ({why})")
    result = run_bench(["dnn", "dcnv2"], workloads=["frappe"], optimizers=("adam",), batch_size=64,
                       steps=2, peer="fuxictr", latency_batches=(1,), requests=2, log=lambda s: None)
    rows = {(r["model"], r["impl"].split()[0]): r for r in result["rows"]}
    for m in ("dnn", "dcnv2"):
        assert rows[(m, "fuxictr")]["num_params"] - rows[(m, "dpn-jax")]["num_params"] == 1200
        assert rows[(m, "fuxictr")]["samples_per_s"] > 0


def test_cpu_model_is_read_from_cpuinfo(tmp_path):
    from dpn_jax.benchmark.harness import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert cpu_model(str(info)) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_model(str(tmp_path / "absent")) != ""  # falls back, never raises


def test_loop_rows_time_fit_beside_the_step_they_run(capsys):
    result = run_bench(["lr"], workloads=["frappe"], optimizers=("adam",), batch_size=64, steps=3,
                       latency_batches=(1,), requests=2, loop=True, steps_per_dispatch=(1, 2),
                       data_on_device=("false", "true"), log=lambda s: None)
    by = {r["impl"]: r for r in result["rows"]}
    assert list(by) == ["dpn-jax adam", "dpn-jax adam scan 2", "dpn-jax adam fit K=1 data host",
                        "dpn-jax adam fit K=1 data device", "dpn-jax adam fit K=2 data host",
                        "dpn-jax adam fit K=2 data device"]
    assert result["loop_epoch_steps"] == {"frappe": 4}  # 3 steps rounded up to a multiple of 2
    text = format_markdown(result, "dpn-jax bench --loop")
    assert "| loop / step |" in text and "4 (frappe) batches per epoch" in text
    for k, step in ((1, "dpn-jax adam"), (2, "dpn-jax adam scan 2")):
        for where in ("host", "device"):
            r = by[f"dpn-jax adam fit K={k} data {where}"]
            assert r["samples_per_s"] > 0 and r["num_params"] == by[step]["num_params"]
            assert r["loop_vs_step"] == pytest.approx(r["samples_per_s"] / by[step]["samples_per_s"])
    assert by["dpn-jax adam"]["loop_vs_step"] is None
    with pytest.raises(ConfigError, match="--steps-per-dispatch"):
        run_bench(["lr"], loop=True, steps_per_dispatch=(0,), log=lambda s: None)
    with pytest.raises(ConfigError, match="--data-on-device"):
        run_bench(["lr"], loop=True, data_on_device=("auto",), log=lambda s: None)
    assert main(["bench", "--models", "lr", "--loop", "--steps-per-dispatch", "1,x"]) == 2
    assert "--steps-per-dispatch '1,x': expected comma-separated integers" in capsys.readouterr().err


def test_fit_row_is_the_median_epoch_after_the_first(monkeypatch):
    """samples/s = train rows / the median of the epochs' recorded seconds, the first (which
    compiles) left out; BatchNorm re-estimation in a real epoch's proportion."""
    from types import SimpleNamespace

    from dpn_jax.benchmark import measure

    data = measure.workload_dataset(get_workload("frappe"), 640, 64)
    seen = {}

    def fake_fit(model, data, cfg, **kw):
        seen["cfg"] = cfg
        return SimpleNamespace(history=[{"epoch_seconds": s} for s in (9.0, 2.0, 4.0, 3.0)],
                               compile_seconds=1.5, num_params=7)

    monkeypatch.setattr(measure, "fit", fake_fit)
    m = measure.measure_fit("lr", data, TrainConfig(batch_size=64), epochs=4)
    assert m.samples_per_s == pytest.approx(640 / 3.0) and m.step_ms == pytest.approx(300.0)
    assert m.step_ms_spread == pytest.approx((400.0 - 200.0) / 2) and m.compile_s == 1.5
    assert (seen["cfg"].max_epochs, seen["cfg"].bn_recalibrate_batches) == (4, 1)
