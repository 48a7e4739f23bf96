"""Mesh training (dpn_jax.train.sharding), the multi-process helpers and the CLI's --mesh errors.

The multi-device test runs one child process with 8 forced CPU devices (the flag must be set
before jax starts), training every mesh case there to share the start-up; the multi-process
test starts two jax.distributed processes of two CPU devices each (gloo collectives)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO

from dpn_jax.errors import ConfigError
from dpn_jax.train import distributed
from dpn_jax.train.sharding import parse_mesh, process_rows, process_shard


@pytest.mark.parametrize("spec, n, expected", [
    (None, 8, {"data": 8, "model": 1}),
    ("", 2, {"data": 2, "model": 1}),
    ("data=8", 8, {"data": 8, "model": 1}),
    ("data=4,model=2", 8, {"data": 4, "model": 2}),
    (" model = 2 , data = 4 ", 8, {"data": 4, "model": 2}),
    ("model=1", 1, {"data": 1, "model": 1}),
])
def test_parse_mesh(spec, n, expected):
    assert parse_mesh(spec, n) == expected


@pytest.mark.parametrize("spec, match", [
    ("batch=8", "unknown axis 'batch'; the axes are data and model"),
    ("data=4,model=4", r"data x model = 4 x 4 = 16 devices, but 8 are available.*data=8"),
    ("data=2", "must multiply to 8"),
    ("data=two", "data='two' is not an integer"),
    ("data=2.5", "is not an integer"),
    ("data=0,model=8", "must be >= 1"),
    ("data", "expected AXIS=SIZE"),
    ("data=8,data=8", "given twice"),
])
def test_parse_mesh_errors_name_the_option(spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse_mesh(spec, 8)
    assert str(err.value).startswith(f"--mesh {spec!r}")


def test_process_shard_tiles_every_batch():
    batches = [{"x": np.arange(b * 12, (b + 1) * 12), "y": np.arange(24).reshape(12, 2) + b} for b in range(3)]
    shards = [list(process_shard(batches, i, 4)) for i in range(4)]
    for b, batch in enumerate(batches):
        for key in batch:  # the four shares, in process order, are the global batch
            np.testing.assert_array_equal(np.concatenate([shards[i][b][key] for i in range(4)]), batch[key])
    assert [s[0]["x"].tolist() for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert process_rows(12, 3, 4) == slice(9, 12)
    assert list(process_shard(batches, 0, 1))[1]["x"].tolist() == batches[1]["x"].tolist()
    with pytest.raises(ConfigError, match="batch of 10 rows does not split over 4 processes.*multiple of 4"):
        list(process_shard([{"x": np.arange(10)}], 0, 4))
    with pytest.raises(ValueError, match="process_index 4"):
        process_rows(12, 4, 4)


def test_distributed_only_when_asked(monkeypatch):
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    assert not distributed.wanted()
    assert distributed.initialize() is False  # a plain run never touches jax.distributed
    assert distributed.wanted(num_processes=2) and distributed.wanted(auto=True)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert distributed.wanted()
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        distributed.check_args("10.0.0.1", 2, 0)
    with pytest.raises(ConfigError, match=r"--process-id 2: expected 0 \.\. 1"):
        distributed.check_args("h:1", 2, 2)
    with pytest.raises(ConfigError, match="--num-processes 0"):
        distributed.check_args(None, 0, None)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match=r"\$JAX_NUM_PROCESSES='two': expected an integer"):
        distributed.initialize()


def test_cli_bad_mesh_is_a_one_line_error(capsys):
    from dpn_jax.cli import main

    assert main(["train", "--model", "dnn", "--data", "synthetic", "--mesh", "data=3,model=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpn-jax: error: --mesh 'data=3,model=5': data x model = 3 x 5 = 15 devices")
    assert "\n" not in err


CHILD = textwrap.dedent('''
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)  # tiny programs: compile time dominates
    from dpn_jax.data.synthetic import make_synthetic
    from dpn_jax.models import build_model
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit
    from dpn_jax.train.sharding import make_mesh, place_batch

    data = make_synthetic(seed=3, rows=3000, fields=4, vocab=10)  # 2400 train rows, 48 table rows
    # 10 batches of 240 (divisible by 8) and 2 epochs: 20 steps; one eval batch of 304 rows.
    cfg = TrainConfig(seed=1, batch_size=240, eval_batch_size=304, max_epochs=2, patience=5,
                      bn_recalibrate_batches=2)
    devices = jax.devices()
    meshes = {"none": None, "data=8": make_mesh("data=8"), "data=4,model=2": make_mesh("data=4,model=2"),
              # 48 rows over 5: the table is padded to 50 rows
              "model=5": make_mesh("model=5", devices[:5])}
    out = {"devices": len(devices)}

    def spec(x):
        return str(tuple(x.sharding.spec))

    for name, mesh in meshes.items():
        seen = {}

        def on_epoch(epoch, state):
            leaves = jax.tree_util.tree_leaves_with_path(state)
            seen["tables"] = sorted({(jax.tree_util.keystr(p), spec(x), x.shape[0]) for p, x in leaves
                                     if jax.tree_util.keystr(p).endswith("['table']")})
            seen["others"] = sorted({spec(x) for p, x in leaves
                                     if not jax.tree_util.keystr(p).endswith("['table']")})

        model = build_model("dnn", data.schema, hidden=(16, 8), dropout=0.1)
        r = fit(model, data, cfg, log=lambda s: None, progress=False, mesh=mesh,
                on_epoch=on_epoch if mesh is not None else None)
        out[name] = {"params": jax.tree.map(lambda x: np.asarray(x).tolist(), r.params),
                     "stats": jax.tree.map(lambda x: np.asarray(x).tolist(), r.batch_stats),
                     "valid": r.valid, "loss": [h["train_loss"] for h in r.history], **seen}
    m = meshes["data=4,model=2"]
    b = {k: v[:240] for k, v in data.train.items()}
    out["batch_spec"] = spec(place_batch(b, m)["cat"])
    out["label_spec"] = spec(place_batch(b, m)["label"])
    out["ragged_spec"] = spec(place_batch({k: v[:10] for k, v in data.train.items()}, m)["cat"])
    print("RESULT" + json.dumps(out))
''')


def _max_abs_diff(a, b) -> float:
    import jax

    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)),
                         a, b, is_leaf=lambda x: isinstance(x, list))
    return max(jax.tree.leaves(diffs))


def test_mesh_training_matches_one_device_and_keeps_its_layout():
    env = dict(os.environ, JAX_PLATFORMS="cpu", DPN_XLA_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["devices"] == 8
    ref = out["none"]
    for name in ("data=8", "data=4,model=2", "model=5"):
        got = out[name]
        # Same program, other reduction order: after 20 steps the parameters differed by at most
        # 6e-8 and the BatchNorm statistics by 1.8e-7 (measured); 1e-6 leaves 5x headroom and
        # still catches a wrong gradient scale or a skipped/duplicated row (>= 1e-4 here).
        assert _max_abs_diff(got["params"], ref["params"]) < 1e-6, name
        assert _max_abs_diff(got["stats"], ref["stats"]) < 1e-6, name
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
        # logloss is smooth in the logits; AUC is a rank statistic where a 1e-7 logit change may
        # swap a near-tied pair: one swap moves it by 1/(positives x negatives) ~ 5e-5 here.
        assert got["valid"]["logloss"] == pytest.approx(ref["valid"]["logloss"], rel=1e-5)
        assert got["valid"]["auc"] == pytest.approx(ref["valid"]["auc"], abs=5e-4)
    # the table and its two Adam moments are split by rows over "model"; everything else replicated
    for name, rows in (("data=8", 48), ("data=4,model=2", 48), ("model=5", 50)):
        tables = out[name]["tables"]
        assert len(tables) == 3 and {t[1] for t in tables} == {"('model', None)"}, tables
        assert {t[2] for t in tables} == {rows}  # 48 rows pad to 50 over model=5 ...
        assert out[name]["others"] == ["()"]
    assert np.asarray(out["model=5"]["params"]["embedding"]["table"]).shape == (48, 10)  # ... and are cut off
    assert out["batch_spec"] == out["label_spec"] == "('data',)"
    assert out["ragged_spec"] == "()"  # 10 rows do not split over data=4: replicated


MP_CHILD = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.config.update("jax_disable_most_optimizations", True)
    from dpn_jax.train.distributed import initialize
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert initialize(f"127.0.0.1:{port}", 2, pid)
    from dpn_jax.data.synthetic import make_synthetic
    from dpn_jax.models import build_model
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit
    from dpn_jax.train.sharding import make_mesh
    data = make_synthetic(seed=3, rows=3000, fields=4, vocab=10)
    cfg = TrainConfig(seed=1, batch_size=240, eval_batch_size=304, max_epochs=1)
    mesh = make_mesh("data=2,model=2")  # data across the two processes, tables within each
    assert jax.process_count() == 2 and mesh.size == 4
    r = fit(build_model("dnn", data.schema, hidden=(8,), batch_norm=False), data, cfg, log=lambda s: None,
            progress=False, mesh=mesh)
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(r.params)}
    np.savez(f"{out}/params_{pid}.npz", **flat)
''')


def test_two_processes_train_like_one(tmp_path, tiny_synthetic):
    """jax.distributed on the CPU (gloo): two processes x two devices, one program."""
    import socket

    import jax

    from dpn_jax.models import build_model
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", DPN_XLA_CACHE="0")
    procs = [subprocess.Popen([sys.executable, "-c", MP_CHILD, str(i), port, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:  # the single-process reference meanwhile
        cfg = TrainConfig(seed=1, batch_size=240, eval_batch_size=304, max_epochs=1)
        ref = fit(build_model("dnn", tiny_synthetic.schema, hidden=(8,), batch_norm=False), tiny_synthetic, cfg,
                  log=lambda s: None, progress=False)
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any("gloo" in e.lower() and "not" in e.lower() and p.returncode for p, e in zip(procs, errs)):
        pytest.skip(f"no gloo CPU collectives in this jaxlib: {errs[0][-300:]}")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    ref_flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(ref.params)}
    for i in range(2):
        got = dict(np.load(tmp_path / f"params_{i}.npz"))
        assert got.keys() == ref_flat.keys()
        for k, v in ref_flat.items():  # same tolerance as above: same program, other sum order
            np.testing.assert_allclose(got[k], v, atol=1e-6, rtol=0, err_msg=f"process {i}: {k}")
