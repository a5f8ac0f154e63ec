"""examples/notebook.ipynb runs top to bottom (nbclient, a Jupyter kernel of this interpreter)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import ROOT


@pytest.mark.slow  # CI's slow tier: the notebook executed with nbclient, ~48 s
def test_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat/nbclient/ipykernel are dev dependencies")
    nbclient = pytest.importorskip("nbclient", reason="nbformat/nbclient/ipykernel are dev dependencies")
    pytest.importorskip("ipykernel", reason="nbformat/nbclient/ipykernel are dev dependencies")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports this checkout's flame
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("FLAME_STAGE_KINDS", raising=False)
    nb = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [
        "".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in nb.cells if cell.cell_type == "code"
    ]
    assert "final loss" in outputs[1] and "validation loss" in outputs[1]
    assert "best trial lr" in outputs[2]
    assert "stage lr (train, validation_loss min): 2 trials, 2 done" in outputs[3]
    records = [json.loads(line) for line in open(tmp_path / "experiments" / "notebook-sweep" / "records.jsonl")]
    assert sum(e["event"] == "end" and e["status"] == "done" for e in records) == 2
