"""The example notebook runs from top to bottom, as a reader would run it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.outputs for i, c in enumerate(notebook.cells) if c.cell_type == "code"}
    assert all(not any(o.output_type == "error" for o in out) for out in outputs.values())
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for out in outputs.values() for o in out)
    assert "'test/rmse'" in shown and "item_id" in shown
    assert any("image/png" in o.get("data", {}) for out in outputs.values() for o in out)  # the curve
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
