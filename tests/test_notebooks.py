"""The notebooks in notebooks/ run, at small size, so they cannot rot; they are committed clean.

Each notebook reads ``LIGHTNING_GEN_NOTEBOOK_SMALL`` in its parameters cell (tagged
``parameters``); set to 1 here, the whole notebook runs in seconds with tiny networks and a few
training steps. Its kernel runs in notebooks/ (as a person running it would) with one thread.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
SMALL_VARIABLE = "LIGHTNING_GEN_NOTEBOOK_SMALL"


def test_there_are_notebooks():
    assert len(NOTEBOOK_PATHS) >= 6, NOTEBOOK_PATHS


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.stem)
def test_committed_notebook_is_clean_and_has_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    with_outputs = [index for index, cell in enumerate(code_cells)
                    if cell.outputs or cell.execution_count is not None]
    assert not with_outputs, (f"{path.name}: code cells {with_outputs} hold outputs; clear them "
                              f"(python notebooks/clear_outputs.py notebooks/{path.name})")
    parameters = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and SMALL_VARIABLE in parameters[0].source, (
        f"{path.name}: needs one code cell tagged 'parameters' that reads {SMALL_VARIABLE}")


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.stem)
def test_notebook_runs_at_small_size(path, mnist_root, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv(SMALL_VARIABLE, "1")
    monkeypatch.setenv("LIGHTNING_GEN_DATA", str(mnist_root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    pictures = [output for cell in notebook.cells if cell.cell_type == "code"
                for output in cell.outputs if "image/png" in output.get("data", {})]
    assert pictures, f"{path.name} drew no picture"
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors
