"""Checkpoints of one ``fit`` run, so that a killed run resumes exactly where it was.

A checkpoint is an Orbax step directory ``DIR/<position>/`` (position: batches trained since the
start of training) with three items:

* ``arrays``: the :class:`TrainState` (parameters, BatchNorm statistics, optimiser state with the
  injected learning rate, step, dropout key) and the best parameters/statistics so far;
* ``progress``: JSON, the data position (epoch, batches of it done), early-stopping state, best
  epoch and its validation metrics, history rows, timings and the epoch's loss accumulators;
* ``run``: JSON, what produced it (model, training config, data shape, parameter shapes), compared
  on resume so that a checkpoint is never continued by a different run.

Orbax writes each step into ``<position>.orbax-checkpoint-tmp`` and renames it when complete, so
a kill mid-save leaves the previous checkpoint intact. The best parameters travel inside every
checkpoint, so the newest one is all a resume needs; the one before it is kept as a fallback.

An unusable checkpoint directory is reported in one line (a :class:`DpnError`): the manager is
closed first, and the echoes of Orbax's failed reads are silenced (see :func:`_quiet_reads`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpn_jax import faults
from dpn_jax.data.schema import Dataset, split_len
from dpn_jax.errors import DpnError
from dpn_jax.train.config import TrainConfig
from dpn_jax.train.early_stopping import StopState
from dpn_jax.train.engine import Best, EpochTally, Timing

KEEP = 2
# Training options that may change on resume: they change neither the state nor the data order.
MAY_CHANGE = ("max_epochs", "eval_batch_size", "checkpoint_every_steps", "on_nonfinite", "steps_per_dispatch",
              "data_on_device")


@jax.jit
def all_finite(tree) -> jax.Array:
    """One boolean: every floating-point leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@jax.jit
def checksum(tree) -> jax.Array:
    """Per leaf, a position-weighted uint32 sum of its bits. OCDBT checks its own structure but
    not the array bytes, so a flipped bit in a value would otherwise load silently."""
    def words(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.extended):  # typed PRNG keys
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
            return x.astype(jnp.uint32).ravel()
        width = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()

    sums = [jnp.sum(w * (2 * jnp.arange(w.size, dtype=jnp.uint32) + 1)) for w in map(words, jax.tree.leaves(tree))]
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(x).tolist()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def run_metadata(model, data: Dataset, cfg: TrainConfig, params) -> dict:
    """What must match for a checkpoint to be resumed by this run."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
    return _jsonable({
        "model": {"class": type(model).__name__, **fields},
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in MAY_CHANGE},
        "data": {"name": data.name, **{f"{s}_rows": split_len(getattr(data, s)) for s in ("train", "valid", "test")}},
        "params": {jax.tree_util.keystr(p): f"{x.dtype}{list(x.shape)}"
                   for p, x in jax.tree_util.tree_leaves_with_path(params)},
    })


def run_defaults(model) -> dict:
    """The defaults of the model's and the train config's fields, flat like :func:`differences`
    sees them: a checkpoint written before a field existed matches a run that leaves it there."""
    fields = [(f"model.{f.name}", f.default) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING]
    fields += [(f"train.{f.name}", f.default) for f in dataclasses.fields(TrainConfig)]
    return {k: _jsonable(v) for k, v in fields}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(saved: dict, now: dict, limit: int = 6, defaults: dict | None = None) -> list[str]:
    a, b = _flat(saved), _flat(now)
    for k, v in (defaults or {}).items():  # fields added since the checkpoint, at their default
        if k not in a and b.get(k, "(absent)") == v:
            a[k] = v
    diffs = [f"{k}: {_short(a.get(k, '(absent)'))} in the checkpoint, {_short(b.get(k, '(absent)'))} now"
             for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


_STRAGGLER_ERRORS = ("Event loop is closed", "cannot schedule new futures after interpreter shutdown")
_kept_quiet = False  # a read failed: its stragglers may still arrive, so the filters stay


def _unraisable_filter(previous):
    def hook(info):
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) in _STRAGGLER_ERRORS:
            return
        previous(info)

    hook.dpn_previous = previous
    return hook


def _not_orbax(record: logging.LogRecord) -> bool:
    """False for Orbax's own log records and for its read tasks that died unretrieved."""
    if "orbax" in record.pathname:
        return False
    text = record.getMessage()
    if "exception was never retrieved" not in text:  # asyncio's words for a Task / Future
        return True
    text += str(record.exc_info[1]) if record.exc_info else ""
    return not any(mark in text for mark in ("orbax", "tensorstore", "OCDBT", "zarr"))


@contextlib.contextmanager
def _quiet_reads():
    """Orbax reads a checkpoint's arrays concurrently on an event loop that it closes as soon as
    one read fails; the reads still in flight then finish into the closed loop ("Event loop is
    closed", printed as a traceback) and their tasks die unretrieved (asyncio logs each), and
    unreadable metadata is logged as well. The caller reports the failure in one line, so while
    Orbax reads, and for good once a read has failed, that noise is dropped (nothing else is)."""
    global _kept_quiet
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    hook = None
    if not hasattr(sys.unraisablehook, "dpn_previous"):
        hook = sys.unraisablehook = _unraisable_filter(sys.unraisablehook)
    for lg in loggers:
        lg.addFilter(_not_orbax)
    try:
        yield
    except BaseException:
        _kept_quiet = True
        raise
    finally:
        if not _kept_quiet:
            for lg in loggers:
                lg.removeFilter(_not_orbax)
            if hook is not None and sys.unraisablehook is hook:
                sys.unraisablehook = hook.dpn_previous


@dataclasses.dataclass
class Resumed:
    """Everything ``fit`` needs to continue from a checkpoint."""

    state: Any
    best: Best | None
    history: list[dict]
    stopper: StopState
    epoch: int  # the epoch to continue
    batch: int  # batches of ``epoch`` already trained
    stopped: bool  # training had ended (early stop); only the test evaluation is left
    tally: EpochTally  # what ``epoch`` counted in those batches
    timing: Timing


class Checkpoints:
    """The checkpoints of one run in ``directory``.

    Opening checks the directory against ``resume``: resuming needs a checkpoint, and a fresh
    run refuses to mix its checkpoints with an earlier run's; ``resume="if_any"`` continues the
    checkpoints there are and starts afresh where there are none (a sweep's chunks)."""

    def __init__(self, directory: str | Path, *, resume: bool | str):
        import orbax.checkpoint as ocp  # imported only by runs that checkpoint: it is slow to import

        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise DpnError(f"checkpoint directory {self.directory} is a file; choose a directory")
        if resume not in (True, False, "if_any"):
            raise ValueError(f"resume={resume!r}; expected True, False or 'if_any'")
        if resume is True and not self.directory.is_dir():
            raise DpnError(f"no checkpoint to resume: {self.directory} does not exist; run without "
                           "--resume to start training, or point --checkpoint-dir at the earlier run's")
        try:
            with _quiet_reads():
                self._mgr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=KEEP, enable_async_checkpointing=False, cleanup_tmp_directories=True))
        except OSError as err:
            raise DpnError(f"cannot use checkpoint directory {self.directory}: {err}") from None
        try:
            latest = self.path()
            if resume == "if_any":
                resume = latest is not None
            if resume and latest is None:
                raise DpnError(f"no checkpoint to resume in {self.directory}: run without --resume to "
                               "start training, or point --checkpoint-dir at the earlier run's checkpoints")
            if not resume and latest is not None:
                raise DpnError(f"{self.directory} already holds checkpoints of a run ({latest}): pass "
                               "--resume to continue it, or choose another --checkpoint-dir (or delete "
                               "this one) to start afresh")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Wait for Orbax's pending work and stop its threads (again: nothing happens)."""
        mgr, self._mgr = getattr(self, "_mgr", None), None
        if mgr is not None:
            with contextlib.suppress(Exception), _quiet_reads():
                mgr.close()

    def _failed(self, err: DpnError) -> DpnError:
        """``err``, once the manager is closed: the run ends with it, and an unclosed manager's
        threads would print tracebacks at interpreter exit instead of exiting quietly."""
        self.close()
        return err

    def path(self, step: int | None = None) -> Path | None:
        """The directory of checkpoint ``step`` (default: the newest), None when there is none."""
        with _quiet_reads():
            self._mgr.reload()
            step = self._mgr.latest_step() if step is None else step
        return None if step is None else self.directory / str(step)

    def save(self, position: int, state, best: Best | None, progress: dict, run: dict) -> Path:
        """Write checkpoint ``position`` (call only with a finite state; see :func:`all_finite`)."""
        progress = dict(progress, has_best=best is not None, best_epoch=best.epoch if best else 0,
                        best_valid=best.valid if best else {})
        best = best or Best(state.params, state.batch_stats, 0, {})  # a placeholder of the shapes
        arrays = {"state": state, "best": {"params": best.params, "batch_stats": best.batch_stats}}
        progress["checksum"] = np.asarray(checksum(arrays)).tolist()
        args = self._ocp.args
        done = self._mgr.save(position, force=True, args=args.Composite(
            arrays=args.StandardSave(arrays),
            progress=args.JsonSave(_jsonable(progress)),
            run=args.JsonSave(run)))
        if not done:  # positions only grow; a refused save would silently lose the resume point
            raise DpnError(f"checkpoint {position} was not written to {self.directory}")
        faults.point("checkpoint")
        return self.directory / str(position)

    def progress(self) -> dict:
        """The newest checkpoint's ``progress`` JSON (what a caller needs to shape its template)."""
        step = self._mgr.latest_step()
        try:
            with _quiet_reads():
                return self._mgr.restore(step, args=self._ocp.args.Composite(
                    progress=self._ocp.args.JsonRestore()))["progress"]
        except Exception as err:  # orbax and tensorstore raise many kinds; all mean the same here
            raise self._unreadable(self.directory / str(step), _reason(err)) from err

    def restore_arrays(self, template: dict, run: dict, defaults: dict | None = None) -> tuple[dict, dict]:
        """``(arrays, progress)`` of the newest checkpoint, after checking that ``run`` wrote it;
        ``template``: ``{"state": ..., "best": ...}`` with the structure (and placement) to read
        into; the arrays' checksum is verified."""
        args = self._ocp.args
        step = self._mgr.latest_step()
        path = self.directory / str(step)
        try:
            with _quiet_reads():
                meta = self._mgr.restore(step, args=args.Composite(progress=args.JsonRestore(),
                                                                   run=args.JsonRestore()))
            progress, saved_run = meta["progress"], meta["run"]
        except Exception as err:  # orbax and tensorstore raise many kinds; all mean the same here
            raise self._unreadable(path, _reason(err)) from err
        diffs = differences(saved_run, run, defaults=defaults)
        if diffs:
            raise self._failed(DpnError(
                f"cannot resume from {path}: it was written by a different run (" + "; ".join(diffs)
                + "). Resume with the same model, data and settings, or run without --resume to start "
                "afresh (in a new --checkpoint-dir when you gave one)"))
        try:
            with _quiet_reads():
                arrays = self._mgr.restore(step, args=args.Composite(arrays=args.StandardRestore(
                    jax.tree.map(self._ocp.utils.to_shape_dtype_struct, template))))["arrays"]
        except Exception as err:
            raise self._unreadable(path, _reason(err)) from err
        if np.asarray(checksum(arrays)).tolist() != progress["checksum"]:
            raise self._unreadable(path, "its arrays do not match the checksum saved with them")
        return arrays, progress

    def restore(self, state, run: dict, defaults: dict | None = None) -> Resumed:
        """The newest checkpoint, read into the structure (and placement) of the fresh ``state``;
        ``defaults`` (:func:`run_defaults`) let a checkpoint predate a field left at its default."""
        template = {"state": state, "best": jax.device_get({"params": state.params, "batch_stats": state.batch_stats})}
        arrays, progress = self.restore_arrays(template, run, defaults)
        best = None
        if progress["has_best"]:
            best = Best(arrays["best"]["params"], arrays["best"]["batch_stats"], progress["best_epoch"],
                        progress["best_valid"])
        return Resumed(state=arrays["state"], best=best, history=progress["history"],
                       stopper=StopState.restore(progress["stopper"]), epoch=progress["epoch"],
                       batch=progress["batch"], stopped=progress["stopped"],
                       tally=EpochTally.restore(progress.get("tally") or _tally_of_old(progress)),
                       timing=Timing(*progress["timing"]))

    def _unreadable(self, path: Path, reason: str) -> DpnError:
        older = [s for s in self._mgr.all_steps() if self.directory / str(s) != path]
        fallback = f" (the older checkpoint {self.directory / str(max(older))} is then used)" if older else ""
        return self._failed(DpnError(f"checkpoint at {path} is unreadable: {reason}; delete it{fallback} "
                                     "or run without --resume"))


def _tally_of_old(progress: dict) -> dict:
    """The epoch's tally of a checkpoint written before it had one: ``epoch_loss`` held the loss
    sum, the number of losses summed and the step the epoch began at."""
    loss_sum, losses, first_step = progress["epoch_loss"]
    return {"steps": progress["batch"], "loss_sum": [loss_sum], "losses": [losses], "first_step": first_step}


def _reason(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def describe(path: Path | None) -> str:
    return f"the last good checkpoint is {path}" if path else "no checkpoint was written yet"
