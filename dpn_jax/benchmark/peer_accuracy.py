"""The accuracy peer: FuxiCTR's DNN trained by FuxiCTR's own ``BaseModel.fit`` on our encoded arrays.

The speed peer (:mod:`dpn_jax.benchmark.peer_fuxictr`) times one step; this one trains to early
stopping under FuxiCTR 2.3.10's protocol, as a FuxiCTR user would run its ``DNN`` model: the
model is FuxiCTR's ``model_zoo/DNN`` class (``FeatureEmbedding`` -> ``MLP_Block`` with one output
unit and a sigmoid), built on FuxiCTR's ``BaseModel``, so everything the protocol does comes from
FuxiCTR's code: ``reset_parameters`` (xavier-normal ``nn.Linear`` weights, zero biases, N(0, 1e-4)
embeddings), Adam, BCE on probabilities, ``clip_grad_norm_(max_gradient_norm=10)``, evaluation on
validation once per epoch in eval mode (BatchNorm running statistics, PyTorch momentum 0.1),
``checkpoint_and_earlystop`` (min_delta 1e-6, learning rate x0.1 on every non-improving epoch
down to 1e-6, patience 2), and reloading the best weights before the test.

Only the input side is ours: a ``FeatureMap`` written from our :class:`~dpn_jax.data.schema.Schema`
(one FuxiCTR feature per field, local ids = our global ids minus the field's offset, local 0 the
padding row) and a loader over our arrays that reshuffles the train split every epoch. Both
libraries therefore see the same rows, splits and vocabularies.

Each run trains in a child process (:func:`train_isolated`), as for the speed peer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from dpn_jax.data.schema import Dataset, Schema, Split, split_len
from dpn_jax.errors import ConfigError

# FuxiCTR's BaseModel / DNN defaults as a FuxiCTR user gets them (model_zoo/DNN with our sizes).
FUXICTR_DEFAULTS: dict[str, Any] = {
    "embedding_dim": 10, "hidden": (400, 400, 400), "batch_norm": True, "dropout": 0.0,
    "lr": 1e-3, "batch_size": 4096, "max_epochs": 100, "patience": 2, "grad_clip": 10.0,
    "reduce_lr_on_plateau": True, "embedding_l2": 0.0, "net_l2": 0.0,
}


def feature_specs(schema: Schema) -> OrderedDict:
    """FuxiCTR feature specs of our schema, in our field order (cat, num, seq).

    Categorical and sequence fields keep our block layout (local 0 = padding, 1 = OOV), so their
    ``padding_idx`` is 0; a ``share_vocab`` sequence shares its field's table (FuxiCTR's
    ``share_embedding``) and is mean-pooled over its valid steps (``MaskedAveragePooling``)."""
    specs = OrderedDict()
    for f in sorted(schema.cat_fields, key=lambda f: f.column):
        specs[f.name] = {"type": "categorical", "vocab_size": int(f.vocab_size), "padding_idx": 0,
                         "source": ""}
    for f in sorted(schema.numeric_fields, key=lambda f: f.column):
        specs[f.name] = {"type": "numeric", "source": ""}
    for f in schema.seq_fields:
        spec = {"type": "sequence", "vocab_size": int(f.vocab_size), "padding_idx": 0,
                "max_len": int(f.max_len), "source": "",
                "feature_encoder": "layers.MaskedAveragePooling()"}
        if f.share_vocab:
            spec["share_embedding"] = f.share_vocab
        specs[f.name] = spec
    return specs


def local_columns(split: Split, schema: Schema, rows: np.ndarray | slice = slice(None)) -> dict:
    """``{feature name: array}`` of FuxiCTR inputs for ``rows`` of ``split`` (+ ``"label"``):
    categorical and sequence ids made local to their field's block."""
    out = {}
    cat = np.asarray(split["cat"][rows]) if schema.cat_fields else None
    for f in schema.cat_fields:
        out[f.name] = (cat[:, f.column] - f.offset).astype(np.int64)
    if schema.numeric_fields:
        num = np.asarray(split["num"][rows])
        for f in schema.numeric_fields:
            out[f.name] = num[:, f.column].astype(np.float32)
    for f in schema.seq_fields:
        out[f.name] = (np.asarray(split[f"seq/{f.name}"][rows]) - f.offset).astype(np.int64)
    out["label"] = np.asarray(split["label"][rows], np.float32)
    return out


def check_ids(split: Split, schema: Schema, split_name: str) -> None:
    """Every id of every field inside its block: FuxiCTR's per-field tables would index out of range."""
    for f in (*schema.cat_fields, *schema.seq_fields):
        ids = np.asarray(split["cat"][:, f.column] if f.kind == "cat" else split[f"seq/{f.name}"])
        if ids.size and (ids.min() < f.offset or ids.max() >= f.offset + f.vocab_size):
            raise ConfigError(f"{split_name} split, field {f.name!r}: ids {ids.min()}..{ids.max()} lie "
                              f"outside its block [{f.offset}, {f.offset + f.vocab_size})")


class _Loader:
    """FuxiCTR's loaders yield dicts of tensors per batch and have a length; so does this one."""

    def __init__(self, split: Split, schema: Schema, batch_size: int, shuffle: bool, seed: int):
        self.split, self.schema, self.batch_size, self.shuffle = split, schema, batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        self.n = split_len(split)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        import torch

        order = self.rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            cols = local_columns(self.split, self.schema, order[start:start + self.batch_size])
            yield {k: torch.from_numpy(v) for k, v in cols.items()}


def _feature_map(schema: Schema, name: str, data_dir: str, embedding_dim: int):
    from fuxictr.features import FeatureMap

    fmap = FeatureMap(name, data_dir)
    fmap.features = feature_specs(schema)
    fmap.labels = ["label"]
    fmap.default_emb_dim = embedding_dim
    fmap.num_fields = fmap.get_num_fields()
    fmap.set_column_index()
    return fmap


def _dnn_class():
    """FuxiCTR's ``model_zoo/DNN`` model (DNN_torch/src/DNN.py, 2.3.x), which the pip package
    does not ship, with ``BaseModel.checkpoint_and_earlystop`` observed to record the best epoch."""
    from dpn_jax.benchmark.peer_fuxictr import _import_layers

    _import_layers()  # FuxiCTR's preprocess package imports ray; the peer module stubs it
    from fuxictr.pytorch.layers import FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class DNN(BaseModel):
        def __init__(self, feature_map, model_id="DNN", gpu=-1, learning_rate=1e-3, embedding_dim=10,
                     hidden_units=(64, 64, 64), hidden_activations="ReLU", net_dropout=0,
                     batch_norm=False, embedding_regularizer=None, net_regularizer=None, **kwargs):
            super().__init__(feature_map, model_id=model_id, gpu=gpu,
                             embedding_regularizer=embedding_regularizer,
                             net_regularizer=net_regularizer, **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, embedding_dim)
            self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                                 hidden_units=list(hidden_units), hidden_activations=hidden_activations,
                                 output_activation=self.output_activation, dropout_rates=net_dropout,
                                 batch_norm=batch_norm)
            self.compile(kwargs["optimizer"], kwargs["loss"], learning_rate)
            self.reset_parameters()
            self.model_to_device()
            self.history: list[dict] = []

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            return {"y_pred": self.mlp(self.embedding_layer(X, flatten_emb=True))}

        def checkpoint_and_earlystop(self, logs, min_delta=1e-6):
            super().checkpoint_and_earlystop(logs, min_delta=min_delta)
            self.history.append({"epoch": self._epoch_index + 1, "valid_auc": float(logs["AUC"]),
                                 "valid_logloss": float(logs.get("logloss", float("nan"))),
                                 "improved": self._stopping_steps == 0,
                                 "lr": float(self.optimizer.param_groups[0]["lr"])})

    return DNN


def train_fuxictr_dnn(data: Dataset, seed: int, threads: int | None = None, **options: Any) -> dict:
    """Train FuxiCTR's DNN on ``data`` (train / early-stop on valid / report test), in this process.

    ``options`` override :data:`FUXICTR_DEFAULTS`. Returns test and best-validation AUC and
    logloss (FuxiCTR's own metrics), the best epoch, the epochs run and the history."""
    import logging

    import fuxictr
    import torch
    from fuxictr.pytorch.torch_utils import seed_everything

    unknown = sorted(set(options) - set(FUXICTR_DEFAULTS))
    if unknown:
        raise ConfigError(f"FuxiCTR peer: unknown options {unknown}; it takes {sorted(FUXICTR_DEFAULTS)}")
    o = {**FUXICTR_DEFAULTS, **options}
    if threads:
        torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)
    seed_everything(seed=seed)
    for name, split in data.splits():
        check_ids(split, data.schema, name)
    with tempfile.TemporaryDirectory(prefix="fuxictr_peer_") as root:
        fmap = _feature_map(data.schema, data.name.replace("/", "_"), root, o["embedding_dim"])
        model = _dnn_class()(
            fmap, learning_rate=o["lr"], embedding_dim=o["embedding_dim"], hidden_units=o["hidden"],
            net_dropout=o["dropout"], batch_norm=o["batch_norm"],
            embedding_regularizer=o["embedding_l2"] or None, net_regularizer=o["net_l2"] or None,
            optimizer="adam", loss="binary_crossentropy", metrics=["logloss", "AUC"], monitor="AUC",
            monitor_mode="max", early_stop_patience=o["patience"], model_root=root, verbose=0,
            reduce_lr_on_plateau=o["reduce_lr_on_plateau"])
        Path(model.model_dir).mkdir(parents=True, exist_ok=True)  # FuxiCTR's scripts create it
        train = _Loader(data.train, data.schema, o["batch_size"], True, seed)
        valid = _Loader(data.valid, data.schema, o["batch_size"], False, seed)
        test = _Loader(data.test, data.schema, o["batch_size"], False, seed)
        t0 = time.perf_counter()
        model.fit(train, epochs=o["max_epochs"], validation_data=valid,
                  max_gradient_norm=o["grad_clip"] if o["grad_clip"] > 0 else float("inf"))
        seconds = time.perf_counter() - t0
        v, t = model.evaluate(valid), model.evaluate(test)
    best = max((h for h in model.history if h["improved"]), key=lambda h: h["epoch"], default=None)
    return {"peer": f"fuxictr {fuxictr.__version__} (torch {torch.__version__})", "seed": seed,
            "test_auc": float(t["AUC"]), "test_logloss": float(t["logloss"]),
            "valid_auc": float(v["AUC"]), "valid_logloss": float(v["logloss"]),
            "best_epoch": best["epoch"] if best else 0, "epochs": len(model.history),
            "train_seconds": seconds, "history": model.history, "options": o}


def train_isolated(data: str, seed: int, *, data_dir: str | None = None, threads: int | None = None,
                   **options: Any) -> dict:
    """:func:`train_fuxictr_dnn` in a child Python process: ``data`` is loaded there by
    :func:`dpn_jax.data.load_dataset` exactly as ``dpn-jax train --data`` loads it."""
    args = {"data": data, "seed": seed, "data_dir": data_dir, "threads": threads,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    proc = subprocess.run([sys.executable, "-m", "dpn_jax.benchmark.peer_accuracy", json.dumps(args)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"FuxiCTR accuracy peer failed (data {data}, seed {seed}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    from dpn_jax.data import load_dataset

    a = json.loads(argv[0])
    data = load_dataset(a["data"], data_dir=a["data_dir"])
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in a["options"].items()}
    print(json.dumps(train_fuxictr_dnn(data, a["seed"], threads=a["threads"], **options)))


if __name__ == "__main__":
    _child(sys.argv[1:])
    sys.exit(0)

