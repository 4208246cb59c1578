"""notebooks/explore.ipynb runs top to bottom on a store built by this checkout's code,
so the notebook can never silently go stale; it is committed without outputs."""

from __future__ import annotations

import re

import nbformat
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "explore.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_explore_notebook_runs_on_a_fresh_store(explore_store, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("ACTSTORE_STORE", explore_store)
    monkeypatch.setenv("PYTHONPATH", str(REPO))   # the kernel imports this checkout's code
    monkeypatch.delenv("MPLBACKEND", raising=False)   # the kernel draws inline
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    shown = "".join(str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert repr(explore_store) in shown                  # it opened the store it was given
    assert "Pearson r with the label:" in text           # a probe was applied to an image
    assert "'salient', 'projection', 2" in text          # the intervention experiment
    assert re.search(r"emerges at step \S+ \(95% CI \S+-\S+\)", text)  # with its interval
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 4     # activations, probe vs label, emergence curve, intervention
