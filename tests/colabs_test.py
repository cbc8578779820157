"""The notebooks run top to bottom (small settings through EVOPRUNE_NOTEBOOK_SMOKE)."""

import os
import pathlib

from absl.testing import absltest
from absl.testing import parameterized
import nbclient
import nbformat

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"


class ColabsTest(parameterized.TestCase):

  @parameterized.parameters(*[(p.name,) for p in sorted(COLABS.glob("*.ipynb"))])
  def test_notebook_executes(self, name):
    notebook = nbformat.read(COLABS / name, as_version=4)
    os.environ["EVOPRUNE_NOTEBOOK_SMOKE"] = "1"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(COLABS.parent)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    self.assertIn("sparsity 0.900", outputs)


if __name__ == "__main__":
  absltest.main()
