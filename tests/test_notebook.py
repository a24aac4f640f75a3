"""The notebooks run from top to bottom and report what they show."""

import pathlib
import re

import nbclient
import nbformat

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "01_tiny_sft.ipynb"
TEST_TIME_NOTEBOOK = REPO_ROOT / "notebooks" / "02_test_time_search.ipynb"


def _text(output) -> str:
  if output.output_type == "stream":
    return output.text
  return "".join(output.get("data", {}).get("text/plain", ""))


def _check_saved_without_outputs(path: pathlib.Path) -> None:
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells
  for cell in code_cells:
    assert cell.outputs == [] and cell.execution_count is None


def _execute(path: pathlib.Path, tmp_path, monkeypatch) -> nbformat.NotebookNode:
  """Runs the notebook in a fresh kernel and returns it with its outputs.

  The kernel inherits this environment: one CPU device (not the 8 simulated ones of
  conftest.py), a fresh dataset folder, so the test depends on no cache, and the run's
  temporary workdir under tmp_path.
  """
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("O3LITE_NOTEBOOK_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO_ROOT)}})
  client.execute()  # Raises CellExecutionError, with the traceback, if a cell fails.
  return nb


def _outputs_text(nb: nbformat.NotebookNode) -> str:
  return "\n".join(_text(o) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_is_saved_without_outputs():
  _check_saved_without_outputs(NOTEBOOK)


def test_tiny_sft_notebook_runs(tmp_path, monkeypatch):
  text = _outputs_text(_execute(NOTEBOOK, tmp_path, monkeypatch))
  assert "1 cpu device(s)" in text
  match = re.search(r"test accuracy: (\d\.\d{3}) \((\d+) of 50 problems\)", text)
  assert match, text[-3000:]
  assert 0.0 <= float(match.group(1)) <= 1.0
  assert re.search(r"step 5: right in \d\.\d\d of the chains", text)
  assert re.search(r"[✓✗] \S+ +reference", text)  # Steps were labeled.


def test_test_time_notebook_is_saved_without_outputs():
  _check_saved_without_outputs(TEST_TIME_NOTEBOOK)


def test_test_time_search_notebook_runs(tmp_path, monkeypatch):
  nb = _execute(TEST_TIME_NOTEBOOK, tmp_path, monkeypatch)
  text = _outputs_text(nb)
  assert "1 cpu device(s)" in text
  assert re.search(r"PRM: step error F1 \d\.\d{3} .* step AUC \d\.\d{3}", text), text[-3000:]
  # The sweep's table: a row per (strategy, budget), and an accuracy per strategy.
  for label, verifier, budgets in (("majority", "-", (1, 4, 8)),
                                   ("best_of_n", "prm", (4, 8)), ("beam", "prm", (4, 8))):
    for budget in budgets:
      assert re.search(rf"^\| {label} \| {verifier} \| {budget} \| \d+\.\d%",
                       text, re.M), (label, budget, text[-3000:])
    match = re.search(rf"^ *{label}: N=\d+ accuracy (\d\.\d{{3}})", text, re.M)
    assert match and 0.0 <= float(match.group(1)) <= 1.0, label
  # The curves and the tree drawing are shown inline.
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 2
  # The tree's rerun of beam at N = 4 repeats the sweep's searches.
  match = re.search(r"beam at N = 4 on 24 problems: accuracy (\d\.\d{3}) \(in the sweep: "
                    r"(\d\.\d{3})\)", text)
  assert match and match.group(1) == match.group(2), text[-3000:]
  # The beam search tree: every node with a PRM score in [0, 1], the chosen path marked
  # from the first level to a finished (or cut off) node.
  nodes = re.findall(r"^( *)([★·]) L(\d+)\.(\d+) .*PRM (\d\.\d{3}) [✓✗ ]  (\w.*)$", text,
                     re.M)
  assert nodes, text[-3000:]
  assert all(0.0 <= float(score) <= 1.0 for *_, score, _ in nodes)
  assert all(len(indent) == 2 * int(level) for indent, _, level, *_ in nodes)
  path = [(int(level), fate) for _, mark, level, _, _, fate in nodes if mark == "★"]
  assert [level for level, _ in path] == list(range(len(path)))
  assert path[-1][1].startswith(("finished", "cut off")), path
  assert re.search(r"^chosen: .* -> answer .*, (right|wrong)$", text, re.M)
