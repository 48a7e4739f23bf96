"""A kill never leaves a half output: ``train``, ``sweep``, ``predict`` and ``data prepare`` are
SIGKILLed at points drawn from a seeded RNG over their deterministic events (batches dispatched,
checkpoints written, chunks written, renames; see :mod:`dpn_jax.faults`). After each kill every
output is absent, the previous one, or complete (it loads, scores, verifies); rerunning the same
command ends with exactly what a run never killed produces. The temporaries a SIGKILL leaves
beside a target carry ``.tmp-`` in their names, and the next run ignores them.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from csv_fixtures import write_tiny_spec

from dpn_jax.faults import ENV

# The kill tests are slow (subprocesses killed and rerun); the fault-point parser runs in the lane.

REPO = Path(__file__).resolve().parents[1]
SEED = 26  # the kill points of every command are drawn from random.Random(SEED + command)

# 600 rows: 360 train -> 6 batches of 64 per epoch, 2 epochs; checkpoints every 4 batches and at
# each epoch's end: positions 4, 6, 10, 12.
TRAIN_SETS = ("batch_size=64", "max_epochs=2", "hidden=16", "dropout=0.1", "batch_norm=false",
              "embedding_dim=4", "checkpoint_every_steps=4")
BATCHES, CHECKPOINTS = 12, (4, 6, 10, 12)
SEEDS = "1-3"  # the sweep's replicas: one program, a dispatch trains one batch of each
PREDICT_ROWS, PREDICT_BATCH = 3000, 100  # 30 chunks
TMP_FILE = re.compile(r"^(?P<stem>.+)\.tmp-[0-9a-f]{8}(?P<suffix>\.\w+)?$")  # dpn_jax.atomic's names


def _cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-m", "dpn_jax.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _killed(args: list[str], fault: str) -> None:
    proc = _cli(args, fault)
    assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-3000:])


def _finished(args: list[str]) -> str:
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _debris(folder: Path, known: set[str]) -> list[str]:
    """Names in ``folder`` besides ``known``; each must be a temporary of one of them."""
    extra = sorted(p.name for p in folder.iterdir() if p.name not in known) if folder.is_dir() else []
    for name in extra:
        m = TMP_FILE.match(name)
        assert m and f"{m['stem']}{m['suffix'] or ''}" in known, f"{folder / name}: not a temporary of {known}"
    return extra


def _without_clock(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rows]


def _replicas(summary: dict) -> list[dict]:
    """A sweep's per-replica results and histories, in (configuration, seed) order, without the
    wall-clock fields."""
    rows = sorted(summary["replicas"], key=lambda r: (r["configuration"], r["seed"]))
    return [dict(r, history=_without_clock(r["history"])) for r in _without_clock(rows)]


def test_a_fault_point_is_named_event_and_count():
    from dpn_jax import faults

    assert faults._parse("rename:12") == ("rename", 12) and faults._parse(None) == (None, 0)
    for bad in ("rename", "rename:0", ":3", "rename:x"):
        with pytest.raises(ValueError, match=ENV):
            faults._parse(bad)


# ----------------------------------------------------------------------------- shared data


def _tiny_csv(path: Path, rows: int, seed: int, label: bool = True) -> None:
    rng = np.random.default_rng(seed)
    u, v, w = rng.integers(0, 12, rows), rng.integers(0, 6, rows), rng.normal(size=rows)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(u % 3 - 1.0 + w)))).astype(int)
    head = "y,u,v,w\n" if label else "id,u,v,w\n"
    path.write_text(head + "".join(f"{a if label else i},u{b},v{c},{d:.3f}\n"
                                   for i, (a, b, c, d) in enumerate(zip(y, u, v, w))))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """The spec, a csv of requests and the bundle of one uninterrupted training run (the
    reference every killed run must end at, and the model ``predict`` uses)."""
    d = tmp_path_factory.mktemp("faults")
    _tiny_csv(d / "data.csv", 600, seed=0)
    _tiny_csv(d / "requests.csv", PREDICT_ROWS, seed=1, label=False)
    write_tiny_spec(d, numeric=("w",))
    t = SimpleNamespace(dir=d, spec=d / "spec.yaml", requests=d / "requests.csv", cache=d / "cache")
    common = ["--data", str(t.spec), "--cache-dir", str(t.cache), "--no-progress",
              *[a for s in TRAIN_SETS for a in ("--set", s)]]
    t.train = lambda out, *extra: ["train", "--model", "dnn", *common, "--out", str(out), *extra]
    t.sweep = lambda out: ["sweep", "--model", "dnn", *common, "--seeds", SEEDS, "--out", str(out)]
    t.bundle = d / "reference"
    _in_process(t.train(t.bundle))
    return t


def _in_process(args: list[str]) -> None:
    """``dpn-jax ARGS`` in this process (no interpreter to start), compiled as the CLI compiles."""
    import jax

    from dpn_jax.cli import main

    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)  # the subprocesses' setting
    try:
        assert main(args) == 0
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


# ----------------------------------------------------------------------------- train


def _train_state(out: Path, reference: Path) -> str:
    """"unfinished" (``out`` absent or only checkpoints) or "complete" (a bundle equal to the
    reference's: it loads and scores); anything else fails."""
    import dpn_jax

    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries in ([], ["checkpoints"]):
        return "unfinished"
    model = dpn_jax.load(out)  # a half-written bundle raises here
    rows = {"u": ["u1", "u7", "zz"], "v": ["v2", "v0", ""], "w": [0.5, -1.0, None]}
    assert np.all(np.isfinite(model.predict(rows)))
    assert (out / "params.msgpack").read_bytes() == (reference / "params.msgpack").read_bytes()
    return "complete"


def _last_checkpoint(out: Path) -> int:
    d = out / "checkpoints"
    return max((int(p.name) for p in d.iterdir() if p.name.isdigit()), default=0) if d.is_dir() else 0


@pytest.mark.slow
def test_killed_training_leaves_no_half_bundle_and_resumes_to_the_uninterrupted_one(tiny, tmp_path):
    rng = random.Random(SEED + 1)
    out = tmp_path / "run"
    plan = [("batch", lambda done: rng.randint(1, BATCHES - done)),
            ("checkpoint", lambda done: rng.randint(1, sum(c > done for c in CHECKPOINTS))),
            # the new bundle is complete beside ``out`` and the checkpoints carried into it
            # (rename:1 is before they are): the folders are swapped next
            ("rename", lambda done: 2),
            ("installed", lambda done: 1)]  # swapped; the old folder is deleted next
    for event, draw in plan:
        done = _last_checkpoint(out)
        if done == BATCHES and event in ("batch", "checkpoint"):
            continue  # (not with this seed) nothing of the kind is left to do
        point = f"{event}:{draw(done)}"
        _killed(tiny.train(out, *(["--resume"] if done else [])), point)
        state = _train_state(out, tiny.bundle)
        assert state == ("complete" if event == "installed" else "unfinished"), (point, state)
        assert _last_checkpoint(out) >= done, point  # a kill never loses a finished checkpoint
        _debris(tmp_path, {"run"})

    _finished(tiny.train(out, "--resume"))  # past the temporaries of the killed bundle writes
    assert _debris(tmp_path, {"run"}), "expected the temporaries of the killed bundle writes"
    assert _train_state(out, tiny.bundle) == "complete"
    ours, ref = (json.loads((d / "results.json").read_text()) for d in (out, tiny.bundle))
    for key in ("test_auc", "test_logloss", "valid_auc", "valid_logloss", "best_epoch", "epochs"):
        assert ours[key] == ref[key], key
    assert _without_clock(ours["history"]) == _without_clock(ref["history"])
    assert _last_checkpoint(out) == BATCHES


# ----------------------------------------------------------------------------- sweep


def _sweep_outputs(out: Path, groups: set[str]) -> dict | None:
    """The finished sweep's summary, None while unfinished; every file there is complete."""
    _debris(out, {"groups", "checkpoints", "sweep.md", "sweep.json"})
    _debris(out / "groups", groups)
    for f in (out / "groups").glob("*.json"):
        if not TMP_FILE.match(f.name):
            assert len(json.loads(f.read_text())["replicas"]) == 3, f
    done = [(out / n).is_file() for n in ("sweep.md", "sweep.json")]
    if done[0]:
        assert (out / "sweep.md").read_text().endswith("compilation included.\n")
    return json.loads((out / "sweep.json").read_text()) if done[1] else None


@pytest.mark.slow
def test_killed_sweep_leaves_no_half_output_and_reruns_to_the_uninterrupted_results(tiny, tmp_path):
    rng = random.Random(SEED + 2)
    _in_process(tiny.sweep(tmp_path / "reference"))
    ref = json.loads((tmp_path / "reference" / "sweep.json").read_text())
    groups = {f"{r['group']}.json" for r in ref["replicas"]}
    out = tmp_path / "sweep"
    # a dispatch trains one batch of every replica: 12 in all; a checkpoint per epoch; renames of
    # the group's results, sweep.md and sweep.json
    for point in (f"batch:{rng.randint(1, BATCHES)}", f"checkpoint:{rng.randint(1, 2)}",
                  f"rename:{rng.randint(1, 3)}"):
        _killed(tiny.sweep(out), point)
        summary = _sweep_outputs(out, groups)
        assert summary is None or _replicas(summary) == _replicas(ref), point

    _finished(tiny.sweep(out))
    ours = _replicas(_sweep_outputs(out, groups))
    assert [(r["seed"], r["status"]) for r in ours] == [(1, "done"), (2, "done"), (3, "done")]
    assert ours == _replicas(ref)


# ----------------------------------------------------------------------------- predict


@pytest.mark.slow
def test_killed_predict_leaves_the_output_absent_previous_or_complete(tiny, tmp_path):
    rng = random.Random(SEED + 3)
    chunks = PREDICT_ROWS // PREDICT_BATCH
    args = lambda output: ["predict", "--model", str(tiny.bundle), "--input", str(tiny.requests),  # noqa: E731
                           "--output", str(output), "--id-column", "id", "--batch-size", str(PREDICT_BATCH)]
    reference = tmp_path / "reference.csv"
    _in_process(args(reference))
    full = reference.read_bytes()
    out = tmp_path / "scores.csv"
    known = {"scores.csv", "reference.csv"}
    _killed(args(out), f"chunk:{rng.randint(1, chunks)}")  # no earlier output: none after
    assert not out.exists()
    _debris(tmp_path, known)
    previous = b"id,probability\n0,0.5\n"
    out.write_bytes(previous)
    for point in (f"chunk:{rng.randint(1, chunks)}", "rename:1"):  # an earlier output: untouched
        _killed(args(out), point)
        assert out.read_bytes() == previous, point
    _killed(args(out), "installed:1")  # past the temporaries of the killed runs
    assert out.read_bytes() == full
    assert len(_debris(tmp_path, known)) == 3  # the killed runs' temporaries, named as such
    assert full.count(b"\n") == PREDICT_ROWS + 1


# ----------------------------------------------------------------------------- data prepare


def _frappe_x1_files(d: Path) -> None:
    from dpn_jax.data.tabular_builtins import FRAPPE_X1

    rng = np.random.default_rng(4)
    (d / "Frappe_x1").mkdir(parents=True)
    for split, n in (("train", 1500), ("valid", 300), ("test", 300)):
        x = rng.integers(0, 9, (n, len(FRAPPE_X1)))
        y = (rng.random(n) < 1 / (1 + np.exp(-(x[:, 0] % 3 - 1.0)))).astype(int)
        lines = ["label," + ",".join(FRAPPE_X1)]
        lines += [f"{y[i]}," + ",".join(f"{c}{x[i, k]}" for k, c in enumerate(FRAPPE_X1)) for i in range(n)]
        (d / "Frappe_x1" / f"{split}.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_killed_data_prepare_leaves_no_half_cache(tmp_path):
    from dpn_jax.data import load_dataset

    rng = random.Random(SEED + 4)
    data, cache = tmp_path / "data", tmp_path / "cache"
    _frappe_x1_files(data)
    reference = load_dataset("frappe_x1", data_dir=data, cache_dir=tmp_path / "reference", progress=False)
    prepare = ["data", "prepare", "frappe_x1", "--data-dir", str(data), "--cache-dir", str(cache),
               "--no-progress"]

    def prepared() -> list[str]:  # the cache's datasets; a SIGKILLed encoding leaves .tmp-* folders
        for p in cache.iterdir():
            assert p.name.startswith(("frappe_x1-", ".tmp-frappe_x1-")) or p.name == "file_sha256.json", p
        return [p.name for p in cache.iterdir() if p.name.startswith("frappe_x1-")]

    for point in (f"chunk:{rng.randint(1, 3)}", "rename:1"):  # a chunk per split file
        _killed(prepare, point)
        assert prepared() == [], point
    assert len([p for p in cache.iterdir() if p.name.startswith(".tmp-")]) == 2

    assert "prepared in" in _finished(prepare)
    assert len(prepared()) == 1
    assert "1 of 1 cached datasets verified" in _finished(["data", "verify", "--cache-dir", str(cache)])
    again = load_dataset("frappe_x1", data_dir=data, cache_dir=cache)
    assert again.meta["cache"]["hit"]
    for split in ("train", "valid", "test"):
        ours, ref = getattr(again, split), getattr(reference, split)
        assert sorted(ours) == sorted(ref)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=f"{split}/{k}")
