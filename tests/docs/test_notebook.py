"""The results notebook runs top to bottom on the committed archive of the tiny-scale runs."""

import nbformat
from nbclient import NotebookClient

from helpers import ROOT

NOTEBOOK = ROOT / "notebooks" / "results.ipynb"


def test_results_notebook_executes(monkeypatch):
    monkeypatch.delenv("QAFT_RUNS", raising=False)  # the notebook's default: results/tiny/records.jsonl
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    n_runs = int(text.split(" runs from ")[0].split()[-1])
    assert n_runs >= 60  # the six tables' runs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # perplexity vs bits, and the cost bars
