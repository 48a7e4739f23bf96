"""Lazy (sparse) Adam: equal to dense Adam when no row repeats, untouched rows stay untouched."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpn_jax.data.schema import FieldInfo, Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models import build_model
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.lazy_adam import LazyAdamState
from dpn_jax.train.state import get_lr, init_state, make_optimizer, make_train_step, set_lr

FIELDS, VOCAB, ROWS = 3, 100, 8


def _schema() -> Schema:
    fields = tuple(FieldInfo(f"f{i}", "cat", column=i, offset=i * (VOCAB + 2), vocab_size=VOCAB + 2)
                   for i in range(FIELDS))
    return Schema(fields=fields, table_size=FIELDS * (VOCAB + 2))


def _batch(step: int, disjoint: bool, seed: int = 0) -> dict:
    """Batch ``step``: with ``disjoint`` its ids come from a block of ids no other step uses
    (repeats inside the batch are allowed, and happen)."""
    rng = np.random.default_rng((seed, step))
    lo = 2 + (30 * step if disjoint else 0)
    local = rng.integers(lo, lo + (10 if disjoint else 90), (ROWS, FIELDS))
    cat = local + np.arange(FIELDS) * (VOCAB + 2)
    return {"cat": jnp.asarray(cat, jnp.int32), "num": jnp.zeros((ROWS, 0), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 2, ROWS), jnp.float32)}


def _run(model_name: str, optimizer: str, steps: int, disjoint: bool, wrap=jax.jit, **cfg_kw):
    """``(state after `steps` steps, their losses, the initial state)``."""
    model = build_model(model_name, _schema(), **({"hidden": (16, 8)} if model_name == "dnn" else {}))
    cfg = TrainConfig(optimizer=optimizer, lr=0.05, **cfg_kw)
    tx = make_optimizer(cfg)
    state = start = init_state(model, _batch(0, disjoint), cfg, tx)
    step = wrap(make_train_step(model, cfg, tx))
    losses = []
    for i in range(steps):
        state, loss = step(state, _batch(i, disjoint))
        losses.append(float(loss))
    return state, losses, start


def _ids(step: int, disjoint: bool) -> np.ndarray:
    return np.unique(np.asarray(_batch(step, disjoint)["cat"]))


def _split_rows(table, rows) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(table)
    return t[rows], np.delete(t, rows, axis=0)


class TestLazyEqualsDense(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_no_repeated_rows_means_dense_adam(self):
        """Two steps on disjoint id blocks, with BatchNorm, clipping and net L2. A row's first
        gradient meets zero moments under both optimisers, so every step's forward pass is the
        same: the MLP, the rows of the last step and the rows never seen match dense Adam to
        float rounding. Rows of earlier steps differ: dense Adam keeps moving them with their
        momentum, lazy Adam leaves them until they come back. (Not with embedding_l2: dense
        Adam's L2 gradient reaches every row.)"""
        kw = {"grad_clip": 0.5, "net_l2": 1e-3}
        dense, dl, start = _run("dnn", "adam", 2, disjoint=True, wrap=self.variant, **kw)
        lazy, ll, _ = _run("dnn", "lazy_adam", 2, disjoint=True, wrap=self.variant, **kw)
        # The row gradients are summed in another order (into the gathered rows, not the table);
        # Adam's normalised step at lr 0.05 turns that rounding into ~1e-5 relative after a few
        # steps. A wrong update would be off by ~lr (0.05).
        tol = {"rtol": 1e-4, "atol": 1e-6}
        np.testing.assert_allclose(ll, dl, **tol)
        chex.assert_trees_all_close(lazy.params["mlp"], dense.params["mlp"], **tol)
        chex.assert_trees_all_close(lazy.batch_stats, dense.batch_stats, **tol)
        earlier, last = _ids(0, True), _ids(1, True)
        lt, dt = lazy.params["embedding"]["table"], dense.params["embedding"]["table"]
        np.testing.assert_allclose(np.asarray(lt)[last], np.asarray(dt)[last], **tol)
        _, lazy_rest = _split_rows(lt, np.concatenate([earlier, last]))
        _, dense_rest = _split_rows(dt, np.concatenate([earlier, last]))
        np.testing.assert_array_equal(lazy_rest, dense_rest)
        assert np.abs(np.asarray(lt)[earlier] - np.asarray(dt)[earlier]).min() > 1e-3
        # The last step's rows really moved (else the comparison would be empty); no earlier step
        # touched them, so before it they held their initial values.
        assert np.abs(np.asarray(lt)[last] - np.asarray(start.params["embedding"]["table"])[last]).min() > 1e-3


def test_fm_two_tables_match_dense_on_one_step():
    """FM has two tables (linear dim 1 and the factors); one id remapping serves both."""
    dense, _, _ = _run("fm", "adam", 1, disjoint=True)
    lazy, _, _ = _run("fm", "lazy_adam", 1, disjoint=True)
    chex.assert_trees_all_close(lazy.params, dense.params, rtol=1e-5, atol=1e-7)


def test_rows_absent_from_a_batch_stay_put():
    """With repeats, the rows a step does not use keep their values and moments bit for bit
    (dense Adam moves them with the decaying momentum)."""
    lazy, _, _ = _run("dnn", "lazy_adam", 2, disjoint=False)
    dense, _, _ = _run("dnn", "adam", 2, disjoint=False)
    cfg = TrainConfig(optimizer="lazy_adam", lr=0.05)
    model = build_model("dnn", _schema(), hidden=(16, 8))
    step = jax.jit(make_train_step(model, cfg, make_optimizer(cfg)))
    nxt = _batch(2, disjoint=False)
    after, _ = step(lazy, nxt)
    used = np.unique(np.asarray(nxt["cat"]))
    unused = np.setdiff1d(np.arange(_schema().table_size), used)
    t0, t1 = lazy.params["embedding"]["table"], after.params["embedding"]["table"]
    np.testing.assert_array_equal(np.asarray(t1)[unused], np.asarray(t0)[unused])
    assert np.all(np.abs(np.asarray(t1)[used] - np.asarray(t0)[used]).max(axis=1) > 0)
    mu0, mu1 = (s.opt_state.mu["embedding"]["table"] for s in (lazy, after))
    np.testing.assert_array_equal(np.asarray(mu1)[unused], np.asarray(mu0)[unused])
    # Dense Adam moved rows seen in the first two steps but not in the third.
    dense_after, _ = jax.jit(make_train_step(model, TrainConfig(lr=0.05), make_optimizer(TrainConfig(lr=0.05))))(dense, nxt)
    seen_before = np.setdiff1d(np.unique(np.concatenate([np.asarray(_batch(i, False)["cat"]).ravel() for i in (0, 1)])), used)
    moved = np.abs(np.asarray(dense_after.params["embedding"]["table"] - dense.params["embedding"]["table"]))[seen_before]
    assert moved.max() > 0


def test_learning_rate_is_data_in_the_lazy_state():
    cfg = TrainConfig(optimizer="lazy_adam", lr=3e-3)
    model = build_model("dnn", _schema(), hidden=(8,))
    state = init_state(model, _batch(0, True), cfg, make_optimizer(cfg))
    assert isinstance(state.opt_state, LazyAdamState)
    assert get_lr(state) == pytest.approx(3e-3)
    state = set_lr(state, 1e-4)
    assert get_lr(state) == pytest.approx(1e-4)
    # A zero learning rate leaves every parameter (tables included) where it was.
    state = set_lr(state, 0.0)
    after, _ = jax.jit(make_train_step(model, cfg, make_optimizer(cfg)))(state, _batch(1, True))
    chex.assert_trees_all_equal(after.params, state.params)


def test_sequence_model_with_padded_histories():
    """DIN looks histories up through the remapped ids but masks with the original pad ids:
    its first lazy step equals the dense one."""
    from dpn_jax.benchmark.workloads import get_workload

    w = get_workload("behaviour")
    rows = {k: jnp.asarray(v) for k, v in w.rows(16, seed=3).items()}
    model = build_model("din", w.schema)
    out = {}
    for opt in ("adam", "lazy_adam"):
        cfg = TrainConfig(optimizer=opt)
        tx = make_optimizer(cfg)
        state = init_state(model, rows, cfg, tx)
        out[opt], _ = jax.jit(make_train_step(model, cfg, tx))(state, rows)
    chex.assert_trees_all_close(out["lazy_adam"].params, out["adam"].params, rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optimizer=sgd: choose one of adam, lazy_adam"):
        make_optimizer(TrainConfig(optimizer="sgd"))


def test_vmapped_replicas_with_their_own_clip_equal_their_own_steps():
    """Sweeps: the clip threshold is data in the lazy state, so a replica without clipping and
    one clipping at 0.01 share one vmapped program and each equals its own unvmapped step."""
    model = build_model("dnn", _schema(), hidden=(16, 8))
    cfgs = [TrainConfig(optimizer="lazy_adam", lr=0.05, seed=s, grad_clip=c) for s, c in ((1, 0.0), (2, 0.01))]
    batch = _batch(0, disjoint=True)
    states = [init_state(model, batch, c, make_optimizer(c, clip_as_data=True)) for c in cfgs]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    swept = jax.vmap(make_train_step(model, cfgs[0], make_optimizer(cfgs[0], clip_as_data=True)),
                     in_axes=(0, None))
    got, _ = jax.jit(swept)(stacked, batch)
    for k, c in enumerate(cfgs):
        alone = init_state(model, batch, c, make_optimizer(c))
        ref, _ = jax.jit(make_train_step(model, c, make_optimizer(c)))(alone, batch)
        chex.assert_trees_all_close(jax.tree.map(lambda x, k=k: x[k], got.params), ref.params,
                                    rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(stacked.opt_state.clip), [np.inf, 0.01])


def test_fit_trains_with_lazy_adam(tiny_synthetic):
    from dpn_jax.train.loop import fit

    model = build_model("dnn", tiny_synthetic.schema, hidden=(16,))
    cfg = TrainConfig(optimizer="lazy_adam", batch_size=256, max_epochs=3, lr=3e-3)
    result = fit(model, tiny_synthetic, cfg, progress=False, log=lambda s: None)
    assert result.test["auc"] > 0.6


def test_unique_ids_keeps_each_id_once_at_its_first_occurrence():
    from dpn_jax.train.lazy_adam import unique_ids

    ids = np.random.default_rng(0).integers(0, 50, 300).astype(np.int32)
    uniq, inv = map(np.asarray, jax.jit(unique_ids, static_argnums=1)(jnp.asarray(ids), 99))
    first = {v: i for i, v in reversed(list(enumerate(ids)))}
    expected = np.full(ids.size, 99)
    expected[list(first.values())] = list(first.keys())
    np.testing.assert_array_equal(uniq, expected)
    np.testing.assert_array_equal(inv, [first[v] for v in ids])
    np.testing.assert_array_equal(uniq[inv], ids)
    np.testing.assert_array_equal(np.sort(uniq[uniq != 99]), np.unique(ids))


NATIVE = pytest.mark.skipif(
    __import__("shutil").which("g++") is None and __import__("shutil").which("c++") is None,
    reason="lazy_adam_kernel=native needs a C++ compiler")


@NATIVE
@pytest.mark.parametrize("model_name", ["dnn", "fm"])
def test_native_kernel_equals_the_xla_update(model_name):
    """Three steps with repeated rows, clipping and BatchNorm (dnn) or two tables (fm): the C++
    row update gives the XLA update's parameters and moments to float rounding: XLA fuses and
    vectorises the same formulas differently, and Adam's normalised step at lr 0.05 amplifies
    that (a near-zero gradient's m/√v) to a few 1e-5 after three steps. A wrong update would be
    off by ~lr."""
    kw = {"grad_clip": 0.5}
    xla, xl, _ = _run(model_name, "lazy_adam", 3, disjoint=False, **kw)
    nat, nl, _ = _run(model_name, "lazy_adam", 3, disjoint=False, lazy_adam_kernel="native", **kw)
    tol = {"rtol": 1e-3, "atol": 1e-4}
    np.testing.assert_allclose(nl, xl, **tol)
    chex.assert_trees_all_close(nat.params, xla.params, **tol)
    chex.assert_trees_all_close((nat.opt_state.mu, nat.opt_state.nu),
                                (xla.opt_state.mu, xla.opt_state.nu), **tol)


@NATIVE
def test_native_kernel_under_vmap_updates_each_replica():
    model = build_model("dnn", _schema(), hidden=(8,))
    batch = _batch(0, disjoint=False)
    out = {}
    for kernel in ("xla", "native"):
        cfgs = [TrainConfig(optimizer="lazy_adam", lr=0.05, seed=s, lazy_adam_kernel=kernel) for s in (1, 2)]
        states = [init_state(model, batch, c, make_optimizer(c, clip_as_data=True)) for c in cfgs]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        step = jax.vmap(make_train_step(model, cfgs[0], make_optimizer(cfgs[0], clip_as_data=True)),
                        in_axes=(0, None))
        out[kernel], _ = jax.jit(step)(stacked, batch)
    chex.assert_trees_all_close(out["native"].params, out["xla"].params, rtol=1e-4, atol=1e-6)


@NATIVE
def test_native_row_update_matches_numpy_on_many_rows():
    """50k slots (several threads in the kernel), a third of them padding, rows in random order."""
    from dpn_jax.train.lazy_adam import native_row_update

    rng = np.random.default_rng(7)
    v_rows, d, n = 60_000, 4, 50_000
    t, m, v = (rng.normal(size=(v_rows, d)).astype(np.float32) for _ in range(3))
    v = np.abs(v)
    slots = np.where(rng.random(n) < 0.3, v_rows, rng.permutation(v_rows)[:n]).astype(np.int32)
    g = rng.normal(size=(n, d)).astype(np.float32)
    lr, bc1, bc2 = 1e-2, 0.19, 0.002
    out = jax.jit(native_row_update, static_argnums=(6, 7, 8))(
        t, m, v, slots, g, jnp.asarray([lr, bc1, bc2], jnp.float32), 0.9, 0.999, 1e-8)
    real = slots < v_rows
    r, gr = slots[real], g[real].astype(np.float64)
    mk = 0.9 * m[r] + 0.1 * gr
    vk = 0.999 * v[r] + 0.001 * gr * gr
    want = [x.astype(np.float64) for x in (t, m, v)]
    want[0][r] += -lr * (mk / bc1) / (np.sqrt(vk / bc2) + 1e-8)
    want[1][r], want[2][r] = mk, vk
    for got, ref in zip(out, want):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)


def test_native_kernel_errors_name_the_option():
    with pytest.raises(ConfigError, match="lazy_adam_kernel=fast: choose one of xla, native"):
        make_optimizer(TrainConfig(optimizer="lazy_adam", lazy_adam_kernel="fast"))
    from dpn_jax.train.lazy_adam import native_row_update

    t = jnp.zeros((4, 2), jnp.bfloat16)
    with pytest.raises(ConfigError, match="lazy_adam_kernel=native: float32 tables only"):
        native_row_update(t, t, t, jnp.zeros(1, jnp.int32), t[:1], jnp.ones(3), 0.9, 0.999, 1e-8)
