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
    "tests/test_sweep.py::test_replicas_equal_sequential_runs":
        "test_chunks_equal_one_program_and_memory_plan compares sweep programs in the lane",
    "tests/test_tune.py::test_select_seeds_trains_the_top_trials_on_the_other_seeds":
        "test_tune_cli_end_to_end runs in the lane",
    "tests/test_dien.py::test_query_transform_dense_prelu_is_dien_public_code":
        "an equivalence with DIEN's public code; DIEN's own tests run in the lane",
    "tests/test_knockout.py::test_cli_evaluate_knockout_refusals_are_one_line":
        "the knock-out command runs in the lane",
    "tests/test_by_frequency.py::test_cli_evaluate_by_frequency_end_to_end":
        "by-frequency's functions are tested in the lane",
    "tests/test_checkpoint.py::test_mid_epoch_resume_equals_uninterrupted": "kill/resume",
    "tests/test_checkpoint.py::test_unusable_checkpoints_give_one_line_and_no_traceback":
        "several resume attempts",
    "tests/test_zoo_deep_family.py::test_training_smoke": "one smoke run per family stays (crossnet, fm)",
    "tests/test_dispatch.py::test_non_finite_steps_inside_a_block_are_skipped_or_stop_like_one_per_dispatch":
        "blocks equal one step per dispatch in the lane; non-finite handling in test_checkpoint",
    "tests/test_dispatch.py::test_lazy_adam_in_blocks_equals_one_step_per_dispatch":
        "blocks equal one step per dispatch with Adam in the lane",
}


# End-to-end and multi-step runs that take 4 s or more on 2 cores (measured with --junitxml): the
# units they compose are tested in the lane, the full suite runs them.
END_TO_END = {
    "tests/test_train.py::TestTrainStep::test_step_same_with_and_without_jit__with_jit",
    "tests/test_train.py::test_same_seed_bit_identical_and_best_restored",
    "tests/test_tune.py::test_tune_cli_end_to_end",
    "tests/test_knockout.py::test_cli_evaluate_knockout_on_a_trained_bundle",
    "tests/test_by_frequency.py::test_cli_errors_are_one_line",
    "tests/test_mkl_matmul.py::test_model_with_mkl_products_equals_xla_bf16",
    "tests/test_dispatch.py::test_many_steps_per_dispatch_and_device_data_train_exactly_like_one",
    "tests/test_benchmark.py::test_tiny_harness_run_reports_every_row",
    "tests/test_outputs_atomic.py::test_failed_predict_keeps_the_previous_output_and_names_file_and_row",
    "tests/test_outputs_atomic.py::test_train_replaces_only_its_own_bundle_atomically_keeping_checkpoints",
    "tests/test_engine.py::test_fit_equals_a_hand_written_loop_bit_for_bit",
    "tests/test_sweep.py::test_chunks_equal_one_program_and_memory_plan",
    "tests/test_sweep.py::test_stopped_replicas_are_compacted_away",
    "tests/test_lowering.py::test_export_of_a_trained_bundle_for_gpu_and_tpu",
    "tests/test_lazy_adam.py::test_vmapped_replicas_with_their_own_clip_equal_their_own_steps",
    "tests/test_lazy_adam.py::test_native_kernel_equals_the_xla_update",
    "tests/test_lazy_adam.py::TestLazyEqualsDense::test_no_repeated_rows_means_dense_adam__with_jit",
    "tests/test_lazy_adam.py::test_rows_absent_from_a_batch_stay_put",
    "tests/test_models_dpn.py::test_dpn_models_shapes_and_gradients",
    "tests/test_models_dpn.py::test_self_field_dpn_is_additive_in_the_fields_and_sum_is_not",
    "tests/test_sequence_models.py::test_embedding_init_std_sets_the_table_init",
    "tests/test_sequence_models.py::TestModels::test_shapes_and_finite_gradients__with_jit",
    "tests/test_dpo_generate.py::test_gradients_match_finite_differences",
    "tests/test_transformer_models.py::test_bst_is_bst_dpo_without_dpo",
    "tests/test_data_tabular_builtins.py::test_cli_data_list_prepare_and_train",
    "tests/test_checkpoint.py::test_nan_stops_keeping_the_last_good_checkpoint_then_skip_resumes",
    "tests/test_checkpoint.py::test_truncated_checkpoint_is_reported",
    "tests/test_experiments.py::test_seeds_script_sweeps_writes_and_resumes",
    "tests/test_dispatch.py::test_checkpoints_fall_on_the_block_passing_each_multiple",
    "tests/test_outputs_atomic.py::test_failed_export_keeps_the_previous_export",
    "tests/test_benchmark.py::test_matmul_dtypes_add_rows_for_models_with_the_option",
    "tests/test_lazy_adam.py::test_native_kernel_under_vmap_updates_each_replica",
}

# Tests run once per model or case: the lane keeps the first case of each (all indices 0), the
# full suite runs every case.
FIRST_CASE_IN_FAST_LANE = {
    "tests/test_zoo_deep_family.py::test_model_finite_logits_and_grads",
    "tests/test_zoo_cross_family.py::test_finite_logits_and_grads",
    "tests/test_zoo_fm_family.py::test_finite_logits_and_grads",
    "tests/test_zoo_cross_family.py::test_training_smoke",
    "tests/test_zoo_fm_family.py::test_training_smoke",
    "tests/test_models_basic.py::test_every_model_gives_finite_logits_and_grads",
    "tests/test_models_dpn.py::test_per_field_context_equals_explicit_sum",
    "tests/test_sequence_models.py::test_models_are_padding_invariant",
    "tests/test_sequence_models.py::test_every_layer_is_padding_invariant",
    "tests/test_transformer_models.py::test_length_one_and_empty_histories",
    "tests/test_transformer_models.py::test_every_layer_is_padding_invariant",
    "tests/test_transformer_models.py::test_models_are_padding_invariant",
    "tests/test_dien.py::test_models_are_padding_invariant",
    "tests/test_dien.py::test_recurrence_matches_python_loop_and_ignores_padding",
    "tests/test_knockout.py::test_feature_dpo_knocked_out_is_its_static_dense_layer",
    "tests/test_knockout.py::test_field_dpo_knocked_out_is_the_static_kernel_times_the_aggregated_constant",
    "tests/test_knockout.py::test_query_behaviour_dpo_knocked_out_applies_the_static_kernel_to_every_valid_step",
    "tests/test_cli.py::test_train_user_csv_end_to_end",
    "tests/test_precision.py::test_model_with_bf16_products_matches_float32_closely",
    "tests/test_lowering.py::test_train_step_lowers_for_gpu_and_tpu",
}


def _fast_lane_exclusion(item) -> str | None:
    if item.name.endswith("__without_jit"):
        return "its __with_jit twin runs in the fast lane"
    base = item.nodeid.split("[", 1)[0]
    callspec = getattr(item, "callspec", None)
    if base in FIRST_CASE_IN_FAST_LANE and callspec and any(callspec.indices.values()):
        return "the first case runs in the fast lane"
    if base in END_TO_END:
        return "an end-to-end or multi-step run; its units are tested in the lane"
    return OUT_OF_FAST_LANE.get(item.nodeid) or OUT_OF_FAST_LANE.get(base)


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = _fast_lane_exclusion(item)
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
