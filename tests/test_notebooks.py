"""Executes every teaching notebook in ``notebooks/`` (jupytext percent-format ``.py`` files).

Each notebook runs top to bottom in a fresh ``python3`` kernel (the kernel spec that ipykernel
installs with ``pip install -e ".[dev]"``; jupyter_client starts it with this interpreter); a cell
that raises fails the test. Notebooks check their identities with assertions, so a passing run
is also a check of the math. Figures are written to a temporary folder (``DPN_NOTEBOOK_FIGURES``)
so that running the tests does not rewrite the committed ``notebooks/figures/*.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300
# Every notebook is left out of the fast lane (each starts a kernel; 03-05 train models, a
# minute or more on 2 CPU cores); the full suite executes them all.
# Figures a notebook must write (the committed copies in notebooks/figures/ come from these).
FIGURES = {
    "01_dpo_from_scratch": ["01_generator_cost.png"],
    "03_what_the_generator_learns": ["03_generated_kernels.png"],
    "04_sweeps": ["04_sweep_curves.png"],
    "05_sequence_dpo": ["05_sequence_kernels.png"],
}


def _notebook_params():
    return [pytest.param(path, id=path.stem,
                         marks=[pytest.mark.slow])
            for path in sorted(NOTEBOOKS.glob("*.py"))]


def test_notebooks_are_found():
    assert {p.stem for p in NOTEBOOKS.glob("*.py")} >= {
        "01_dpo_from_scratch", "02_decompositions", "03_what_the_generator_learns"}


@pytest.mark.parametrize("path", _notebook_params())
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch) -> None:
    figures = tmp_path / "figures"
    # The kernel inherits this environment: headless matplotlib, figures to tmp_path.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("DPN_NOTEBOOK_FIGURES", str(figures))
    nb = jupytext.read(path)
    assert any(cell.cell_type == "code" for cell in nb.cells), f"{path.name}: no code cells"
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) if a cell fails
    print(f"{path.name}: {time.perf_counter() - t0:.1f}s")
    for name in FIGURES.get(path.stem, []):
        assert (figures / name).is_file(), f"{path.name} did not write figures/{name}"
