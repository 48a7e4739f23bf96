"""Checkpoints and exact resume of ``fit``, and numerical-fault handling.

Every resumed run is compared with an uninterrupted one bit for bit: the data order is a function
of (seed, epoch), dropout keys of the step, and the checkpoint holds the whole train state, so
nothing but the wall-clock fields of the history may differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from csv_fixtures import write_tiny_csv_spec

import dpn_jax.data
from dpn_jax.cli import main
from dpn_jax.data import split_len
from dpn_jax.errors import ConfigError, DpnError
from dpn_jax.models import build_model
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import NonFiniteLoss, fit
from dpn_jax.train.state import init_state, make_optimizer, make_train_step

REPO = Path(__file__).resolve().parents[1]
# 2400 train rows: 10 batches of 240 per epoch, one program shape.
CFG = TrainConfig(batch_size=240, eval_batch_size=512, max_epochs=3, patience=5, seed=5,
                  bn_recalibrate_batches=2)
MODEL = {"hidden": (16,), "dropout": 0.1}  # dropout: the resumed run must continue the keys too


def _model(data, **kw):
    return build_model("dnn", data.schema, **{**MODEL, **kw})


def _fit(data, cfg=CFG, **kw):
    return fit(_model(data), data, cfg, log=lambda s: None, progress=False, **kw)


_cache: dict = {}


def _reference(data):
    """The uninterrupted run (computed once, inside a test so it compiles like the others)."""
    if "ref" not in _cache:
        _cache["ref"] = _fit(data)
    return _cache["ref"]


def _assert_same_run(a, b):
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
    assert a.test == b.test and a.valid == b.valid and a.best_epoch == b.best_epoch
    assert [dict(h, epoch_seconds=0) for h in a.history] == [dict(h, epoch_seconds=0) for h in b.history]


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


SCRIPT = """
import time, jax
jax.config.update("jax_disable_most_optimizations", {no_opt})
if {cache!r}:
    jax.config.update("jax_compilation_cache_dir", {cache!r})
from dpn_jax.data.synthetic import make_synthetic
from dpn_jax.models import build_model
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.loop import fit
data = make_synthetic(seed=3, rows=3000, fields=4, vocab=10)
model = build_model("dnn", data.schema, **{model!r})
# epoch 2 lingers (before its checkpoint), so that the parent kills the run there for sure
fit(model, data, TrainConfig(**{cfg!r}), progress=False, checkpoint_dir={ckpt!r},
    on_epoch=lambda epoch, state: time.sleep(120 if epoch == 2 else 0))
"""


def test_sigkilled_run_resumes_exactly(tiny_synthetic, tmp_path):
    ckpt = tmp_path / "ckpt"
    script = SCRIPT.format(no_opt=jax.config.values["jax_disable_most_optimizations"],
                           cache=jax.config.values["jax_compilation_cache_dir"], model=MODEL,
                           cfg=dataclasses.asdict(CFG), ckpt=str(ckpt))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        reference = _reference(tiny_synthetic)  # meanwhile
        deadline = time.monotonic() + 180
        while not (ckpt / "10").is_dir():  # the epoch-1 checkpoint, renamed into place when complete
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no epoch-1 checkpoint after 180 s"
            time.sleep(0.02)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -9
    # A save killed midway leaves only a temporary directory: it must be ignored (and removed).
    partial = ckpt / "20.orbax-checkpoint-tmp-1234"
    (partial / "arrays").mkdir(parents=True)
    (partial / "arrays" / "manifest.ocdbt").write_bytes(b"\0\1")
    assert _steps(ckpt) == [10]
    resumed = _fit(tiny_synthetic, checkpoint_dir=ckpt, resume=True)
    assert not partial.exists()
    _assert_same_run(resumed, reference)


def test_mid_epoch_resume_equals_uninterrupted(tiny_synthetic, tmp_path, monkeypatch):
    cfg = CFG.replace(checkpoint_every_steps=4)
    real, seen = dpn_jax.data.batches, []

    def crashing(*args, **kw):  # the 17th training batch (epoch 2, batch 7) never ends
        for b in real(*args, **kw):
            seen.append(kw["seed"] == cfg.seed)  # not the BatchNorm recalibration's batches
            if sum(seen) == 17:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(dpn_jax.data, "batches", crashing)  # what the loop iterates over
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_synthetic, cfg, checkpoint_dir=tmp_path)
    monkeypatch.setattr(dpn_jax.data, "batches", real)
    assert _steps(tmp_path) == [10, 14]  # end of epoch 1; epoch 2 after 4 batches
    logs: list[str] = []
    resumed = fit(_model(tiny_synthetic), tiny_synthetic, cfg, log=logs.append, progress=False,
                  checkpoint_dir=tmp_path, resume=True)
    assert any("epoch 2, 4 of 10 batches done" in s for s in logs)
    _assert_same_run(resumed, _reference(tiny_synthetic))
    assert _steps(tmp_path) == [28, 30]  # it kept checkpointing: the last two are kept


@pytest.fixture
def two_checkpoints(tiny_synthetic, tmp_path, tmp_path_factory):
    """A copy of a one-epoch run's checkpoints 5 and 10 (the run is made once per session)."""
    if "two" not in _cache:
        d = tmp_path_factory.mktemp("two") / "ckpt"
        _fit(tiny_synthetic, CFG.replace(max_epochs=1, checkpoint_every_steps=5), checkpoint_dir=d)
        _cache["two"] = d
    shutil.copytree(_cache["two"], tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_truncated_checkpoint_is_reported(tiny_synthetic, two_checkpoints):
    assert _steps(two_checkpoints) == [5, 10]
    progress = two_checkpoints / "10" / "progress" / "metadata"
    saved = json.loads(progress.read_text())
    saved["checksum"][3] += 1  # as if a bit of an array had flipped on disk
    progress.write_text(json.dumps(saved))
    with pytest.raises(DpnError, match=r"checkpoint at \S+10 is unreadable: its arrays do not match the checksum"):
        _fit(tiny_synthetic, checkpoint_dir=two_checkpoints, resume=True)
    progress.write_bytes(progress.read_bytes()[:40])
    with pytest.raises(DpnError, match=r"checkpoint at \S+10 is unreadable: .*delete it \(the older "
                                       r"checkpoint \S+5 is then used\) or run without --resume"):
        _fit(tiny_synthetic, checkpoint_dir=two_checkpoints, resume=True)
    shutil.rmtree(two_checkpoints / "10")
    for f in (two_checkpoints / "5" / "arrays").rglob("*"):  # every array file, cut short
        if f.is_file() and f.stat().st_size > 8:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DpnError, match=r"checkpoint at \S+5 is unreadable: .*run without --resume"):
        _fit(tiny_synthetic, checkpoint_dir=two_checkpoints, resume=True)


def test_missing_and_existing_checkpoints_are_reported(tiny_synthetic, two_checkpoints, tmp_path):
    with pytest.raises(DpnError, match="no checkpoint to resume.*run without --resume"):
        _fit(tiny_synthetic, checkpoint_dir=tmp_path / "empty", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpnError, match="no checkpoint to resume in .*run without --resume"):
        _fit(tiny_synthetic, checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(DpnError, match="already holds checkpoints.*pass --resume"):
        _fit(tiny_synthetic, checkpoint_dir=two_checkpoints)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint_dir"):
        _fit(tiny_synthetic, resume=True)


def test_incompatible_run_is_reported(tiny_synthetic, two_checkpoints):
    with pytest.raises(DpnError, match=r"different run \(.*model\.hidden: \[16\] in the checkpoint, \[8\] now"):
        fit(_model(tiny_synthetic, hidden=(8,)), tiny_synthetic, CFG, progress=False,
            checkpoint_dir=two_checkpoints, resume=True)
    with pytest.raises(DpnError, match=r"train\.lr: 0\.001 in the checkpoint, 0\.01 now"):
        _fit(tiny_synthetic, CFG.replace(lr=1e-2), checkpoint_dir=two_checkpoints, resume=True)
    # options that change neither the state nor the data order may differ
    more = _fit(tiny_synthetic, CFG.replace(max_epochs=1, eval_batch_size=300),
                checkpoint_dir=two_checkpoints, resume=True)
    assert more.epochs == 1


def test_checkpoint_predating_a_field_resumes_at_its_default(tiny_synthetic, two_checkpoints):
    """A field added since the checkpoint (here train.min_epochs and the model's embedding_dim, dropped
    from the saved run) matches a run that leaves it at its default, and no other value."""
    for step in ("5", "10"):
        meta = two_checkpoints / step / "run" / "metadata"
        run = json.loads(meta.read_text())
        del run["train"]["min_epochs"], run["model"]["embedding_dim"]
        meta.write_text(json.dumps(run))
    with pytest.raises(DpnError, match=r"train\.min_epochs: '\(absent\)' in the checkpoint, 3 now"):
        _fit(tiny_synthetic, CFG.replace(min_epochs=3), checkpoint_dir=two_checkpoints, resume=True)
    assert _fit(tiny_synthetic, CFG.replace(max_epochs=3), checkpoint_dir=two_checkpoints,
                resume=True).epochs == 3


def test_checkpoint_from_before_the_epoch_tally_resumes_exactly(tiny_synthetic, two_checkpoints):
    """A mid-epoch checkpoint in the earlier format -- the epoch's loss sums as ``epoch_loss``,
    the early-stopping state saved with its rules -- continues as the uninterrupted run."""
    shutil.rmtree(two_checkpoints / "10")
    meta = two_checkpoints / "5" / "progress" / "metadata"
    saved = json.loads(meta.read_text())
    tally = saved.pop("tally")
    assert tally["steps"] == saved["batch"] == 5 and tally["losses"] == [1]  # the loss of step 4
    saved["epoch_loss"] = [tally["loss_sum"][0], tally["losses"][0], tally["first_step"]]
    saved["stopper"].update(patience=5, min_epochs=0, min_delta=0.0)
    meta.write_text(json.dumps(saved))
    _assert_same_run(_fit(tiny_synthetic, checkpoint_dir=two_checkpoints, resume=True), _reference(tiny_synthetic))


def _poisoned(data, cfg, batch_no: int):
    """``data`` with a NaN label in batch ``batch_no`` (1-based) of epoch 1 (and once per epoch)."""
    order = np.random.default_rng((cfg.seed, 1)).permutation(split_len(data.train))
    label = np.array(data.train["label"])
    label[order[(batch_no - 1) * cfg.batch_size]] = np.nan
    return dataclasses.replace(data, train={**data.train, "label": label})


def test_nan_stops_keeping_the_last_good_checkpoint_then_skip_resumes(tiny_synthetic, tmp_path):
    cfg = CFG.replace(max_epochs=2, checkpoint_every_steps=2)
    data = _poisoned(tiny_synthetic, cfg, 4)
    with pytest.raises(NonFiniteLoss, match=r"non-finite training loss nan at epoch 1, batch 4 of 10 "
                                            r"\(step 4; .*on_nonfinite=skip; the last good checkpoint is "
                                            + str(tmp_path / "2").replace("\\", r"\\")):
        _fit(data, cfg, checkpoint_dir=tmp_path)
    assert _steps(tmp_path) == [2]  # nothing saved after the loss went bad
    # the kept checkpoint loads; resumed with on_nonfinite=skip, the bad batch is passed over
    res = _fit(data, cfg.replace(on_nonfinite="skip"), checkpoint_dir=tmp_path, resume=True)
    assert [h["skipped_steps"] for h in res.history] == [1, 1]  # the NaN row is in one batch per epoch
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(res.params))
    assert res.test["auc"] > 0.6


@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
def test_skip_leaves_state_bit_identical(tiny_synthetic, optimizer):
    cfg = TrainConfig(on_nonfinite="skip", optimizer=optimizer, lr=0.1)
    model = build_model("lr", tiny_synthetic.schema)
    tx = make_optimizer(cfg)
    batch = {k: jnp.asarray(v[:64]) for k, v in tiny_synthetic.train.items()}
    state = init_state(model, batch, cfg, tx)
    step = jax.jit(make_train_step(model, cfg, tx))
    bad = dict(batch, label=batch["label"].at[5].set(jnp.nan))
    after, loss = step(state, bad)
    assert not np.isfinite(float(loss))
    chex.assert_trees_all_equal(after, state)
    good, loss = step(state, batch)
    assert np.isfinite(float(loss)) and int(good.step) == 1
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(good.params, state.params)
    with pytest.raises(ConfigError, match="on_nonfinite=ignore: choose one of stop, skip"):
        make_train_step(model, cfg.replace(on_nonfinite="ignore"), tx)


def test_cli_checkpoint_dir_and_resume(tmp_path, capsys):
    spec = write_tiny_csv_spec(tmp_path)
    base = ["train", "--model", "lr", "--data", str(spec), "--no-progress", "--set", "batch_size=128",
            "--set", "max_epochs=2"]
    out = tmp_path / "run"
    assert main(base + ["--out", str(out)]) == 0  # checkpoints default to OUT/checkpoints
    first = json.loads(capsys.readouterr().out)
    assert _steps(out / "checkpoints") == [3, 6]
    assert main(base + ["--out", str(out), "--resume"]) == 0  # finished: only the test evaluation
    captured = capsys.readouterr()
    assert "resume from" in captured.err and json.loads(captured.out)["test_auc"] == first["test_auc"]
    for extra, message in [(["--resume"], "--resume needs --checkpoint-dir DIR or --out DIR"),
                           (["--resume", "--checkpoint-dir", str(tmp_path / "none")], "no checkpoint to resume"),
                           (["--checkpoint-dir", str(out / "checkpoints")], "already holds checkpoints"),
                           (["--set", "on_nonfinite=maybe"], "on_nonfinite=maybe: choose one of stop, skip")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines
        assert err.startswith("dpn-jax: error: ") and message in err, err
    assert main(base + ["--out", str(out)]) == 0  # a fresh run replaces the default checkpoints
    assert "replacing the checkpoints of an earlier run" in capsys.readouterr().err
    assert _steps(out / "checkpoints") == [3, 6]


RESUME_REPEATEDLY = """
import sys, time
from dpn_jax.cli import main
for arg in sys.argv[1:]:
    directory, times = arg.rsplit(":", 1)
    for _ in range(int(times)):
        print("exit", main(["train", "--model", "lr", "--data", {spec!r}, "--no-progress", "--set",
                            "batch_size=128", "--set", "max_epochs=2", "--checkpoint-dir", directory,
                            "--resume"]), file=sys.stderr, flush=True)
time.sleep(1)  # reads Orbax left in flight finish here, before the interpreter exits
"""


def test_unusable_checkpoints_give_one_line_and_no_traceback(tmp_path, capsys):
    """Orbax abandons the reads still in flight when one fails; they used to surface as
    "Event loop is closed" tracebacks and "exception was never retrieved" logs after the error
    line (in about half the runs: the resume is repeated to catch it)."""
    spec = write_tiny_csv_spec(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--model", "lr", "--data", str(spec), "--no-progress", "--set", "batch_size=128",
                 "--set", "max_epochs=2", "--out", str(out)]) == 0
    capsys.readouterr()
    truncated = tmp_path / "truncated"
    shutil.copytree(out / "checkpoints", truncated)
    for step in truncated.iterdir():
        shutil.rmtree(step / "arrays" / "d")  # the array data, as after a copy that stopped early
    emptied = tmp_path / "emptied"
    shutil.copytree(out / "checkpoints", emptied)
    for f in emptied.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    runs = {truncated: 5, emptied: 2, tmp_path / "empty": 1}
    proc = subprocess.run([sys.executable, "-c", RESUME_REPEATEDLY.format(spec=str(spec)),
                           *(f"{d}:{n}" for d, n in runs.items())],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("data ", "model "))]
    errors = [ln for ln in lines if ln.startswith("dpn-jax: error: ")]
    assert [ln for ln in lines if ln not in errors and ln != "exit 2"] == [], proc.stderr[-3000:]
    assert len(errors) == lines.count("exit 2") == sum(runs.values())
    assert all(f"checkpoint at {truncated}/" in e and "is unreadable" in e for e in errors[:5])
    assert all(f"checkpoint at {emptied}/" in e and "is unreadable" in e for e in errors[5:7])
    assert f"no checkpoint to resume in {tmp_path / 'empty'}" in errors[7]
