"""``dpn_jax.load(bundle_dir).predict(rows)``: score raw rows with a trained bundle in-process.

Input (``rows``): a dict of columns, a pandas DataFrame or a pyarrow Table/RecordBatch, in the RAW
format of the dataset spec -- categorical ids as text (or numbers, compared by ``str()``),
numbers, and separated multi-value/sequence strings (or lists). Encoding is the training one
(:meth:`FittedEncoders.transform`): unseen or too-rare categories -> the field's OOV id, a missing
categorical cell is the category ``""``, a missing dense numeric is the train mean (0 after
standardisation), a missing bucketised numeric is OOV, and sequences keep their last ``max_len``
items. Extra columns (the label, an id) are ignored; a missing column is an error.

Already-encoded arrays (``{"cat", "num", "seq/<name>"}`` as in :mod:`dpn_jax.data.schema`) are
scored as is -- the natural input for the built-in ``frappe``/``synthetic`` data -- when the dict
has every encoded key and not every raw column.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from dpn_jax.data import readers, transforms
from dpn_jax.data.encode import FittedEncoders
from dpn_jax.data.schema import Schema, Split, empty_arrays
from dpn_jax.errors import DataError
from dpn_jax.models import build_model, legacy_options, model_options
from dpn_jax.serving.bundle import RETRAIN, Bundle, BundleError, read_bundle
from dpn_jax.serving.exported import bucket_size, column_lists, is_missing, pad_rows


def model_inputs(schema: Schema) -> list[tuple[str, str, int]]:
    """(name, dtype, width) of every array a model reads, in a fixed order."""
    return [("cat", "int32", len(schema.cat_fields)), ("num", "float32", len(schema.numeric_fields))] + [
        (f"seq/{f.name}", "int32", f.max_len) for f in schema.seq_fields
    ]


def rebuild_model(name: str, config: Mapping[str, Any], schema: Schema):
    """The Flax module of a bundle: JSON lists back to the tuples the options default to; an
    option the bundle predates gets its legacy value (``models.registry.legacy_options``)."""
    defaults = model_options(name)
    kw = {k: tuple(v) if isinstance(defaults.get(k), tuple) and isinstance(v, list) else v
          for k, v in config.items()}
    kw = {**legacy_options(name, kw), **kw}
    return build_model(name, schema, **kw)


class Predictor:
    """A model, its variables and (for raw rows) the fitted encoders; see :func:`load`."""

    def __init__(self, model_name: str, model: Any, variables: Mapping[str, Any], schema: Schema,
                 encoders: FittedEncoders | None = None, bundle: Bundle | None = None) -> None:
        self.model_name, self.model, self.schema = model_name, model, schema
        self.variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats") and v}
        self.encoders, self.bundle = encoders, bundle
        self.inputs = model_inputs(schema)
        self.raw_columns = encoders.columns() if encoders is not None else {}

        def probs(variables, batch):
            return jax.nn.sigmoid(model.apply(variables, batch, train=False))

        self._probs = jax.jit(probs)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Predictor:
        try:
            model = rebuild_model(bundle.model, bundle.model_config, bundle.schema)
        except Exception as e:  # noqa: BLE001  a config this dpn-jax cannot build
            raise BundleError(f"{bundle.path / 'model.json'}: cannot build model {bundle.model!r} ({e}); "
                              f"{RETRAIN}") from None
        variables = _restore(bundle, model)
        return cls(bundle.model, model, variables, bundle.schema, bundle.encoders, bundle)

    @property
    def metrics(self) -> dict:
        return dict(self.bundle.manifest.get("metrics", {})) if self.bundle else {}

    @property
    def config(self) -> dict:
        return dict(self.bundle.model_config) if self.bundle else {}

    # ------------------------------------------------------------------------- encoding

    def is_encoded(self, rows: Any) -> bool:
        if not isinstance(rows, Mapping):
            return False
        keys = set(rows)
        return {n for n, _, _ in self.inputs} <= keys and not set(self.raw_columns) <= keys

    def encode(self, rows: Any, *, source: str | Path = "<input>", first_row: int = 1) -> Split:
        """Raw rows -> the encoded arrays (``cat``, ``num``, ``seq/<name>``) the model reads.
        ``source`` and ``first_row`` (the data row, 1-based, of ``rows[0]`` in that file) make an
        unparsable cell's error name the file and its row there, as the training readers do."""
        if self.encoders is None:
            raise DataError(f"model {self.model_name!r} has no fitted encoders: pass the encoded "
                            f"arrays {[n for n, _, _ in self.inputs]}")
        if hasattr(rows, "column_names") and hasattr(rows, "column"):  # pyarrow Table/RecordBatch
            missing = [c for c in self.raw_columns if c not in rows.column_names]
            if missing:
                raise DataError(f"input column {missing[0]!r} is missing; got columns {list(rows.column_names)}")
            # The readers' own conversions: exactly what training saw from csv/parquet files.
            raw = {c: _as_float(rows.column(c), source, c, first_row) if kind == "float"
                   else readers._as_str(rows.column(c)) for c, kind in self.raw_columns.items()}
        else:
            cols = column_lists(rows, list(self.raw_columns))  # checks the type and the columns
            raw = {c: _normalise(cols[c], kind) for c, kind in self.raw_columns.items()}
        split = self.encoders.transform(raw)
        split.pop("label", None)
        return split

    # ------------------------------------------------------------------------- scoring

    def predict(self, rows: Any, batch_size: int = 1024, *, source: str | Path = "<input>",
                first_row: int = 1) -> np.ndarray:
        """Click probabilities (float32), one per input row, in input order (``source``,
        ``first_row``: see :meth:`encode`)."""
        arrays = rows if self.is_encoded(rows) else self.encode(rows, source=source, first_row=first_row)
        return self.predict_encoded(arrays, batch_size)

    def predict_encoded(self, arrays: Mapping[str, Any], batch_size: int = 1024) -> np.ndarray:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        batch = {}
        for name, dtype, width in self.inputs:
            if name not in arrays:
                raise DataError(f"encoded input {name!r} is missing; expected {[n for n, _, _ in self.inputs]}")
            a = np.asarray(arrays[name], dtype=dtype)
            if a.ndim != 2 or a.shape[1] != width:
                raise DataError(f"encoded input {name!r} has shape {a.shape}; expected [rows, {width}]")
            batch[name] = a
        n = len(batch["cat"])
        out = []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in batch.items()}
            rows = len(chunk["cat"])
            padded = pad_rows(chunk, bucket_size(rows, batch_size))
            out.append(np.asarray(self._probs(self.variables, padded))[:rows])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _restore(bundle: Bundle, model: Any) -> dict:
    path = bundle.path / "params.msgpack"
    try:
        state = serialization.msgpack_restore(bundle.params_bytes)
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"{path}: unreadable parameters ({type(e).__name__}); {RETRAIN}") from None
    example = {k: v for k, v in empty_arrays(1, bundle.schema).items() if k != "label"}
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example, train=False))
    variables = {"params": state.get("params", {})}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    want = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
    got_sig = jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)), str(np.asarray(x).dtype)), variables)
    want_sig = jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), want)
    if got_sig != want_sig:
        raise BundleError(f"{path}: parameters do not match model {bundle.model!r} with the "
                          f"config in model.json (shapes differ); {RETRAIN}")
    return jax.tree_util.tree_map(jnp.asarray, variables)


def _as_float(col: Any, source: str | Path, name: str, first_row: int) -> np.ndarray:
    """The readers' number parsing, the error naming the row in the file (data rows, 1-based)."""
    try:
        return transforms.as_float(col)
    except transforms.TransformError as e:
        raise DataError(f"{source}: numeric column {name!r} row {first_row + e.index}: cannot parse "
                        f"{e.value!r} as a number (leave the cell empty for a missing value)") from None


def _normalise(col: Any, kind: str) -> Any:
    """Text columns: NaN (pandas' missing value) -> None, like an empty cell read from a file."""
    if hasattr(col, "to_pylist"):  # a pyarrow Array / ChunkedArray in a dict
        col = col.to_pylist()
    if isinstance(col, np.ndarray) and col.dtype.kind in ("iuUSb" if kind == "str" else "iufb"):
        return col
    values = col.tolist() if isinstance(col, np.ndarray) else list(col)
    return [None if is_missing(v) else v for v in values]


def load(bundle_dir: str | Path) -> Predictor:
    """Load and verify a bundle written by ``dpn-jax train --out DIR`` (or ``dpn_jax.train_model``)."""
    return Predictor.from_bundle(read_bundle(bundle_dir))
