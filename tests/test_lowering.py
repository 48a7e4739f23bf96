"""Every registered model's train and eval steps lower for GPUs (``cuda``) and TPUs, checked on
a CPU-only machine with ``jax.export`` (lowering only: nothing is compiled or allocated), and
options that run on the CPU only are refused where a run is configured, naming the backend."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from jax import export
from seq_fixtures import seq_schema
from test_serving_data import trained_bundle

import dpn_jax.runner
import dpn_jax.sweep_runner
from dpn_jax.cli import main
from dpn_jax.data.schema import FieldInfo, Schema
from dpn_jax.errors import ConfigError
from dpn_jax.models import available_models, build_model, model_options
from dpn_jax.models.registry import get_model_class
from dpn_jax.serving.exported import EXPORT_JSON, EXPORT_PROGRAM
from dpn_jax.train.backend import check_options_for_backend
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.state import init_state, make_optimizer, make_predict, make_train_step

PLATFORMS = ("cuda", "tpu")
BATCH = 8


def lowering_schema() -> Schema:
    """Categorical fields, behaviour histories sharing their targets' rows (the behaviour models'
    input) and a numeric field: every model finds the inputs it reads."""
    s = seq_schema()
    return dataclasses.replace(s, fields=(*s.fields, FieldInfo("price", "num", column=0)))


def batch_spec(schema: Schema) -> dict[str, jax.ShapeDtypeStruct]:
    spec = {"cat": jax.ShapeDtypeStruct((BATCH, len(schema.cat_fields)), jnp.int32),
            "num": jax.ShapeDtypeStruct((BATCH, len(schema.numeric_fields)), jnp.float32),
            "label": jax.ShapeDtypeStruct((BATCH,), jnp.float32)}
    for f in schema.seq_fields:
        spec[f"seq/{f.name}"] = jax.ShapeDtypeStruct((BATCH, f.max_len), jnp.int32)
    return spec


def shapes(avals) -> list:
    return [(tuple(a.shape), jnp.dtype(a.dtype)) for a in avals]


@dataclasses.dataclass
class Case:
    """A model with its optimiser and the shapes of its train state (never allocated)."""

    model: object
    cfg: TrainConfig
    tx: object
    state: object
    batch: dict

    @classmethod
    def build(cls, name: str, cfg: TrainConfig | None = None, **model_kw) -> Case:
        cfg = cfg or TrainConfig()
        schema = lowering_schema()
        model = build_model(name, schema, **model_kw)
        tx = make_optimizer(cfg)
        batch = batch_spec(schema)
        state = jax.eval_shape(lambda b: init_state(model, b, cfg, tx), batch)
        return cls(model, cfg, tx, state, batch)

    def export_train(self, platforms=PLATFORMS):
        # jitted as the fit loop jits it (dpn_jax/train/sharding.py without a mesh)
        step = jax.jit(make_train_step(self.model, self.cfg, self.tx), donate_argnums=0)
        exp = export.export(step, platforms=platforms)(self.state, self.batch)
        expected = jax.eval_shape(step, self.state, self.batch)  # (new state, loss)
        assert exp.platforms == tuple(platforms)
        assert shapes(exp.out_avals) == shapes(jax.tree.leaves(expected))
        assert exp.out_avals[-1].shape == ()  # the loss
        return exp

    def export_eval(self, platforms=PLATFORMS):
        predict = jax.jit(make_predict(self.model))
        exp = export.export(predict, platforms=platforms)(self.state.params, self.state.batch_stats, self.batch)
        assert exp.platforms == tuple(platforms)
        assert shapes(exp.out_avals) == [((BATCH,), jnp.float32)]  # one logit per row
        return exp


def models_by_family() -> list:
    """Every model; the first of each family (its module) in the fast lane, the others ``slow``
    (still in the default suite)."""
    seen, out = set(), []
    for name in available_models():
        family = get_model_class(name).__module__
        out.append(pytest.param(name, marks=() if family not in seen else pytest.mark.slow))
        seen.add(family)
    return out


@pytest.fixture(scope="module", params=models_by_family())
def case(request) -> Case:
    """One per model (default options, default optimiser), shared by its train and eval tests."""
    return Case.build(request.param)


def test_train_step_lowers_for_gpu_and_tpu(case: Case) -> None:
    case.export_train()


def test_eval_step_lowers_for_gpu_and_tpu(case: Case) -> None:
    exp = case.export_eval()
    # the serving path serialises programs: the eval step's has no platform-local custom call
    assert export.deserialize(exp.serialize()).platforms == PLATFORMS


@pytest.mark.parametrize("name", ["dnn", "din", *(pytest.param(m, marks=pytest.mark.slow)
                                                 for m in ("dpn", "bst_dpo"))])
def test_lazy_adam_train_step_lowers_for_gpu_and_tpu(name: str) -> None:
    """Lazy Adam's gathers and scatters (kernel ``xla``, the default) on a tabular model and on
    behaviour models whose histories share their targets' rows."""
    case = Case.build(name, TrainConfig(optimizer="lazy_adam"))
    assert type(case.state.opt_state).__name__ == "LazyAdamState"
    case.export_train()


BF16_MODELS = [m for m in available_models() if "matmul_dtype" in model_options(m)]


@pytest.mark.parametrize("name", [m if m == "dnn" else pytest.param(m, marks=pytest.mark.slow)
                                  for m in BF16_MODELS])
def test_bfloat16_products_lower_for_gpu_and_tpu_and_keep_the_cpu_layout(name: str) -> None:
    """``matmul_dtype=bfloat16``: the weight gradient's row-major ``xᵀ`` is a CPU remedy whose
    ``LayoutConstraint`` custom call cannot be exported; it stays in the CPU lowering only."""
    case = Case.build(name, matmul_dtype="bfloat16")
    exp = case.export_train()
    assert "LayoutConstraint" not in exp.mlir_module()
    assert "bf16" in exp.mlir_module()  # the products are still bfloat16
    step = jax.jit(make_train_step(case.model, case.cfg, case.tx), donate_argnums=0)
    assert "LayoutConstraint" in step.trace(case.state, case.batch).lower(lowering_platforms=("cpu",)).as_text()


def test_vmapped_bfloat16_lazy_adam_step_lowers() -> None:
    """bfloat16 products, lazy Adam and clipping in one step, replicas vmapped (as
    ``dpn-jax bench --replicas`` runs them)."""
    case = Case.build("dnn", TrainConfig(optimizer="lazy_adam", grad_clip=1.0), matmul_dtype="bfloat16",
                      hidden=(16, 8))
    states = jax.tree.map(lambda x: jax.ShapeDtypeStruct((3, *x.shape), x.dtype), case.state)
    step = jax.jit(jax.vmap(make_train_step(case.model, case.cfg, case.tx), in_axes=(0, None)),
                   donate_argnums=0)
    exp = export.export(step, platforms=PLATFORMS)(states, case.batch)
    assert exp.out_avals[-1].shape == (3,)  # a loss per replica


# ----------------------------------------------------------------------------- refusals


CPU_ONLY = [
    ({"optimizer": "lazy_adam", "lazy_adam_kernel": "native"}, {},
     "--set lazy_adam_kernel=native runs on the CPU only; this run's backend is {}: use lazy_adam_kernel=xla"),
    ({}, {"matmul_dtype": "bfloat16_mkl"},
     "--set matmul_dtype=bfloat16_mkl runs on the CPU only; this run's backend is {}: use matmul_dtype=bfloat16"),
]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize(("train_kw", "model_kw", "message"), CPU_ONLY,
                         ids=["lazy_adam_kernel=native", "matmul_dtype=bfloat16_mkl"])
def test_cpu_only_options_are_refused_off_cpu(train_kw, model_kw, message, backend) -> None:
    with pytest.raises(ConfigError) as err:
        check_options_for_backend(TrainConfig(**train_kw), model_kw, backend=backend)
    assert str(err.value) == message.format(backend)
    check_options_for_backend(TrainConfig(**train_kw), model_kw, backend="cpu")  # allowed there


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_portable_options_pass_on_every_backend(backend) -> None:
    for cfg, model_kw in [(TrainConfig(), {}), (TrainConfig(optimizer="lazy_adam"), {"matmul_dtype": "bfloat16"}),
                          (TrainConfig(), {"matmul_dtype": "float32"})]:
        check_options_for_backend(cfg, model_kw, backend=backend)


@pytest.fixture
def gpu_backend(monkeypatch):
    """This process reports a GPU backend, and loading data fails the test: a refusal must come
    when the run is configured, before its data loads (let alone a step compiles)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

    def no_data(*a, **k):
        raise AssertionError("the data loaded: the option was not refused when the run was configured")

    monkeypatch.setattr(dpn_jax.runner, "load_dataset", no_data)
    monkeypatch.setattr(dpn_jax.sweep_runner, "load_dataset", no_data)


@pytest.mark.parametrize(("sets", "option"), [
    (["optimizer=lazy_adam", "lazy_adam_kernel=native"], "lazy_adam_kernel=native"),
    (["matmul_dtype=bfloat16_mkl"], "matmul_dtype=bfloat16_mkl"),
], ids=["lazy_adam_kernel=native", "matmul_dtype=bfloat16_mkl"])
def test_train_refuses_cpu_only_options_on_gpu_in_one_line(gpu_backend, capsys, sets, option) -> None:
    argv = ["train", "--model", "dnn", "--data", "synthetic"]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--set {option} runs on the CPU only; this run's backend is gpu" in err[0], err


def test_sweep_refuses_a_cpu_only_grid_value_on_gpu(gpu_backend) -> None:
    with pytest.raises(ConfigError, match="matmul_dtype=bfloat16_mkl runs on the CPU only; this run's backend is gpu"):
        dpn_jax.sweep_runner.run_sweep("dnn", "synthetic", seeds=[1, 2],
                                       grid={"matmul_dtype": ["bfloat16", "bfloat16_mkl"]})
    with pytest.raises(ConfigError, match="lazy_adam_kernel=native runs on the CPU only"):
        dpn_jax.sweep_runner.train_seeds("dnn", None, [1], ["lazy_adam_kernel=native"])


# ----------------------------------------------------------------------------- dpn-jax export


def test_export_of_a_trained_bundle_for_gpu_and_tpu(tmp_path_factory) -> None:
    """``dpn-jax export --platforms cuda,tpu``: one artifact for both, readable back."""
    bundle = trained_bundle(tmp_path_factory, "dnn")
    out = tmp_path_factory.mktemp("export-accel") / "dnn"
    assert main(["export", "--model", str(bundle), "--out", str(out), "--platforms", "cuda,tpu"]) == 0
    meta = json.loads((out / EXPORT_JSON).read_text())
    assert meta["platforms"] == list(PLATFORMS)
    exp = export.deserialize(bytearray((out / EXPORT_PROGRAM).read_bytes()))
    assert exp.platforms == PLATFORMS
    assert [a.shape[1] for a in exp.in_avals] == [x["width"] for x in meta["inputs"]]
    assert len(exp.out_avals) == 1 and exp.out_avals[0].dtype == jnp.float32


def test_fit_api_refuses_the_native_kernels_off_cpu_with_the_same_line(monkeypatch) -> None:
    """``fit`` called directly (no runner) still refuses before tracing: the optimiser and the
    MKL products check the backend when they are built."""
    from dpn_jax.nn import mkl_matmul

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ConfigError) as err:
        make_optimizer(TrainConfig(optimizer="lazy_adam", lazy_adam_kernel="native"))
    assert str(err.value) == CPU_ONLY[0][2].format("tpu")
    assert mkl_matmul.unavailable_reason() == CPU_ONLY[1][2].format("tpu")
