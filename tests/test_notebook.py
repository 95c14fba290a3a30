"""CI executes the quickstart notebook: it must run top to bottom and reach its 80% target."""

import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_prunes_to_its_target():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []  # prove the outputs come from this run
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    text = "".join(
        output.get("text", "")
        for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs
    )
    total = re.search(r"^total\s+all\s+\d+ weights\s+([\d.]+)% pruned", text, re.MULTILINE)
    assert total, "the notebook did not print its sparsity table"
    assert float(total.group(1)) == pytest.approx(80.0, abs=1.0)
    bpc = re.search(r"valid bits per character: ([\d.]+)", text)
    assert bpc and float(bpc.group(1)) < 4.0  # below a uniform guess over ~80 symbols (6.3)
