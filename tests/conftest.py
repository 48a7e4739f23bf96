"""Shared fixtures: small generated datasets, and the location of the real data."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest
from jax.test_util import check_grads

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    for cand in (os.environ.get("DPN_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "frappe" / "frappe.test.libfm").exists():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def tiny_synthetic():
    from dpn_jax.data.synthetic import make_synthetic

    return make_synthetic(seed=3, rows=3000, fields=4, vocab=10)


@pytest.fixture(scope="session")
def frappe_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data/frappe not found: set DPN_DATA_DIR to the folder holding frappe/")
    return d


@pytest.fixture(scope="session", autouse=True)
def _xla_compilation_cache(tmp_path_factory):
    # Identical programs compiled by different tests are compiled once per session.
    from dpn_jax.train import xla_cache

    xla_cache.enable(tmp_path_factory.getbasetemp() / "xla-cache")


@pytest.fixture(autouse=True)
def _fast_compiles(request):
    """Most tests run tiny programs once: XLA's optimisation passes cost far more than they save.
    Tests marked ``slow`` (they train for many steps) or asking for ``optimized`` keep them."""
    import jax

    keep = request.node.get_closest_marker("slow") is not None or "optimized" in request.fixturenames
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", not keep)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture
def optimized():
    """Request this in a test whose run time (not compile time) matters."""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never write to the user's ~/.cache.
    monkeypatch.setenv("DPN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dpn-cache"))


def check_grads_naming_culprit(make_fn, params: dict, *args) -> None:
    """``check_grads`` (order 1, reverse mode) of ``make_fn(keys)(params, *args)`` for all keys at
    once -- one compile instead of one per case -- then, on failure, key by key to name it."""

    def check(keys):
        # jitted: every finite-difference evaluation hits the compile cache
        check_grads(jax.jit(make_fn(keys)), ({k: params[k] for k in keys}, *args), order=1,
                    modes=("rev",))

    try:
        check(tuple(params))
    except AssertionError:
        for key in params:
            try:
                check((key,))
            except AssertionError as err:
                raise AssertionError(f"wrong gradient in {key!r}: {err}") from err
        raise
