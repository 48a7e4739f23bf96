"""Several train steps per dispatch (``steps_per_dispatch``) and the data held on the device
(``data_on_device``): the same rows, in the same order, and on the CPU the same parameters, bit
for bit, as one step per dispatch fed from the host; checkpoints, resume and non-finite steps
inside blocks; the loop rows of the benchmark.

2400 train rows in batches of 240 or 256: with 4 steps per dispatch an epoch of batch 256 is two
blocks of 4, one whole batch left and the partial batch of 96 rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest
from conftest import REPO

import dpn_jax.data
from dpn_jax.data import batch_order, batches, padded_batches, split_len
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.train import engine
from dpn_jax.train.checkpoint import Checkpoints
from dpn_jax.train.config import TrainConfig, split_overrides
from dpn_jax.train.device_data import DeviceSplit, Orders, block_plan, on_device
from dpn_jax.train.engine import BN_SEED_OFFSET, Feeder, predict_logits
from dpn_jax.train.loop import NonFiniteLoss, fit
from dpn_jax.train.sweep import fit_sweep

CFG = TrainConfig(batch_size=256, eval_batch_size=512, max_epochs=3, patience=5, seed=5,
                  bn_recalibrate_batches=2)
MODEL = {"hidden": (16,), "dropout": 0.1}  # BatchNorm and dropout: statistics and keys must follow too


def _fit(data, cfg, **kw):
    return fit(build_model("dnn", data.schema, **MODEL), data, cfg, log=lambda s: None, progress=False, **kw)


def _same_run(a, b):
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
    assert a.test == b.test and a.valid == b.valid and (a.best_epoch, a.epochs) == (b.best_epoch, b.epochs)
    assert [dict(h, epoch_seconds=0) for h in a.history] == [dict(h, epoch_seconds=0) for h in b.history]


_cache: dict = {}


def _reference(data, cfg=CFG):
    """One step per dispatch from the host, made once per configuration."""
    key = repr(cfg)
    if key not in _cache:
        _cache[key] = _fit(data, cfg.replace(steps_per_dispatch=1, data_on_device="false"))
    return _cache[key]


# ----------------------------------------------------------------------------- the plan and the order


def test_block_plan_covers_every_row_once_with_three_shapes_at_most():
    assert block_plan(2400, 256, 4) == [(0, 4, 256), (1024, 4, 256), (2048, 1, 256), (2304, 1, 96)]
    assert block_plan(2400, 256, 4, start_batch=3) == [(768, 4, 256), (1792, 1, 256), (2048, 1, 256),
                                                       (2304, 1, 96)]
    assert block_plan(2048, 256, 4) == [(0, 4, 256), (1024, 4, 256)]
    assert block_plan(100, 256, 4) == [(0, 1, 100)]
    assert block_plan(2400, 256, 1) == [(b * 256, 1, 256) for b in range(9)] + [(2304, 1, 96)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, size, k = int(rng.integers(1, 500)), int(rng.integers(1, 60)), int(rng.integers(1, 9))
        start = int(rng.integers(0, -(-n // size)))
        plan = block_plan(n, size, k, start)
        rows = [first + s * rows + i for first, steps, rows in plan for s in range(steps) for i in range(rows)]
        assert rows == list(range(start * size, n)), (n, size, k, start)
        assert len({(steps, r) for _, steps, r in plan}) <= 3


def _ids(n: int = 2400) -> dict:
    """A split whose rows say which they are."""
    rng = np.random.default_rng(1)
    return {"id": np.arange(n, dtype=np.int32), "x": rng.normal(size=(n, 2)).astype(np.float32),
            "label": (rng.random(n) < 0.5).astype(np.float32)}


@pytest.mark.parametrize("steps", [1, 3, 4])
@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("seeds", [(7,), (7, 8)])
def test_blocks_hold_the_host_order_of_one_batch_per_dispatch(steps, where, seeds):
    """Every block, on the host or gathered on the device, holds the rows one batch per dispatch
    from the host gets, in that order: the permutation ``default_rng((seed, epoch))`` draws;
    each seed's order on its replica axis; from a resume point on; all rows exactly once."""
    split = _ids()
    device = DeviceSplit(split) if where == "device" else None
    feeder = Feeder(split, 256, seeds, stacked=len(seeds) > 1, steps=steps, device=device)
    for start in (0, 5):
        blocks = [jax.device_get(b) for b in feeder.blocks(epoch=3, start_step=start)]
        assert [b["id"].shape[0] for b in blocks] == [s for _, s, _ in block_plan(2400, 256, steps, start)]
        for r, seed in enumerate(seeds):
            got = np.concatenate([(b["id"][:, r] if len(seeds) > 1 else b["id"]).reshape(-1) for b in blocks])
            host = np.concatenate([b["id"] for b in batches(split, 256, shuffle=True, seed=seed, epoch=3,
                                                            start_batch=start)])
            np.testing.assert_array_equal(got, host)
            np.testing.assert_array_equal(got, batch_order(2400, shuffle=True, seed=seed, epoch=3)[start * 256:])
            x = np.concatenate([(b["x"][:, r] if len(seeds) > 1 else b["x"]).reshape(-1, 2) for b in blocks])
            np.testing.assert_array_equal(x, split["x"][got])
    # BatchNorm re-estimation's batches: its own order, whole batches only
    got = [jax.device_get(b)["id"] for b in feeder.batches(3, seed_offset=11, drop_last=True)]
    its = [batches(split, 256, shuffle=True, seed=s + 11, epoch=3, drop_last=True) for s in seeds]
    want = [np.stack(parts) if len(seeds) > 1 else parts[0] for parts in zip(*(
        [b["id"] for b in it] for it in its))]
    assert len(got) == len(want) == 9
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_orders_drawn_ahead_are_the_host_orders():
    """The feeder takes an epoch's order, then draws its re-estimation order and the next epoch's
    in the background; every one equals ``batch_order``'s (as int32)."""
    split = _ids(1000)
    orders = Orders(1000)
    try:
        feeder = Feeder(split, 64, (3, 4), stacked=True, steps=2, ahead=orders)
        first = [jax.device_get(b)["id"] for b in feeder.blocks(2)]
        assert set(orders._ahead) == {(3, 3), (4, 3), (3 + BN_SEED_OFFSET, 2), (4 + BN_SEED_OFFSET, 2)}
        plain = Feeder(split, 64, (3, 4), stacked=True, steps=2)
        for a, b in zip(first, (jax.device_get(b)["id"] for b in plain.blocks(2))):
            np.testing.assert_array_equal(a, b)
        for seed, epoch in ((3, 3), (4 + BN_SEED_OFFSET, 2), (9, 9)):  # ahead, ahead, not asked ahead
            got = orders.get(seed, epoch)
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, batch_order(1000, shuffle=True, seed=seed, epoch=epoch))
    finally:
        orders.close()
    assert not orders._ahead


def test_device_evaluation_scores_every_row_once_like_the_host():
    split = _ids(1000)
    w = np.asarray([[0.5, -1.0], [1.0, 0.25]], np.float32)

    def predict(params, stats, batch):
        return jax.numpy.einsum("...k,bk->...b", params, batch["x"])

    for size in (128, 1000, 4096):  # a padded last batch, one exact batch, one larger than the split
        host = predict_logits(predict, w, None, split, size)
        dev = predict_logits(predict, w, None, DeviceSplit(split), size)
        assert dev.shape == (2, 1000)
        np.testing.assert_array_equal(dev, host)
    assert [b["id"].tolist() for b in DeviceSplit(split).padded_batches(384)][-1] == \
        [b["id"].tolist() for b in padded_batches(split, 384)][-1]  # padding repeats the last row


# ----------------------------------------------------------------------------- fit


def test_many_steps_per_dispatch_and_device_data_train_exactly_like_one(tiny_synthetic, monkeypatch):
    """K = 4 from the host, K = 4 and K = 1 on the device: the same blocks of rows, the same
    parameters, BatchNorm statistics, losses, validation and early-stopping decisions, bit for
    bit (the scan runs the same step program); one compiled shape per block kind."""
    cfg = CFG.replace(max_epochs=6, patience=1)  # early stopping decides when this run ends
    shapes = []
    real = engine.run_epoch

    def spy(state, program, blocks, **kw):
        def seen(blocks):
            for b in blocks:
                shapes.append(tuple(b["label"].shape))
                yield b
        return real(state, program, seen(blocks), **kw)

    monkeypatch.setattr("dpn_jax.train.loop.run_epoch", spy)
    ref = _reference(tiny_synthetic, cfg)
    assert ref.epochs < cfg.max_epochs  # it did stop early
    for k, where in ((4, "false"), (4, "true"), (1, "true")):
        shapes.clear()
        _same_run(_fit(tiny_synthetic, cfg.replace(steps_per_dispatch=k, data_on_device=where)), ref)
        per_epoch = [(4, 256), (4, 256), (1, 256), (1, 96)] if k == 4 else [(1, 256)] * 9 + [(1, 96)]
        assert shapes == per_epoch * ref.epochs, where


def test_lazy_adam_in_blocks_equals_one_step_per_dispatch(tiny_synthetic):
    cfg = CFG.replace(optimizer="lazy_adam", max_epochs=1)
    _same_run(_fit(tiny_synthetic, cfg.replace(steps_per_dispatch=3, data_on_device="true")),
              _reference(tiny_synthetic, cfg))


def test_sweep_in_blocks_equals_one_step_per_dispatch(tiny_synthetic):
    """Replicas in blocks ``[steps, replicas, batch, ...]``: the vmapped scan sums some products
    in another order than the vmapped step (last bits, as a sweep differs from fit), so the
    parameters agree to rounding and every decision and metric to its precision."""
    model = build_model("dnn", tiny_synthetic.schema, **MODEL)
    cfgs = [CFG.replace(max_epochs=2, lr=lr, seed=s) for lr, s in ((1e-3, 1), (3e-3, 2))]

    def run(**kw):
        return fit_sweep(model, tiny_synthetic, [c.replace(**kw) for c in cfgs], log=lambda s: None,
                         progress=False)

    ref = run(steps_per_dispatch=1, data_on_device="false")
    for kw in (dict(steps_per_dispatch=4, data_on_device="false"), dict(steps_per_dispatch=3, data_on_device="true")):
        for a, b in zip(run(**kw), ref):
            assert a.status == b.status == "done"
            a, b = a.result, b.result
            assert (a.best_epoch, a.epochs) == (b.best_epoch, b.epochs)
            chex.assert_trees_all_close(a.params, b.params, atol=1e-7, rtol=1e-5)
            chex.assert_trees_all_close(a.batch_stats, b.batch_stats, atol=1e-7, rtol=1e-5)
            for ha, hb in zip(a.history, b.history):
                assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-6)
                assert ha["valid_logloss"] == pytest.approx(hb["valid_logloss"], rel=1e-6)
                assert ha["valid_auc"] == pytest.approx(hb["valid_auc"], abs=1e-4)


def test_non_finite_steps_inside_a_block_are_skipped_or_stop_like_one_per_dispatch(tiny_synthetic):
    """A NaN label in batch 6 (inside the block of batches 5-8): ``skip`` drops that step alone,
    every epoch, as one step per dispatch does; ``stop`` stops at the same batch with the same
    message (the loss is read every 4 steps: at batch 8 the parameters are NaN)."""
    cfg = CFG.replace(max_epochs=2, batch_size=240)
    order = np.random.default_rng((cfg.seed, 1)).permutation(split_len(tiny_synthetic.train))
    label = np.array(tiny_synthetic.train["label"])
    label[order[5 * 240]] = np.nan
    data = dataclasses.replace(tiny_synthetic, train={**tiny_synthetic.train, "label": label})
    skip = cfg.replace(on_nonfinite="skip")
    got = _fit(data, skip.replace(steps_per_dispatch=4))
    assert [h["skipped_steps"] for h in got.history] == [1, 1]
    _same_run(got, _fit(data, skip))
    messages = []
    for k in (1, 4):
        with pytest.raises(NonFiniteLoss) as err:
            _fit(data, cfg.replace(steps_per_dispatch=k))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "at epoch 1, batch 8 of 10 (step 8;" in messages[0]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_fall_on_the_block_passing_each_multiple(tiny_synthetic, tmp_path, monkeypatch):
    """``checkpoint_every_steps=3`` with blocks of 4: no step count of a dispatch's end is a
    multiple of 3 but 9, yet a checkpoint follows each block that passes one (4: passed 3,
    8: passed 6, 9), then the epoch's end (10)."""
    saved = []
    real = Checkpoints.save

    def spy(self, position, *a, **kw):
        saved.append(position)
        return real(self, position, *a, **kw)

    monkeypatch.setattr(Checkpoints, "save", spy)
    _fit(tiny_synthetic, CFG.replace(max_epochs=1, steps_per_dispatch=4, checkpoint_every_steps=3),
         checkpoint_dir=tmp_path)
    assert saved == [4, 8, 9, 10]


def test_killed_mid_block_resumes_exactly_with_any_steps_per_dispatch(tiny_synthetic, tmp_path, monkeypatch):
    """Killed while the block of batches 5-8 of epoch 2 is being fed: the last checkpoint is at
    the block boundary before (epoch 2, 4 batches). Resumed with 4 steps per dispatch the blocks
    fall as before; with 3, the checkpoint lies inside the new blocks' grid. Both end exactly as
    the uninterrupted run of one step per dispatch."""
    cfg = CFG.replace(steps_per_dispatch=4, checkpoint_every_steps=3)
    real, seen = dpn_jax.data.batches, []

    def crashing(*args, **kw):  # the 17th training batch (epoch 2, batch 7) is never read
        for b in real(*args, **kw):
            seen.append(kw["seed"] == cfg.seed)  # not the BatchNorm re-estimation's batches
            if sum(seen) == 17:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(dpn_jax.data, "batches", crashing)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_synthetic, cfg, checkpoint_dir=tmp_path / "run")
    monkeypatch.setattr(dpn_jax.data, "batches", real)
    steps = sorted(int(p.name) for p in (tmp_path / "run").iterdir() if p.name.isdigit())
    assert steps == [10, 14]  # the end of epoch 1; epoch 2 after its first block
    for k in (4, 3):
        import shutil

        shutil.copytree(tmp_path / "run", tmp_path / f"k{k}")
        logs: list[str] = []
        resumed = fit(build_model("dnn", tiny_synthetic.schema, **MODEL), tiny_synthetic,
                      cfg.replace(steps_per_dispatch=k), log=logs.append, progress=False,
                      checkpoint_dir=tmp_path / f"k{k}", resume=True)
        assert any("epoch 2, 4 of 10 batches done" in s for s in logs)
        _same_run(resumed, _reference(tiny_synthetic))


# ----------------------------------------------------------------------------- the option


def test_data_on_device_choice():
    split = _ids(1000)  # 1000 x (4 + 8 + 4) bytes
    size = 16_000
    assert on_device("true", [split], 0, "cpu") and not on_device("false", [split], 10**12, "gpu")
    assert on_device("auto", [split], 4 * size, "gpu") and not on_device("auto", [split], 4 * size - 1, "gpu")
    assert not on_device("auto", [split], 10**12, "cpu")  # the CPU's device memory is the host's

    class Streamed(dict):
        def batches(self, *a, **kw):
            raise AssertionError

    assert not on_device("auto", [Streamed(split)], 10**12, "gpu")
    with pytest.raises(ConfigError, match="data_on_device=true: the train split is streamed from disk"):
        on_device("true", [Streamed(split)], 10**12, "gpu")
    assert not on_device("auto", [split], 10**12, "gpu", processes=2)
    with pytest.raises(ConfigError, match="data_on_device=true: training runs in 2 processes"):
        on_device("true", [split], 10**12, "gpu", processes=2)
    train, _ = split_overrides(["data_on_device=true", "steps_per_dispatch=8"], {}, "dnn")
    assert train == {"data_on_device": "true", "steps_per_dispatch": 8}
    with pytest.raises(ConfigError, match="steps_per_dispatch=0: steps_per_dispatch must be >= 1"):
        split_overrides(["steps_per_dispatch=0"], {}, "dnn")
    with pytest.raises(ConfigError, match="--set data_on_device=maybe: choose one of auto, true, false"):
        split_overrides(["data_on_device=maybe"], {}, "dnn")


# ----------------------------------------------------------------------------- on a mesh

MESH_CHILD = textwrap.dedent('''
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    jax.config.update("jax_disable_most_optimizations", True)
    from dpn_jax.data.synthetic import make_synthetic
    from dpn_jax.models import build_model
    from dpn_jax.train import engine
    from dpn_jax.train.config import TrainConfig
    from dpn_jax.train.loop import fit
    from dpn_jax.train.sharding import make_mesh

    data = make_synthetic(seed=3, rows=3000, fields=4, vocab=10)
    cfg = TrainConfig(seed=1, batch_size=240, eval_batch_size=304, max_epochs=2, patience=5,
                      bn_recalibrate_batches=2)
    specs = set()
    real = engine.run_epoch

    def spy(state, program, blocks, **kw):
        def seen(blocks):
            for b in blocks:
                specs.add((tuple(b["cat"].shape), str(tuple(getattr(b["cat"].sharding, "spec", ())))))
                yield b
        return real(state, program, seen(blocks), **kw)

    import dpn_jax.train.loop
    dpn_jax.train.loop.run_epoch = spy
    out = {}
    for name, mesh, k, where in (("ref", None, 1, "false"), ("host", "data=2,model=2", 4, "false"),
                                 ("device", "data=2,model=2", 4, "true")):
        model = build_model("dnn", data.schema, hidden=(16, 8), dropout=0.1)
        r = fit(model, data, cfg.replace(steps_per_dispatch=k, data_on_device=where), log=lambda s: None,
                progress=False, mesh=None if mesh is None else make_mesh(mesh))
        out[name] = {"params": jax.tree.map(lambda x: np.asarray(x).tolist(), r.params),
                     "loss": [h["train_loss"] for h in r.history], "specs": sorted(specs)}
        specs.clear()
    print("RESULT" + json.dumps(out))
''')


def test_blocks_on_a_mesh_split_rows_over_data_and_train_like_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", DPN_XLA_CACHE="0")
    proc = subprocess.run([sys.executable, "-c", MESH_CHILD], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("host", "device"):
        for a, b in zip(jax.tree.leaves(out[name]["params"]), jax.tree.leaves(out["ref"]["params"])):
            np.testing.assert_allclose(a, b, atol=1e-6)  # another reduction order (test_sharding.py)
        np.testing.assert_allclose(out[name]["loss"], out["ref"]["loss"], rtol=1e-5)
        # 10 batches of 240 -> blocks of 4 batches, each split by rows over data; no partial batch
        assert [(shape[:2], spec) for shape, spec in out[name]["specs"]] == [
            ([1, 240], "(None, 'data')"), ([4, 240], "(None, 'data')")], name
