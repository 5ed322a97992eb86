"""Every notebook runs end to end on CPU with the embedded tiny model and no network.

Like papermill: the cell tagged "parameters" is followed by an injected cell
with the test's overrides, then the whole notebook is executed with nbclient.
"""

import os

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
CPU_OVERRIDES = {
    "quickstart_colab_tpu.ipynb": "MODEL_DIR = default_model_dir(); INSTALL = False; NUM_QUESTIONS = 6; MAX_NEW_TOKENS = 40",
    "kaggle_tpu_v5e8.ipynb": "MODEL_DIR = default_model_dir(); INSTALL = False; NUM_QUESTIONS = 8; MAX_NEW_TOKENS = 32; MESH_SHAPE = (2, 4)",
    "research_api.ipynb": "INSTALL = False; MAX_NEW_TOKENS = 40",
}


def with_parameters(nb, overrides: str):
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell("from specjax.models.embedded import default_model_dir\n" + overrides)
    nb.cells.insert(index + 1, cell)
    return nb


def test_every_notebook_has_a_test_and_no_outputs():
    names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
    assert names == sorted(CPU_OVERRIDES)
    for name in names:
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} has outputs"


@pytest.mark.parametrize("name", sorted(CPU_OVERRIDES))
def test_notebook_executes_on_cpu(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nb = with_parameters(nb, CPU_OVERRIDES[name])
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
