"""A per-epoch progress bar with samples/s and the running loss (rich), quiet when not a terminal."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class EpochProgress:
    def __init__(self, steps_per_epoch: int, batch_size: int, enabled: bool | None = None):
        self.steps = steps_per_epoch
        self.batch_size = batch_size
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._task = None
        self._t0 = 0.0
        self._steps0 = 0
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} samples/s  loss {task.fields[loss]}"),
                TimeRemainingColumn(), transient=True, console=None)
            self._progress.start()

    def start_epoch(self, epoch: int) -> None:
        self._t0, self._steps0 = time.perf_counter(), 0
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task("train", total=self.steps, epoch=epoch,
                                                 rate="-", loss="-")

    def restart_clock(self, steps_done: int) -> None:
        """Exclude what ran so far (compilation) from the samples/s shown."""
        self._t0, self._steps0 = time.perf_counter(), steps_done

    def update(self, step: int, loss: float) -> None:
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        timed = step - self._steps0
        rate = f"{timed * self.batch_size / elapsed:,.0f}" if timed > 0 else "-"
        self._progress.update(self._task, completed=step, rate=rate, loss=f"{loss:.4f}")

    def end_epoch(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
