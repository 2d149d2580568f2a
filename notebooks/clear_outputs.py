"""Clear the outputs of notebooks, so that commits hold only their code and text.

    python notebooks/clear_outputs.py                  # every notebook in notebooks/
    python notebooks/clear_outputs.py notebooks/04_flow.ipynb
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def clear_outputs(path: Path) -> bool:
    """Clear the outputs and execution counts of one notebook; return whether it changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


def main(arguments: list[str]) -> None:
    paths = [Path(argument) for argument in arguments] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for path in paths:
        if path.suffix != ".ipynb" or not path.is_file():
            raise ValueError(f"not a notebook file: {path}")
        if clear_outputs(path):
            print(f"cleared {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
