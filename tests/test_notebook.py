"""The quick-start notebook runs from top to bottom, shows its tables and plot, and is committed without outputs."""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).parents[1] / "examples" / "notebooks" / "quickstart.ipynb"
KERNEL = "branchify-test-python"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], f"cell {cell.get('id')} has outputs: strip them before committing"
        assert cell.execution_count is None, f"cell {cell.get('id')} has an execution count"


@pytest.fixture
def kernel_for_this_interpreter(tmp_path, monkeypatch):
    """A kernel spec that runs ipykernel with this interpreter, found first on JUPYTER_PATH.

    A `python3` spec from the user's or the system's Jupyter could start another Python without
    branchify; this one is private to the test and gone afterwards.
    """
    folder = tmp_path / "jupyter" / "kernels" / KERNEL
    folder.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "branchify test", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


@pytest.mark.slow
def test_notebook_runs_and_shows_tables_and_a_plot(tmp_path, kernel_for_this_interpreter):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name=kernel_for_this_interpreter, timeout=900,
                                     allow_errors=False, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and the traceback, if any cell fails

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    html = [out.data["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("<table" in h and "ExitStatsSummary: forced" in h for h in html), "no forced statistics table"
    assert any("<table" in h and "ExitStatsSummary: routed" in h for h in html), "no routed statistics table"
    assert any("<table" in h and "Calibration(max_accuracy_drop=0.02" in h for h in html), "no calibration table"
    assert any("<table" in h and "FitHistory(joint, 3 epochs" in h and "val top-1 layer2" in h for h in html), \
        "no training history"
    assert any("<table" in h and "BenchmarkResult: ExitRunner against the original model" in h for h in html), \
        "no benchmark table"
    assert any("image/png" in out.get("data", {}) for out in outputs), "no plot"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "Totals for entire network with early exits" in text
    assert "share leaving at each exit" in text
