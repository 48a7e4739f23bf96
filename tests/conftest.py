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


# The fast lane (`pytest -m "not slow"`, under 3 minutes on 2 cores) leaves these out as well as
# the tests marked `slow` where they are defined. Each is a second route to something the lane
# already checks (its reason says which), a kill/resume, multi-process or multi-device run, or a
# peer import. They keep the fast compiles of the lane; the full suite runs them all.
OUT_OF_FAST_LANE = {
    "tests/test_benchmark.py::test_fuxictr_peer_matches_our_parameter_count": "imports torch and FuxiCTR",
    "tests/test_tune.py::test_killed_tune_resumes_to_the_uninterrupted_result": "kill/resume",
    "tests/test_serving_export.py::test_behaviour_model_round_trips_through_bundle_and_export":
        "the feature-model round trip runs in the lane",
    "tests/test_dispatch.py::test_blocks_on_a_mesh_split_rows_over_data_and_train_like_one_device":
        "multi-device",
    "tests/test_dispatch.py::test_killed_mid_block_resumes_exactly_with_any_steps_per_dispatch":
        "kill/resume",
    "tests/test_dispatch.py::test_sweep_in_blocks_equals_one_step_per_dispatch":
        "fit in blocks runs in the lane; the sweep shares its engine",
    "tests/test_sharding.py::test_mesh_training_matches_one_device_and_keeps_its_layout": "multi-device",
    "tests/test_sharding.py::test_two_processes_train_like_one": "multi-process",
    "tests/test_sweep.py::test_run_sweep_groups_by_shape_and_resumes": "kill/resume",
    "tests/test_sweep.py::test_killed_sweep_resumes_from_its_checkpoint": "kill/resume",
    "tests/test_checkpoint.py::test_sigkilled_run_resumes_exactly": "kill/resume",
    "tests/test_dien.py::test_training_beats_chance_and_optimises_the_aux_loss": "training quality",
    "tests/test_transformer_models.py::test_training_reduces_the_loss": "training quality",
    "tests/test_sequence_models.py::test_training_reduces_the_loss": "training quality",
    "tests/test_knockout.py::test_knockout_of_a_sequence_model_changes_its_nested_dpo_layers_only":
        "the feature-model knock-out runs in the lane",
    "tests/test_lazy_adam.py::test_sequence_model_with_padded_histories":
        "lazy Adam on feature models runs in the lane",
    "tests/test_experiments.py::test_dien_probe_knockouts_match_independent_routes":
        "an experiment script's second route",
    "tests/test_experiments.py::test_seeds_script_continues_a_killed_sweep": "kill/resume",
    # one training smoke run per zoo family stays in the lane (autoint; crossnet, dcn, dcnv2, cin)
    **{f"tests/test_zoo_deep_family.py::test_training_smoke[{m}]": "one smoke run per family stays"
       for m in ("afn", "afn_plus", "autoint_plus", "apg", "finalmlp")},
    "tests/test_zoo_cross_family.py::test_training_smoke[xdeepfm]": "one smoke run per family stays",
    **{f"tests/test_transformer_models.py::test_models_are_padding_invariant[{m}]":
       "bst's padding invariance runs in the lane" for m in ("bst_dpo", "dyjoint")},
    "tests/test_sequence_models.py::test_embedding_init_std_sets_the_table_init[dien]":
        "din's runs in the lane",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = OUT_OF_FAST_LANE.get(item.nodeid)
        if item.name.endswith("__without_jit"):
            reason = "its __with_jit twin runs in the fast lane"
        if reason and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow(fast_lane=reason))


@pytest.fixture(autouse=True)
def _fast_compiles(request):
    """Most tests run tiny programs once: XLA's optimisation passes cost far more than they save.
    Tests marked ``slow`` where they are defined (they train for many steps) or asking for
    ``optimized`` keep them; those only left out of the fast lane (OUT_OF_FAST_LANE) do not."""
    import jax

    slow = request.node.get_closest_marker("slow")
    keep = (slow is not None and "fast_lane" not in slow.kwargs) or "optimized" in request.fixturenames
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
