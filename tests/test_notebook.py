"""notebooks/01_tiny_sft.ipynb runs from top to bottom and reports its accuracy."""

import pathlib
import re

import nbclient
import nbformat

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "01_tiny_sft.ipynb"


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  return "".join(output.get("data", {}).get("text/plain", ""))


def test_notebook_is_saved_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells
  for cell in code_cells:
    assert cell.outputs == [] and cell.execution_count is None


def test_tiny_sft_notebook_runs(tmp_path, monkeypatch):
  # The kernel inherits this environment: one CPU device (not the 8 simulated ones of
  # conftest.py), a fresh dataset folder, so the test depends on no cache, and the run's
  # temporary workdir under tmp_path.
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("O3LITE_NOTEBOOK_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO_ROOT)}})
  client.execute()  # Raises CellExecutionError, with the traceback, if a cell fails.

  text = "\n".join(_text(o) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "1 cpu device(s)" in text
  match = re.search(r"test accuracy: (\d\.\d{3}) \((\d+) of 50 problems\)", text)
  assert match, text[-3000:]
  assert 0.0 <= float(match.group(1)) <= 1.0
  assert re.search(r"step 5: right in \d\.\d\d of the chains", text)
  assert re.search(r"[✓✗] \S+ +reference", text)  # Steps were labeled.
