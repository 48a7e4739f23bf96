"""Raw-column transforms of the built-in datasets, shared by training and serving.

A built-in such as ``criteo`` turns a raw integer into a category before the vocabulary lookup.
The transform's name is stored in the field's encoder (``FieldEncoder.transform``), so a bundle
encodes raw rows at serving time exactly as the training data was encoded: the same function
runs in :mod:`dpn_jax.data.tabular_builtins` (streaming) and :meth:`FittedEncoders.transform`.

Each transform maps a column (numpy array of text or numbers, ``None``/blank = missing) to
categories as a pyarrow string array; ``bad`` positions are reported by the caller with its
own notion of row or line.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpn_jax.errors import DataError


class TransformError(DataError):
    """A raw value the transform cannot take; ``index`` is its position in the column."""

    def __init__(self, index: int, value: object, expected: str):
        super().__init__(f"value {value!r} at position {index}: expected {expected}")
        self.index, self.value, self.expected = index, value, expected


def as_float(col) -> np.ndarray:
    """Numbers, numeric text or blanks/None (-> NaN) as float64; a TransformError names the first
    cell that is none of these. Takes pyarrow arrays (the readers' columns), numpy arrays or lists."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array):
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
            return np.asarray(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
        text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    else:
        arr = np.asarray(col)
        if arr.dtype.kind in "fiub":
            return arr.astype(np.float64).reshape(-1)
        text = pa.array(["" if v is None else str(v).strip() for v in arr.reshape(-1).tolist()],
                        pa.string())  # fmt: skip
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    try:  # fast path; the loop below only runs to find the offending cell
        return np.asarray(pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False), np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for i, s in enumerate(text.to_pylist()):
            try:
                float(s) if s is not None else None
            except ValueError:
                raise TransformError(i, s, "a number (or a blank for missing)") from None
        raise


def criteo_int(col) -> pa.Array:
    """BARS/FuxiCTR ``convert_to_bucket`` (the Criteo winners' transform): ``floor(ln(v)^2)``
    for v > 2, else ``int(v)``; a blank is 0 first (FuxiCTR's ``na_value: 0``)."""
    v = as_float(col)
    v = np.where(np.isnan(v), 0.0, v)
    big = v > 2
    out = np.trunc(v).astype(np.int64)  # int(v) truncates toward zero, as Python's int does
    out[big] = np.floor(np.log(v[big]) ** 2).astype(np.int64)
    return pc.cast(pa.array(out), pa.string())


def _hour_text(col) -> np.ndarray:
    arr = np.asarray(col)
    if arr.dtype.kind in "iu":
        return arr.astype(str).astype(object)
    return np.array(["" if v is None else str(v).strip() for v in arr.reshape(-1).tolist()], object)


def avazu_hour_parts(col) -> tuple[pa.Array, pa.Array]:
    """Avazu's ``hour`` ``YYMMDDHH`` -> (hour of day ``"00".."23"``, weekday ``"0"`` = Monday ..
    ``"6"``), as FuxiCTR Avazu_x4's ``convert_hour`` / ``convert_weekday``."""
    text = _hour_text(col)
    uniq, inv = np.unique(text, return_inverse=True)
    wd = []
    for j, s in enumerate(uniq.tolist()):
        try:
            if len(s) != 8 or not s.isdigit() or not 0 <= int(s[6:8]) <= 23:
                raise ValueError
            wd.append(str(datetime.date(2000 + int(s[:2]), int(s[2:4]), int(s[4:6])).weekday()))
        except ValueError:
            raise TransformError(int(np.flatnonzero(inv == j)[0]), s,
                                 "YYMMDDHH (e.g. 14102100)") from None  # fmt: skip
    take = pa.array(inv.reshape(-1))
    hod = pa.array([s[6:8] for s in uniq.tolist()], pa.string()).take(take)
    return hod, pa.array(wd, pa.string()).take(take)


TRANSFORMS: dict[str, Callable[[object], pa.Array]] = {
    "criteo_int": criteo_int,
    "avazu_hour_of_day": lambda col: avazu_hour_parts(col)[0],
    "avazu_weekday": lambda col: avazu_hour_parts(col)[1],
}


def apply(name: str, col, column: str) -> list[str]:
    """Run transform ``name`` on a raw column for the encoder; errors name the column and row."""
    if name not in TRANSFORMS:
        raise DataError(f"unknown transform {name!r} for column {column!r}; this dpn-jax knows "
                        f"{sorted(TRANSFORMS)} (was the bundle written by a newer version?)")  # fmt: skip
    try:
        return TRANSFORMS[name](col).to_pylist()
    except TransformError as e:
        raise DataError(f"column {column!r} row {e.index + 1}: {e.value!r} is not {e.expected}") from None
