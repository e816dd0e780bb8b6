"""The quickstart notebook runs top to bottom (small sizes), so it cannot rot."""

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    os.environ["POSTTRAIN_NOTEBOOK_FAST"] = "1"
    try:
        nbclient.NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
        ).execute()
    finally:
        os.environ.pop("POSTTRAIN_NOTEBOOK_FAST", None)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "stages:" in outputs and "=== sft ===" in outputs
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
