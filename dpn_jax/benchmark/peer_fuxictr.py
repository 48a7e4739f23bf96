"""The PyTorch peer: the same models built from FuxiCTR's layers, timed like ours.

Install with ``pip install -e ".[peers]"`` (torch and fuxictr are not core dependencies).
FuxiCTR's ``fuxictr.preprocess`` package imports ``ray`` at import time, which its layers do not
need; a stub module for ``fuxictr.preprocess`` lets the layers import without ray, and tensors
are fed directly rather than through its ray-based loaders.

Architectures (FuxiCTR's, with our models' default sizes): one ``nn.Embedding`` per field, as
FuxiCTR's ``FeatureEmbeddingDict`` builds (normal init, std 1e-4); ``dnn`` = ``MLP_Block``
400-400-400 with BatchNorm and ReLU; ``dcnv2`` = ``CrossNetV2`` (3 layers) parallel to that MLP;
``din`` = ``DIN_Attention`` (80-40, sigmoid) over the joint item+category history and a Dice MLP
200-80. Dense ``torch.optim.Adam`` at lr 1e-3, optional ``clip_grad_norm_`` like our
``grad_clip``; the step is forward + BCE-with-logits + backward + clip + step.

The harness times the peer's training in a fresh process (:func:`measure_peer_train_isolated`),
as a PyTorch user would run it: inside the harness's process, after our rows, FuxiCTR's Criteo
step ran at 18-23k samples/s against 32-35k in a process of its own on the same machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
import types
from collections.abc import Sequence

import numpy as np

from dpn_jax.benchmark.measure import TrainMeasure, summarise, time_steps
from dpn_jax.benchmark.workloads import Workload
from dpn_jax.errors import ConfigError

PEER_MODELS = ("dnn", "dcnv2", "din")


def available() -> str | None:
    """``None`` when torch and fuxictr import, else the reason they do not."""
    for mod in ("torch", "fuxictr"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed: pip install -e \".[peers]\""
    return None


def _import_layers():
    if "fuxictr.preprocess" not in sys.modules:  # skip its ray import (see module docstring)
        root = importlib.util.find_spec("fuxictr").submodule_search_locations[0]
        stub = types.ModuleType("fuxictr.preprocess")
        stub.__path__ = [f"{root}/preprocess"]
        sys.modules["fuxictr.preprocess"] = stub
    import fuxictr
    from fuxictr.pytorch.layers import CrossNetV2, MLP_Block
    from fuxictr.pytorch.layers.attentions.target_attention import DIN_Attention

    return fuxictr.__version__, MLP_Block, CrossNetV2, DIN_Attention


def _build(name: str, workload: Workload, dim: int = 10):
    import torch
    from torch import nn

    version, MLP_Block, CrossNetV2, DIN_Attention = _import_layers()
    schema = workload.schema
    cat = sorted(schema.cat_fields, key=lambda f: f.column)

    def embeddings():
        tables = nn.ModuleList(nn.Embedding(f.vocab_size, dim) for f in cat)
        for t in tables:
            nn.init.normal_(t.weight, std=1e-4)
        return tables

    class Tabular(nn.Module):
        def __init__(self, cross: bool):
            super().__init__()
            self.tables = embeddings()
            width = len(cat) * dim
            self.cross = CrossNetV2(width, 3) if cross else None
            self.mlp = MLP_Block(width, [400, 400, 400], "ReLU", output_dim=None if cross else 1,
                                 batch_norm=True)
            self.out = nn.Linear(width + 400, 1) if cross else None

        def forward(self, x):
            # ids are offsets into our concatenated table: make them local per field
            e = torch.cat([t(x["cat"][:, i] - cat[i].offset) for i, t in enumerate(self.tables)], 1)
            if self.cross is None:
                return self.mlp(e).squeeze(-1)
            return self.out(torch.cat([self.cross(e), self.mlp(e)], -1)).squeeze(-1)

    class DIN(nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = embeddings()
            self.field = {f.name: i for i, f in enumerate(cat)}
            self.hist = [f for f in schema.seq_fields]
            self.att = DIN_Attention(2 * dim, [80, 40], "Sigmoid")
            from fuxictr.pytorch.layers.activations import Dice

            self.mlp = MLP_Block(len(cat) * dim + 2 * dim, [200, 80], [Dice(200), Dice(80)],
                                 output_dim=1)

        def _embed(self, name, ids):
            i = self.field[name]
            return self.tables[i](ids - cat[i].offset)

        def forward(self, x):
            e = [self._embed(f.name, x["cat"][:, i]) for i, f in enumerate(cat)]
            target = torch.cat([e[self.field[f.share_vocab]] for f in self.hist], -1)
            seqs = [x[f"seq/{f.name}"] for f in self.hist]
            hist = torch.cat([self._embed(f.share_vocab, s) for f, s in zip(self.hist, seqs)], -1)
            mask = seqs[0] != self.hist[0].pad_id
            pooled = self.att(target, hist, mask)
            return self.mlp(torch.cat([*e, pooled], -1)).squeeze(-1)

    builders = {"dnn": lambda: Tabular(False), "dcnv2": lambda: Tabular(True), "din": DIN}
    if name not in builders:
        raise ConfigError(f"--peer fuxictr: no FuxiCTR peer for model {name!r}; peers exist for {list(builders)}")
    return version, builders[name]()


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _to_torch(batch: dict, device: str) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def measure_peer_train(name: str, workload: Workload, batch_size: int, *, grad_clip: float = 0.0,
                       steps: int = 20, warmup: int = 3, lr: float = 1e-3,
                       autocast: bool = False) -> tuple[str, TrainMeasure]:
    """``autocast``: the forward pass under ``torch.autocast(bfloat16)`` (PyTorch's mixed
    precision: bf16 products, the backward ones too), the peer of our bfloat16 matmul_dtype."""
    import torch

    device = torch_device()
    version, model = _build(name, workload)
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    rows = workload.rows(batch_size * 8)
    pool = [_to_torch({k: v[i * batch_size:(i + 1) * batch_size] for k, v in rows.items()}, device)
            for i in range(8)]

    def run(batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch)
        loss = loss_fn(logits.float(), batch["label"])
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        else:
            loss.item()

    times = time_steps(run, pool, steps, warmup)
    sps, med, spread = summarise(times, batch_size)
    n_params = sum(p.numel() for p in model.parameters())
    memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return version, TrainMeasure(sps, med, spread, 0.0, memory, int(n_params))


def measure_peer_latency(name: str, workload: Workload, batch_sizes: Sequence[int], *,
                         requests: int = 50) -> dict[int, tuple[float, float]]:
    import torch

    device = torch_device()
    _, model = _build(name, workload)
    model = model.to(device).eval()
    out = {}
    for b in batch_sizes:
        batch = {k: v for k, v in workload.rows(b, seed=b).items() if k != "label"}
        n = requests if b < 1024 else max(10, requests // 5)

        def call(batch=batch):
            with torch.no_grad():
                return model(_to_torch(batch, device)).cpu().numpy()

        for _ in range(5):
            call()
        t = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            call()
            t[i] = time.perf_counter() - t0
        out[b] = tuple(float(x) for x in np.percentile(t, [50, 99]) * 1e3)
    return out


def measure_peer_train_isolated(name: str, workload: Workload, batch_size: int, *,
                                grad_clip: float = 0.0, steps: int = 20,
                                autocast: bool = False) -> tuple[str, TrainMeasure]:
    """:func:`measure_peer_train` in a child Python process (nothing of ours loaded there but
    the workload generator), so the harness's own threads, allocations and native libraries
    cannot slow the peer."""
    args = {"name": name, "workload": workload.name, "batch_size": batch_size,
            "grad_clip": grad_clip, "steps": steps, "autocast": autocast}
    proc = subprocess.run([sys.executable, "-m", "dpn_jax.benchmark.peer_fuxictr", json.dumps(args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"FuxiCTR peer process failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["version"], TrainMeasure(**out["measure"])


def _child(argv: list[str]) -> None:
    from dpn_jax.benchmark.workloads import get_workload

    a = json.loads(argv[0])
    version, m = measure_peer_train(a["name"], get_workload(a["workload"]), a["batch_size"],
                                    grad_clip=a["grad_clip"], steps=a["steps"], autocast=a["autocast"])
    print(json.dumps({"version": version, "measure": dataclasses.asdict(m)}))


if __name__ == "__main__":
    _child(sys.argv[1:])
