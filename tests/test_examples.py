"""The notebooks in examples/ run top to bottom (in a scratch folder) and are stored without outputs."""

from __future__ import annotations

import os
import shutil

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
NOTEBOOKS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".ipynb"))


def test_there_are_notebooks_stored_without_outputs():
    import nbformat

    assert len(NOTEBOOKS) >= 2
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(EXAMPLES, name), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and not any(c.outputs or c.execution_count for c in code), f"{name}: clear its outputs"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("02") else n
                                  for n in NOTEBOOKS])  # 02 (16 s) runs predict_volume, tested directly
def test_notebook_runs(name, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    shutil.copy(os.path.join(EXAMPLES, name), tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    env = {"MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
