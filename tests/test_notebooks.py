"""The Colab notebooks run top to bottom at the tiny size, and are committed without outputs.

Each notebook is executed with nbclient in a kernel of this interpreter (a kernelspec
written to a temporary JUPYTER_PATH, so it works in a fresh venv with only
requirements.txt installed and ignores any other `python3` kernelspec on the machine),
with LCFED_NOTEBOOK_TINY=1; a failing cell fails the test.
"""
import base64
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "evaluate_checkpoint.ipynb")
KERNEL = "lcfed-jax-tests"
CELL_TIMEOUT_S = 600   # a cold XLA cache on a busy CI machine; warm, a notebook takes well under a minute


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  from ipykernel.kernelspec import write_kernel_spec
  jupyter = tmp_path_factory.mktemp("jupyter")
  write_kernel_spec(str(jupyter / "kernels" / KERNEL))   # argv: this sys.executable -m ipykernel_launcher
  work = tmp_path_factory.mktemp("notebook_tmp")
  env = {"JUPYTER_PATH": str(jupyter), "LCFED_NOTEBOOK_TINY": "1", "TMPDIR": str(work),
         "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in env.items():
      mp.setenv(k, v)
    mp.delenv("PYTHONPATH", raising=False)   # the notebook must find the checkout itself
    yield work


def execute(name_or_nb):
  from nbclient import NotebookClient
  nb = (nbformat.read(NOTEBOOK_DIR / name_or_nb, as_version=4) if isinstance(name_or_nb, str)
        else name_or_nb)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, allow_errors=False,
                          resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()   # raises CellExecutionError on the first failing cell
  return nb


def outputs(nb, key: str):
  """Every output of the executed notebook carrying `key` ('stdout', 'text/markdown', 'image/png')."""
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream" and out.get("name") == key:
        found.append(out["text"])
      elif key in out.get("data", {}):
        found.append(out["data"][key])
      elif out.get("output_type") == "error":
        raise AssertionError(f"cell error: {out['ename']}: {out['evalue']}")
  return found


def site_names():
  from lcfed_jax.run import notebook_utils
  from lcfed_jax.data.tasks import load_task
  return list(load_task(notebook_utils.load_config("synthetic", "lcfed", tiny=True)).site_names)


def png_ok(data: str) -> bool:
  return base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_runs(kernel_env):
  nb = execute("quickstart.ipynb")
  stdout = "".join(outputs(nb, "stdout"))
  assert "Runtime: " in stdout and "tiny=True" in stdout, stdout[-2000:]
  assert "round 3/3" in stdout   # two rounds of stage A, one of the HC
  tables = outputs(nb, "text/markdown")
  assert tables, "no results table"
  for s in site_names():
    assert s in tables[-1], (s, tables[-1])
    assert f"'{s}'" in stdout   # the per-site curve summary
  pngs = outputs(nb, "image/png")
  assert len(pngs) == 1 and png_ok(pngs[0])   # the learning curves


def test_evaluate_checkpoint_runs(kernel_env):
  nb = execute("evaluate_checkpoint.ipynb")
  stdout = "".join(outputs(nb, "stdout"))
  assert "restored best model" in stdout, stdout[-2000:]
  assert "HC peak map column: yes" in stdout
  tables = outputs(nb, "text/markdown")
  assert tables, "no results table"
  for s in site_names():
    assert s in tables[-1], (s, tables[-1])
  pngs = outputs(nb, "image/png")
  assert len(pngs) == 2 and all(png_ok(p) for p in pngs)   # overlays, then the training curves


def test_failing_cell_fails_the_run(kernel_env):
  from nbclient.exceptions import CellExecutionError
  from nbformat.v4 import new_code_cell, new_notebook
  nb = new_notebook(cells=[new_code_cell("import os; assert os.environ['LCFED_NOTEBOOK_TINY'] == '1'"),
                           new_code_cell("raise ValueError('a cell failed')"), new_code_cell("print('after')")])
  with pytest.raises(CellExecutionError, match="a cell failed"):
    execute(nb)
  assert not nb.cells[2].outputs   # execution stopped at the failing cell


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
  """Notebooks are committed stripped: no outputs, no execution counts."""
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
           and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, f"{name}: cells {dirty} hold outputs; clear them before committing " \
                    f"(Edit > Clear all outputs, or jupyter nbconvert --clear-output --inplace notebooks/{name})"
  assert "widgets" not in nb.metadata, f"{name}: widget state in the metadata"


def test_no_other_notebooks_escape_the_checks():
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
